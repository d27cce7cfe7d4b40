# Restarts under Linux: $1 = KERNEL (vmlinux or vmlinuz), $2 = kills (default 22).
#
# VM "chaos": L2 runs /nest/chaos.sh (a write/verify loop on each CPU) on one disk while
# this script SIGKILLs the serving worker $2 times (each time once its successor serves),
# then SIGSTOPs the serving worker (the supervisor must find it hung and replace it),
# then restarts it on purpose through `bulkhead ctl`, then tells L2 to stop.
#
# VM "rebind": disk blk1's workers die as their first ring starts, budget + 1 times in a
# row (the hook-enabled worker's crash-loop), so the device fails; L2 runs
# /nest/rebind.sh: reads of that disk must fail (not hang), rebinding its driver must bring
# it back, and 20 unbind/bind cycles of the healthy blk0 must cost no worker (its pid is
# read here before and after). With NO_CRASH_LOOP=1 (the learn scenario) both disks are
# healthy and L2 does only the 20 cycles.
kernel=${1:-vmlinux}
kills=${2:-22}
api=/tmp/api.sock

# The pid of the worker serving DISK, from the control API.
worker_pid() {
	bulkhead ctl --api-socket "$api" --json status "$1" 2>/dev/null | sed -n 's/.*"worker_pid":\([0-9]*\).*/\1/p'
}
# Waits (up to 20 s) until DISK is served by a worker other than OLD; prints its pid.
successor_of() {
	local tries=0 now
	while [ $tries -lt 200 ]; do
		now=$(worker_pid "$1")
		if [ -n "$now" ] && [ "$now" != "$2" ]; then
			echo "$now"
			return 0
		fi
		usleep 100000
		tries=$((tries + 1))
	done
	return 1
}

rm -f /tmp/c0.img "$api"
truncate -s 64M /tmp/c0.img
vm_start chaos run --kernel "/nest/l2/$kernel" --initrd "$L2_INITRD" --vcpus 2 --mem 256 \
	--timeout 600 --api-socket "$api" --disk path=/tmp/c0.img \
	--cmdline "$L2_CMDLINE guestkit.run=\"sh /nest/chaos.sh\""
if wait_for /tmp/chaos.console '^NESTL2 chaos started' 200; then
	killed=0
	pid=$(worker_pid blk0)
	while [ "$killed" -lt "$kills" ] && [ -n "$pid" ]; do
		usleep 300000
		kill -9 "$pid" || break
		killed=$((killed + 1))
		pid=$(successor_of blk0 "$pid") || pid=
	done
	fact chaos.kills "$killed"
	[ "$killed" = "$kills" ] || fail "chaos: only $killed of $kills kills"
	fact chaos.serving_after_kills "$([ -n "$pid" ] && echo 1 || echo 0)"
	[ -n "$pid" ] || fail "chaos: no worker serves after the kills"

	stopped=$(worker_pid blk0)
	kill -STOP "$stopped"
	if successor_of blk0 "$stopped" >/dev/null; then
		fact chaos.hung_replaced 1
	else
		fact chaos.hung_replaced 0
		fail "chaos: the stopped worker $stopped was not replaced"
	fi

	before=$(worker_pid blk0)
	out=$(bulkhead ctl --api-socket "$api" --json restart blk0)
	rc=$?
	fact chaos.planned_rc $rc
	[ $rc = 0 ] || fail "chaos: bulkhead ctl restart exited with $rc"
	note "planned restart: $out"
	after=$(worker_pid blk0)
	fact chaos.planned_new_worker "$([ -n "$after" ] && [ "$after" != "$before" ] && echo 1 || echo 0)"
	# Let the successor serve a few rounds before L2 stops.
	sleep 3
else
	fail "chaos: L2 never started its write/verify loop"
	vm_diagnose chaos
fi
vm_type chaos stop
vm_wait chaos

rm -f /tmp/r0.img /tmp/r1.img "$api"
truncate -s 64M /tmp/r0.img /tmp/r1.img
if [ "${NO_CRASH_LOOP:-0}" = 1 ]; then
	vm_start rebind run --kernel "/nest/l2/$kernel" --initrd "$L2_INITRD" --vcpus 2 --mem 256 \
		--timeout 600 --api-socket "$api" --disk path=/tmp/r0.img --disk path=/tmp/r1.img \
		--cmdline "$L2_CMDLINE guestkit.run=\"sh /nest/rebind.sh 20 healthy\""
else
	[ -x /nest/bin/bulkhead-worker-hooks ] || {
		note "the crash loop needs the hook-enabled worker (BULKHEAD_WORKER_HOOKS_BIN)"
		exit 2
	}
	# The crash-loop budget of vmm-core's supervisor, and one more.
	echo 6 >/tmp/crash-loop-turns
	export BULKHEAD_WORKER_FAULT_HOOK=blk1:crash-loop=/tmp/crash-loop-turns
	vm_start rebind run --kernel "/nest/l2/$kernel" --initrd "$L2_INITRD" --vcpus 2 --mem 256 \
		--timeout 600 --api-socket "$api" --worker-bin /nest/bin/bulkhead-worker-hooks \
		--disk path=/tmp/r0.img --disk path=/tmp/r1.img,spare=off \
		--cmdline "$L2_CMDLINE guestkit.run=\"sh /nest/rebind.sh 20\""
	unset BULKHEAD_WORKER_FAULT_HOOK
fi
if wait_for /tmp/rebind.console '^NESTL2 cycles start' 300; then
	before=$(worker_pid blk0)
	fact rebind.blk0_pid_before "$before"
	if ! wait_for /tmp/rebind.console '^NESTL2 cycles done' 300; then
		fail "rebind: L2's unbind/bind cycles did not end"
		vm_diagnose rebind
	fi
	after=$(worker_pid blk0)
	fact rebind.blk0_pid_after "$after"
	[ -n "$before" ] && [ "$before" = "$after" ] ||
		fail "rebind: disk blk0's worker changed from '$before' to '$after'"
else
	fail "rebind: L2 never started its unbind/bind cycles"
	vm_diagnose rebind
fi
vm_type rebind stop
vm_wait rebind
# Dozens of workers were killed, hung and restarted: the spawner removed each one's cgroup,
# and the VM's own once bulkhead ended.
fact cgroups_left "$(find /sys/fs/cgroup/bulkhead -mindepth 1 -type d 2>/dev/null | wc -l)"
