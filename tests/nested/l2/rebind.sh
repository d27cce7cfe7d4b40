#!/bin/sh
# L2: a disk whose workers keep crashing (vdb) and a healthy one (vda), CYCLES (default
# 20) unbind/bind cycles; `rebind.sh CYCLES healthy` does only step 3. 1. Reads and writes of vdb must fail with an I/O error, not
# hang (the host put the device in fail mode). 2. Unbinding and binding vdb's driver
# resets the device, which brings a working worker: a write/read-back must match. 3. vda:
# CYCLES unbind/bind cycles, each followed by a read that must return the block written
# before the first. The host reads vda's worker pid between `NESTL2 cycles start` and
# `NESTL2 cycles done`; then this waits for a line on the console before it ends.
cycles=${1:-20}
drv=/sys/bus/virtio/drivers/virtio_blk
fact() { echo "NESTL2 fact $1=$2"; }
now() { cut -d' ' -f1 /proc/uptime; }
# The virtio device under block device $1 (e.g. virtio1).
virtio_of() { basename "$(readlink "/sys/block/$1/device")"; }
# Waits up to 30 s for /dev/$1.
wait_dev() {
	local tries=0
	while [ ! -b "/dev/$1" ] && [ $tries -lt 300 ]; do
		usleep 100000
		tries=$((tries + 1))
	done
	[ -b "/dev/$1" ]
}
rebind() {
	echo "$1" >"$drv/unbind" && echo "$1" >"$drv/bind"
}
block() { yes "$1" | head -c 4096; }

failing_disk() {
	# 1. The failing disk.
	t0=$(now)
	timeout 120 dd if=/dev/vdb of=/dev/null bs=4096 count=1 iflag=direct 2>/tmp/read.err
	fact vdb.failing_read_rc $?
	fact vdb.failing_read_error "$(head -n 1 /tmp/read.err)"
	block failing | timeout 120 dd of=/dev/vdb bs=4096 oflag=direct conv=notrunc 2>/tmp/write.err
	fact vdb.failing_write_rc $?
	fact vdb.failing_write_error "$(head -n 1 /tmp/write.err)"
	fact vdb.failing_seconds "$(echo "$t0 $(now)" | awk '{ printf "%.1f", $2 - $1 }')"

	# 2. Rebinding the driver resets the device.
	dev=$(virtio_of vdb)
	rebind "$dev"
	fact vdb.rebind_rc $?
	ok=0
	if wait_dev vdb; then
		block "after-rebind" | dd of=/dev/vdb bs=4096 seek=7 oflag=direct conv=notrunc 2>/dev/null &&
			[ "$(dd if=/dev/vdb bs=4096 skip=7 count=1 iflag=direct 2>/dev/null | md5sum)" = \
				"$(block after-rebind | md5sum)" ] && ok=1
	fi
	fact vdb.after_rebind_ok $ok
}
[ "$2" = healthy ] || failing_disk

# 3. A healthy disk through CYCLES unbind/bind cycles.
block "cycles" | dd of=/dev/vda bs=4096 seek=3 oflag=direct conv=notrunc 2>/dev/null
want=$(block cycles | md5sum)
dev=$(virtio_of vda)
echo "NESTL2 cycles start"
ok=0
i=0
while [ $i -lt "$cycles" ]; do
	i=$((i + 1))
	rebind "$dev" || break
	wait_dev vda || break
	[ "$(dd if=/dev/vda bs=4096 skip=3 count=1 iflag=direct 2>/dev/null | md5sum)" = "$want" ] &&
		ok=$((ok + 1))
done
fact vda.cycles "$i"
fact vda.cycles_ok "$ok"
echo "NESTL2 cycles done"
fact vda.io_errors "$(dmesg | grep -E 'I/O error|Buffer I/O|blk_update_request' | grep -c 'vda')"
fact vdb.io_errors "$(dmesg | grep -E 'I/O error|Buffer I/O|blk_update_request' | grep -c 'vdb')"
read -r _
