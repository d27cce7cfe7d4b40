#!/bin/sh
# L2: Linux's own virtio_blk driver on bulkhead's disks. For each writable disk in $RW
# (default "vda vdb", and vdd when there is one: a qcow2 image over a backing file, and vde
# when there is one: an NBD export), with 2 vCPUs: the hardware queues Linux made, two 4 MiB O_DIRECT
# writes issued at once from CPU 0 and CPU 1, how often each hardware queue ran for them,
# fsync, both read back and checked, then a 1 MiB discard in the middle
# and a check that exactly that range reads as zeros. For the readonly disk $RO (default
# vdc): a write must fail, and its checksum is reported.
# The 8 MiB after, never written, are reported too. With `resize` as its argument, vda
# is grown under it at the end (see there).
# Lines: `NESTL2 fact KEY=VALUE` and `NESTL2 sha DISK OFFSET LENGTH SHA256` (for the
# host side to compare with the image).
RW=${RW:-vda vdb$([ -e /sys/block/vdd ] && echo ' vdd')$([ -e /sys/block/vde ] && echo ' vde')}
RO=${RO:-vdc}
MiB=1048576

fact() { echo "NESTL2 fact $1=$2"; }
sha_of() { sha256sum | cut -d' ' -f1; }
# sha_dev DISK OFFSET_MIB LENGTH_MIB: checksum of that range, read with O_DIRECT.
sha_dev() {
	dd if="/dev/$1" bs=64k skip=$(($2 * 16)) count=$(($3 * 16)) iflag=direct 2>/dev/null | sha_of
}

# Times hardware queue $2 of disk $1 ran (blk-mq's debugfs).
hctx_runs() { cat "/sys/kernel/debug/block/$1/hctx$2/run"; }

mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
dd if=/dev/urandom of=/tmp/pattern bs=$MiB count=4 2>/dev/null
want=$(sha_of </tmp/pattern)
fact cpus "$(cat /sys/devices/system/cpu/online)"

for d in $RW; do
	fact "$d.hw_queues" "$(ls /sys/block/$d/mq | wc -l)"
	fact "$d.discard_max_bytes" "$(cat /sys/block/$d/queue/discard_max_bytes)"
	runs0=$(hctx_runs "$d" 0)
	runs1=$(hctx_runs "$d" 1)
	# The same pattern at 0 MiB from CPU 0 and at 4 MiB from CPU 1, both at once.
	taskset -c 0 dd if=/tmp/pattern of="/dev/$d" bs=64k seek=0 oflag=direct conv=notrunc 2>/dev/null &
	w0=$!
	taskset -c 1 dd if=/tmp/pattern of="/dev/$d" bs=64k seek=64 oflag=direct conv=notrunc 2>/dev/null &
	w1=$!
	wait "$w0"
	rc0=$?
	wait "$w1"
	rc1=$?
	fact "$d.write_rc" "$rc0,$rc1"
	# Each hardware queue's CPUs, and how often it ran during the writes: the 64
	# requests each CPU issued go through the queue of that CPU.
	fact "$d.hctx0.cpus" "$(cat "/sys/block/$d/mq/0/cpu_list")"
	fact "$d.hctx1.cpus" "$(cat "/sys/block/$d/mq/1/cpu_list")"
	fact "$d.hctx0.runs" $(($(hctx_runs "$d" 0) - runs0))
	fact "$d.hctx1.runs" $(($(hctx_runs "$d" 1) - runs1))
	# busybox sync FILE: fsync(2) on the disk, a virtio-blk FLUSH.
	sync "/dev/$d"
	fact "$d.fsync_rc" $?
	ok=0
	[ "$(sha_dev "$d" 0 4)" = "$want" ] && [ "$(sha_dev "$d" 4 4)" = "$want" ] && ok=1
	fact "$d.readback_ok" $ok
	# Discard 1 MiB at 1 MiB: that range must read as zeros, the rest as written.
	blkdiscard -o $MiB -l $MiB "/dev/$d"
	fact "$d.discard_rc" $?
	{
		dd if=/tmp/pattern bs=$MiB count=1 2>/dev/null
		dd if=/dev/zero bs=$MiB count=1 2>/dev/null
		dd if=/tmp/pattern bs=$MiB skip=2 count=2 2>/dev/null
		cat /tmp/pattern
	} >/tmp/expect
	expect=$(sha_of </tmp/expect)
	got=$(sha_dev "$d" 0 8)
	ok=0
	[ "$got" = "$expect" ] && ok=1
	fact "$d.after_discard_ok" $ok
	echo "NESTL2 sha $d 0 $((8 * MiB)) $got"
	# The next 8 MiB, never written: zeros, or a backing file's bytes.
	echo "NESTL2 sha $d $((8 * MiB)) $((8 * MiB)) $(sha_dev "$d" 8 8)"
done

if [ -n "$RO" ]; then
	fact "$RO.ro" "$(cat /sys/block/$RO/ro)"
	dd if=/dev/zero of="/dev/$RO" bs=4096 count=1 oflag=direct conv=notrunc 2>/tmp/ro.err
	fact "$RO.write_rc" $?
	fact "$RO.write_error" "$(head -n 1 /tmp/ro.err)"
	echo "NESTL2 sha $RO 0 $((8 * MiB)) $(sha_dev "$RO" 0 8)"
fi
# Live resize (`disks.sh resize`): once this says `NESTL2 resize-ready`, the host grows
# vda (bulkhead ctl resize); Linux's config-change handler must show the new size in
# /sys/block/vda/size without a reboot, and the new last 4 KiB must take a write.
if [ "$1" = resize ]; then
	before=$(cat /sys/block/vda/size)
	fact vda.size_before "$before"
	echo "NESTL2 resize-ready"
	tries=0
	while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $tries -lt 1200 ]; do
		usleep 100000
		tries=$((tries + 1))
	done
	after=$(cat /sys/block/vda/size)
	fact vda.size_after "$after"
	fact vda.new_size_said "$(dmesg | grep -c '\[vda\] new size')"
	last=$((after / 8 - 1))
	dd if=/tmp/pattern of=/dev/vda bs=4096 count=1 seek=$last oflag=direct conv=notrunc 2>/dev/null
	ok=0
	[ "$(dd if=/dev/vda bs=4096 skip=$last count=1 iflag=direct 2>/dev/null | sha_of)" = \
		"$(dd if=/tmp/pattern bs=4096 count=1 2>/dev/null | sha_of)" ] && ok=1
	fact vda.new_end_ok $ok
fi
fact io_errors "$(dmesg | grep -Ec 'I/O error|Buffer I/O|blk_update_request')"
