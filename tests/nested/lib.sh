# Sourced by /nest/run.sh inside L1 (busybox sh) before the scenario: starting bulkhead
# VMs with L2 guests, watching them, and reporting to the runner.
#
# Lines for the runner (and the tests that judge a run):
#   NEST fact KEY=VALUE    a measured fact (exit codes, counts, checksums)
#   NEST note TEXT         progress, for the reader
#   L2 NAME| TEXT          a line of VM NAME's serial console (bulkhead's stdout)
#   BH NAME| TEXT          a line of VM NAME's bulkhead log (bulkhead's stderr)
# The files behind them stay in /tmp: NAME.console, NAME.log.

L2_VMLINUX=/nest/l2/vmlinux
L2_VMLINUZ=/nest/l2/vmlinuz
L2_INITRD=/nest/l2/initramfs.cpio.gz
# The L2 kernel's command line without the guest kit's command. noxsave: QEMU TCG's SVM
# does not intercept XSETBV, so L1's KVM never sees L2's XCR0 and L2 finds its XSAVE
# state inconsistent ("XSAVE consistency problem", under QEMU as an L1 VMM too); L2
# then uses FXSAVE, which needs no XCR0.
L2_CMDLINE='console=ttyS0 noxsave'

fact() { echo "NEST fact $1=$2"; }
note() { echo "NEST note $*"; }
# fail TEXT: something the scenario expected did not happen; the run's exit status counts
# these (run.sh exits with NEST_FAILED).
NEST_FAILED=0
fail() {
	echo "NEST fail $*"
	NEST_FAILED=$((NEST_FAILED + 1))
}

# Copies lines from stdin to the console as `TAG| LINE` and to FILE, without the CR of a
# serial console's line ends.
_prefix() {
	local tag=$1 cr line
	cr=$(printf '\r')
	exec 9>>"$2"
	while IFS= read -r line || [ -n "$line" ]; do
		line=${line%"$cr"}
		printf '%s| %s\n' "$tag" "$line"
		printf '%s\n' "$line" >&9
	done
}

# vm_start NAME ARGS...: starts `bulkhead ARGS...` in the background. Its stdin is the
# fifo /tmp/NAME.in (write to it with vm_type). With LEARN=1, `bulkhead run ARGS...` runs
# as `bulkhead policy learn --json /tmp/NAME.learn.json -- run ARGS...` (its report goes
# to the VM's console file after L2's lines).
vm_start() {
	local name=$1
	shift
	if [ "${LEARN:-0}" = 1 ] && [ "$1" = run ]; then
		set -- policy learn --json "/tmp/$name.learn.json" -- "$@"
	fi
	rm -f "/tmp/$name".*
	: >"/tmp/$name.console"
	: >"/tmp/$name.log"
	mkfifo "/tmp/$name.in" "/tmp/$name.o" "/tmp/$name.e"
	_prefix "L2 $name" "/tmp/$name.console" <"/tmp/$name.o" &
	echo $! >"/tmp/$name.prefixers"
	_prefix "BH $name" "/tmp/$name.log" <"/tmp/$name.e" &
	echo $! >>"/tmp/$name.prefixers"
	bulkhead "$@" <"/tmp/$name.in" >"/tmp/$name.o" 2>"/tmp/$name.e" &
	echo $! >"/tmp/$name.pid"
	# Holds the fifo open for reading and writing: bulkhead's open of its stdin returns,
	# it never sees an end of file, and vm_type never blocks, even once bulkhead is gone.
	sleep 100000 <>"/tmp/$name.in" &
	echo $! >"/tmp/$name.inpid"
	note "started $name: bulkhead $*"
}

# vm_type NAME TEXT: TEXT and a newline to VM NAME's serial input.
vm_type() {
	printf '%s\n' "$2" >"/tmp/$1.in"
}

# vm_wait NAME: waits for VM NAME's bulkhead to exit; prints `fact NAME.rc=N`, returns N
# (a non-zero N is a failure). Every process bulkhead started must be gone with it: one
# still holding its output 10 s later (a leaked worker, say) is a failure, and is killed.
vm_wait() {
	local pid rc p tries=0 left
	pid=$(cat "/tmp/$1.pid")
	wait "$pid"
	rc=$?
	kill "$(cat "/tmp/$1.inpid")" 2>/dev/null
	# The prefixers end once the last writer of bulkhead's output fifos is gone.
	while [ $tries -lt 50 ]; do
		left=
		for p in $(cat "/tmp/$1.prefixers"); do
			kill -0 "$p" 2>/dev/null && left=1
		done
		[ -n "$left" ] || break
		usleep 200000
		tries=$((tries + 1))
	done
	left=$(_fifo_writers "$1")
	if [ -n "$left" ]; then
		fail "$1: processes outlived bulkhead: $(for p in $left; do printf '%s (%s) ' "$p" "$(cat "/proc/$p/cmdline" | tr '\0' ' ')"; done)"
		kill -9 $left 2>/dev/null
	fi
	for p in $(cat "/tmp/$1.prefixers"); do wait "$p"; done
	fact "$1.rc" "$rc"
	[ "$rc" = 0 ] || fail "$1: bulkhead exited with status $rc"
	return "$rc"
}

# Pids (but the prefixers') that hold VM $1's output fifos open.
_fifo_writers() {
	local fd pid prefixers
	prefixers=" $(cat "/tmp/$1.prefixers" | tr '\n' ' ') "
	for fd in /proc/[0-9]*/fd/*; do
		case $(readlink "$fd" 2>/dev/null) in
		"/tmp/$1.o" | "/tmp/$1.e")
			pid=${fd#/proc/}
			pid=${pid%%/*}
			case $prefixers in *" $pid "*) ;; *) echo "$pid" ;; esac
			;;
		esac
	done | sort -u
}

# vm_run NAME ARGS...: vm_start, then vm_wait.
vm_run() {
	vm_start "$@"
	vm_wait "$1"
}

# wait_for FILE PATTERN SECONDS: waits until FILE has a line matching PATTERN (grep -E);
# returns 1 after SECONDS.
wait_for() {
	local tries=0
	while ! grep -Eq -- "$2" "$1" 2>/dev/null; do
		tries=$((tries + 1))
		[ "$tries" -le $(($3 * 5)) ] || return 1
		usleep 200000
	done
}

# vm_diagnose NAME: what VM NAME's processes are doing, for a run that stalled: each
# bulkhead thread's state and CPU ticks (twice, 2 s apart) and its exit counters
# (SIGUSR1 makes bulkhead log them as `BH NAME| ... stats ...`).
vm_diagnose() {
	local pid t n
	pid=$(cat "/tmp/$1.pid")
	note "$1 stalled: threads of bulkhead (pid $pid): name state utime stime"
	for n in 1 2; do
		for t in /proc/"$pid"/task/*; do
			[ -r "$t/stat" ] || continue
			note "  $(cat "$t/comm") $(cut -d' ' -f3,14,15 "$t/stat")"
		done
		kill -USR1 "$pid" 2>/dev/null
		sleep 2
	done
	ps -o pid,ppid,stat,args | grep -v '\[' | while read -r line; do note "  $line"; done
}

# count FILE PATTERN: lines of FILE matching PATTERN (grep -E).
count() {
	grep -Ec -- "$2" "$1" 2>/dev/null || true
}
