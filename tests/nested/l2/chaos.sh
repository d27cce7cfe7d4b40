#!/bin/sh
# L2: a write/verify loop on /dev/vda while the host kills, stops and restarts the disk's
# worker. Two loops at once, one pinned to each CPU, each on its own 8 blocks of 16 KiB:
# every round writes a round-specific pattern with O_DIRECT, then reads each block back
# and compares. Runs until a line arrives on the console (the host types it), or 300 s.
# Lines: `NESTL2 chaos started`, then facts: rounds, bad blocks, failed writes and reads,
# and the I/O errors in dmesg.
fact() { echo "NESTL2 fact $1=$2"; }

writer() {
	cpu=$1
	r=0 bad=0 wfail=0 rfail=0
	while [ ! -e /tmp/stop ]; do
		r=$((r + 1))
		for i in 0 1 2 3 4 5 6 7; do
			blk=$((cpu * 64 + i * 5))
			yes "r$r-c$cpu-b$i" | head -c 16384 |
				dd of=/dev/vda bs=16384 seek=$blk oflag=direct conv=notrunc 2>/dev/null ||
				wfail=$((wfail + 1))
		done
		for i in 0 1 2 3 4 5 6 7; do
			blk=$((cpu * 64 + i * 5))
			dd if=/dev/vda of="/tmp/read$cpu" bs=16384 skip=$blk count=1 iflag=direct 2>/dev/null ||
				rfail=$((rfail + 1))
			got=$(md5sum <"/tmp/read$cpu")
			want=$(yes "r$r-c$cpu-b$i" | head -c 16384 | md5sum)
			if [ "$got" != "$want" ]; then
				bad=$((bad + 1))
				echo "NESTL2 chaos BAD cpu $cpu round $r block $blk"
			fi
		done
	done
	echo "$r $bad $wfail $rfail" >"/tmp/writer$cpu"
}

if [ "$1" = writer ]; then
	writer "$2"
	exit 0
fi

# A background job's stdin is /dev/null unless it is redirected explicitly.
exec 3<&0
(
	read -r _ <&3
	: >/tmp/stop
) &
(
	sleep 300
	: >/tmp/stop
) &
timer=$!
taskset -c 0 sh "$0" writer 0 &
w0=$!
taskset -c 1 sh "$0" writer 1 &
w1=$!
echo "NESTL2 chaos started"
wait "$w0" "$w1"
kill "$timer" 2>/dev/null
read -r r0 bad0 wf0 rf0 </tmp/writer0
read -r r1 bad1 wf1 rf1 </tmp/writer1
fact chaos.rounds "$((r0 + r1))"
fact chaos.bad "$((bad0 + bad1))"
fact chaos.write_failures "$((wf0 + wf1))"
fact chaos.read_failures "$((rf0 + rf1))"
fact io_errors "$(dmesg | grep -Ec 'I/O error|Buffer I/O|blk_update_request')"
