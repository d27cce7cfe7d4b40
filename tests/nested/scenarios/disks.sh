# Disks through Linux's own drivers: one VM per argument KERNEL[:hugepages] (vmlinux or
# vmlinuz), 2 vCPUs, five disks, each with its own worker: vda (io_uring engine), vdb
# (sync engine, limited to 400 requests a second: Linux's driver under a binding rate
# limit), vdc (readonly), vdd (qcow2 over a raw backing file; its host side is
# read through qemu-img convert, and qemu-img check reports on it), vde (an NBD export:
# qemu-nbd in L1 serving a raw file at a Unix socket). At the end vda grows
# from 64 to 96 MiB under L2 (`bulkhead ctl resize`). L2 runs /nest/disks.sh; then the host side of every
# checksum L2 reported is computed here from the image files, and the readonly image is
# compared with its state before the run.
for spec in "$@"; do
	kernel=${spec%%:*}
	name=disks-$kernel
	extra=
	if [ "$spec" != "${spec%:hugepages}" ]; then
		# 256 MiB of guest RAM in 2 MiB pages.
		echo 128 >/proc/sys/vm/nr_hugepages
		fact "$name.free_hugepages" "$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages)"
		extra=--hugepages
	fi
	rm -f /tmp/d0.img /tmp/d1.img /tmp/ro.img /tmp/base.raw /tmp/d3.qcow2 /tmp/d3.raw /tmp/d4.img /tmp/nbd.sock
	truncate -s 64M /tmp/d0.img /tmp/d1.img /tmp/d4.img
	# vde: an NBD export, qemu-nbd serving a raw file at a Unix socket in L1.
	qemu-nbd --format=raw --persistent --shared=8 --socket /tmp/nbd.sock /tmp/d4.img &
	nbd_pid=$!
	tries=0
	while [ ! -S /tmp/nbd.sock ] && [ $tries -lt 100 ]; do
		usleep 100000
		tries=$((tries + 1))
	done
	dd if=/dev/urandom of=/tmp/ro.img bs=1M count=8 2>/dev/null
	dd if=/dev/urandom of=/tmp/base.raw bs=1M count=16 2>/dev/null
	truncate -s 64M /tmp/base.raw
	(cd /tmp && qemu-img create -q -f qcow2 -b base.raw -F raw d3.qcow2) || fail "$name: qemu-img create"
	ro_before=$(sha256sum /tmp/ro.img | cut -d' ' -f1)
	# The first VM insists on worker cgroups (L1 has them); the other takes the default.
	cgroups=auto
	[ "$kernel" = vmlinux ] && cgroups=required
	vm_start "$name" run --kernel "/nest/l2/$kernel" --initrd "$L2_INITRD" --vcpus 2 --mem 256 \
		$extra --timeout 300 --worker-cgroups $cgroups --api-socket "/tmp/$name.api" \
		--disk path=/tmp/d0.img,engine=io_uring --disk path=/tmp/d1.img,engine=sync,iops=400 \
		--disk path=/tmp/ro.img,readonly=on \
		--disk path=/tmp/d3.qcow2,format=qcow2,backing=/tmp/base.raw \
		--disk nbd=unix:/tmp/nbd.sock \
		--cmdline "$L2_CMDLINE guestkit.run=\"sh /nest/disks.sh resize\""
	# While L2 runs: every worker process (reapers, confined workers, spares) sees an
	# empty root, though L1's own root is an initramfs.
	if wait_for "/tmp/$name.console" '^NESTL2 fact cpus=' 200; then
		roots=
		for p in $(pidof bulkhead-worker); do
			roots="$roots $(ls -A "/proc/$p/root" | wc -l)"
		done
		fact "$name.worker_root_entries" "${roots# }"
		# Each worker process sits in its worker's own cgroup (L1's /init mounted a cgroup2
		# hierarchy with every controller): its path, and that leaf's limits.
		cgroups=
		for p in $(pidof bulkhead-worker); do
			cg=$(sed -n 's/^0:://p' "/proc/$p/cgroup")
			leaf=/sys/fs/cgroup$cg
			cgroups="$cgroups $cg:$(cat "$leaf/memory.max" "$leaf/memory.swap.max" "$leaf/pids.max" 2>/dev/null | tr '\n' ':')"
		done
		fact "$name.worker_cgroups" "${cgroups# }"
		# bulkhead and its spawner (both named bulkhead) stay where they were.
		own=
		for p in $(pidof bulkhead); do
			own="$own $(sed -n 's/^0:://p' "/proc/$p/cgroup")"
		done
		fact "$name.bulkhead_cgroup" "${own# }"
	else
		fail "$name: L2 never started its disk checks"
	fi
	# L2 waits for vda to grow from 64 MiB: grown here, through the API.
	if wait_for "/tmp/$name.console" '^NESTL2 resize-ready' 240; then
		bulkhead ctl --api-socket "/tmp/$name.api" resize blk0 96M >"/tmp/$name.resize" 2>&1
		fact "$name.resize_rc" $?
		note "$name: $(head -n 1 "/tmp/$name.resize")"
		fact "$name.d0_bytes" "$(stat -c %s /tmp/d0.img)"
	else
		fail "$name: L2 never got to the resize"
	fi
	if ! wait_for "/tmp/$name.console" '^NESTL2 fact io_errors=' 240; then
		fail "$name: L2's disk checks did not finish"
		vm_diagnose "$name"
	fi
	vm_wait "$name"
	kill "$nbd_pid" 2>/dev/null
	wait "$nbd_pid" 2>/dev/null
	# Its spawner removed every worker's cgroup and the VM's own once bulkhead ended.
	fact "$name.cgroups_left" "$(find /sys/fs/cgroup/bulkhead -mindepth 1 -type d 2>/dev/null | wc -l)"
	# The host's view of each range L2 reported (the qcow2 image's as QEMU reads it).
	qemu-img check -q /tmp/d3.qcow2 >/tmp/d3.check 2>&1
	fact "$name.qcow2_check_rc" $?
	qemu-img convert -f qcow2 -O raw /tmp/d3.qcow2 /tmp/d3.raw
	grep '^NESTL2 sha ' "/tmp/$name.console" | while read -r _ _ disk offset length _; do
		case $disk in vda) img=/tmp/d0.img ;; vdb) img=/tmp/d1.img ;; vdc) img=/tmp/ro.img ;; vdd) img=/tmp/d3.raw ;; vde) img=/tmp/d4.img ;; *) continue ;; esac
		host=$(dd if="$img" bs=4096 skip=$((offset / 4096)) count=$((length / 4096)) 2>/dev/null |
			sha256sum | cut -d' ' -f1)
		echo "NEST sha $name $disk $offset $length $host"
	done
	fact "$name.ro_image_unchanged" "$([ "$(sha256sum /tmp/ro.img | cut -d' ' -f1)" = "$ro_before" ] && echo 1 || echo 0)"
	rm -f /tmp/d3.raw
	if [ -n "$extra" ]; then
		echo 0 >/proc/sys/vm/nr_hugepages
	fi
done
