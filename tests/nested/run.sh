#!/usr/bin/env bash
# The nested harness: stock Linux (L2) under bulkhead on a KVM that really virtualizes
# guest kernel code. L1 is the guest kit's Debian cloud kernel under QEMU TCG with
# `-cpu max` (an emulated AMD CPU with SVM and nested paging); its own kvm-amd gives it a
# /dev/kvm, and bulkhead runs there, booting L2 (the same kernel) with its disks served by
# sandboxed workers. On this development machine's kvm_pvm no Linux gets past early boot,
# so this is where Linux's own drivers meet our VMM.
#
# Usage: tests/nested/run.sh [--timeout SECONDS] SCENARIO [ARG...]
#   SCENARIO  a script in tests/nested/scenarios/ (without .sh), run by L1's /init with
#             the ARGs after tests/nested/lib.sh
#   --timeout the whole L1 run's limit (default 600 s)
#
# Watch it: L1's console goes to stdout, with L2's console as `L2 NAME| ...` and
# bulkhead's log as `BH NAME| ...` lines (NAME: the scenario's name for that VM); the
# scenario's results are `NEST fact KEY=VALUE` lines. A copy goes to
# target/nested/SCENARIO.log.
#
# Exit status: how many of the scenario's expectations failed (its `NEST fail ...` lines;
# L1's last line is `NEST done rc=N`); 124 when the run hit --timeout, or L1 stood still
# twice; 125 when L1 ended without a `NEST done` line; 2 for a missing input.
#
# An L1 that prints nothing for NESTED_STALL_SECONDS (default 240) has stood still (QEMU
# TCG; see below): it is stopped, its log kept as SCENARIO.stalled.log, and the scenario
# runs once more after a `NEST restart` line.
#
# L1 runs without a vDSO (vdso=0): there, as on hosts whose clocksource the vDSO cannot read
# (hpet, acpi_pm), every clock read is a system call, a worker's log lines included. (With
# clocksource=hpet instead, L1 under QEMU 7.2 lost a timer wakeup and froze idle in 3 runs
# of 4.)
#
# L1 has one CPU (NESTED_L1_CPUS=N for more): with two, L2s under QEMU 7.2's emulated SVM
# triple-faulted in early boot in about one boot of ten, and once an L1 CPU locked up in
# KVM_RUN (soft lockup) as an L2 powered off; with one, neither happened again.
# NESTED_L1_CMDLINE replaces L1's `quiet` (e.g. `loglevel=5` shows L1's kernel warnings and
# stack traces); NESTED_QEMU_ARGS adds QEMU options (e.g. `-monitor
# unix:/tmp/l1.sock,server,nowait` to look at a stalled L1).
#
# Inputs: qemu-system-x86_64, the guest kit (tests/guest/guestkit.sh: vmlinuz, vmlinux,
# initramfs.cpio.gz, l1-modules.cpio; in $BULKHEAD_GUEST_DIR, default target/guest), and
# the binaries $BULKHEAD_BIN, $BULKHEAD_WORKER_BIN and $BULKHEAD_WORKER_HOOKS_BIN (default
# target/debug/bulkhead, target/debug/bulkhead-worker and the hook-enabled
# target/hooks/debug/bulkhead-worker, which only the restart scenario's crash loop needs),
# copied into L1 without their debug info, with the shared libraries they load. Unless
# those variables are set, the kit and the binaries are built first when out of date.

set -euo pipefail

# The whole script is one function, read before it runs: editing this file while a run
# is in progress (it takes minutes) cannot change what the run does next.
main() {

	die() {
		printf 'nested: error: %s\n' "$*" >&2
		exit 2
	}

	timeout_s=600
	while [[ $# -gt 0 ]]; do
		case $1 in
		--timeout)
			timeout_s=${2:?--timeout needs a value}
			shift 2
			;;
		-h | --help)
			sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
			exit 0
			;;
		-*) die "unknown option $1 (see --help)" ;;
		*) break ;;
		esac
	done
	[[ $# -ge 1 ]] || die "usage: tests/nested/run.sh [--timeout SECONDS] SCENARIO [ARG...]"
	scenario=$1
	shift

	here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
	repo=$(cd "$here/../.." && pwd)
	kit=${BULKHEAD_GUEST_DIR:-$repo/target/guest}
	bin=${BULKHEAD_BIN:-$repo/target/debug/bulkhead}
	worker=${BULKHEAD_WORKER_BIN:-$repo/target/debug/bulkhead-worker}
	hooks=${BULKHEAD_WORKER_HOOKS_BIN:-$repo/target/hooks/debug/bulkhead-worker}

	[[ $scenario =~ ^[a-z0-9][a-z0-9-]*$ && -f $here/scenarios/$scenario.sh ]] ||
		die "no scenario '$scenario': choose one of $(cd "$here/scenarios" && ls -- *.sh | sed 's/\.sh$//' | tr '\n' ' ')"
	command -v qemu-system-x86_64 >/dev/null ||
		die "qemu-system-x86_64 is missing: apt-get install qemu-system-x86 (scripts/test.sh does)"
	# Run by hand, the harness builds what it needs (both steps do nothing when up to date);
	# the tests give it their binaries and kit through the environment instead.
	if [[ -z ${BULKHEAD_GUEST_DIR:-} ]]; then
		"$repo/tests/guest/guestkit.sh" >&2 || die "tests/guest/guestkit.sh failed"
	fi
	if [[ -z ${BULKHEAD_BIN:-} ]]; then
		(cd "$repo" && cargo build --bins --locked &&
			cargo build -p device-workers --features test-hooks --target-dir target/hooks --locked) >&2 ||
			die "cargo build failed"
	fi
	for f in vmlinuz vmlinux initramfs.cpio.gz l1-modules.cpio; do
		[[ -f $kit/$f ]] || die "$kit/$f is missing: build the guest kit with tests/guest/guestkit.sh"
	done
	for f in "$bin" "$worker"; do
		[[ -x $f ]] || die "$f is missing: cargo build --bins (or set BULKHEAD_BIN / BULKHEAD_WORKER_BIN)"
	done

	out=$repo/target/nested
	work=$out/$scenario.work
	rm -rf "$work"
	mkdir -p "$work/payload/nest/bin" "$work/payload/nest/l2" "$work/l2extra/nest"
	payload=$work/payload

	# --- L1's payload: binaries and their libraries, the L2 kit, the scenario --------------
	copy_bin() {
		objcopy --strip-debug "$1" "$payload/nest/bin/$2"
		local lib
		# ldd prints "name => /path (addr)" or "/path (addr)" for the loader.
		for lib in $(ldd "$1" | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) .*/\1/p'); do
			mkdir -p "$payload$(dirname "$lib")"
			cp -L "$lib" "$payload$lib"
		done
	}
	copy_bin "$bin" bulkhead
	copy_bin "$worker" bulkhead-worker
	# The disks scenario makes a qcow2 image in L1 and reads it back with QEMU's own tool,
	qemu_img=$(command -v qemu-img) || die "qemu-img is missing: apt-get install qemu-utils"
	copy_bin "$qemu_img" qemu-img
	# ... and serves a disk from qemu-nbd.
	qemu_nbd=$(command -v qemu-nbd) || die "qemu-nbd is missing: apt-get install qemu-utils"
	copy_bin "$qemu_nbd" qemu-nbd
	if [[ -x $hooks ]]; then
		copy_bin "$hooks" bulkhead-worker-hooks
	fi

	# Writes the files $@ one after the other, each padded with zeros to a multiple of 4
	# bytes: Linux reads concatenated initramfs archives, but takes an uncompressed one only
	# at a 4-byte boundary (and skips the zeros between archives).
	concat_archives() {
		local f size
		for f in "$@"; do
			cat "$f"
			size=$(stat -c %s "$f")
			head -c $(((4 - size % 4) % 4)) /dev/zero
		done
	}

	# L2's initramfs: the guest kit's, plus the L2-side scripts under /nest.
	cp "$here"/l2/*.sh "$work/l2extra/nest/"
	ln "$kit/vmlinux" "$payload/nest/l2/vmlinux" 2>/dev/null || cp "$kit/vmlinux" "$payload/nest/l2/vmlinux"
	ln "$kit/vmlinuz" "$payload/nest/l2/vmlinuz" 2>/dev/null || cp "$kit/vmlinuz" "$payload/nest/l2/vmlinuz"
	(cd "$work/l2extra" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
		>"$work/l2extra.cpio"
	concat_archives "$kit/initramfs.cpio.gz" "$work/l2extra.cpio" >"$payload/nest/l2/initramfs.cpio.gz"

	cp "$here/lib.sh" "$payload/nest/lib.sh"
	mkdir -p "$payload/nest/scenarios"
	cp "$here"/scenarios/*.sh "$payload/nest/scenarios/"
	install -m 0755 "$here/l1-init" "$payload/init"
	# run.sh: the scenario with its arguments, each quoted for sh.
	{
		echo '. /nest/lib.sh'
		printf 'set --'
		for a in "$@"; do printf " '%s'" "${a//\'/\'\\\'\'}"; done
		echo
		printf '. /nest/scenarios/%s.sh\n' "$scenario"
		# The status: how many of the scenario's expectations failed (lib.sh's fail).
		echo 'exit "$NEST_FAILED"'
	} >"$payload/nest/run.sh"

	# Later archives of a concatenated initramfs win: the payload's /init replaces the kit's.
	(cd "$payload" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
		>"$work/payload.cpio"
	concat_archives "$kit/initramfs.cpio.gz" "$kit/l1-modules.cpio" "$work/payload.cpio" \
		>"$work/l1-initrd"

	# --- run L1 ------------------------------------------------------------------------------
	# QEMU 7.2's TCG with its emulated SVM has stood still twice in CI (of about a dozen
	# runs of the disks scenario): L1 printed nothing more at all, not even the
	# scenario's own timeouts, which L1's shell prints whatever bulkhead does; its one CPU
	# never came back from running L2. So a run whose L1 prints nothing for $stall_s s is
	# stopped, kept as SCENARIO.stalled.log, and the scenario runs once more in a fresh
	# L1 within what is left of --timeout, after a `NEST restart` line (the tests read what
	# follows the last one). A second stall ends the run.
	log=$out/$scenario.log
	stall_s=${NESTED_STALL_SECONDS:-240}
	deadline=$((SECONDS + timeout_s))
	for attempt in 1 2; do
		left=$((deadline - SECONDS))
		((left > 0)) || left=1
		echo "nested: L1 (QEMU TCG, emulated SVM) running scenario $scenario $*; log: $log" >&2
		: >"$log"
		(
			set +e
			timeout -k 10 "$left" qemu-system-x86_64 ${NESTED_QEMU_ARGS:-} -accel tcg -M q35 -cpu max -m 2G -smp "${NESTED_L1_CPUS:-1}" \
				-display none -monitor none -serial stdio -nic none -no-reboot \
				-kernel "$kit/vmlinuz" -initrd "$work/l1-initrd" \
				-append "console=ttyS0 panic=-1 vdso=0 ${NESTED_L1_CMDLINE:-quiet}" </dev/null | sed -u 's/\r$//' | tee -a "$log"
			echo "${PIPESTATUS[0]}" >"$work/qemu.status"
		) &
		runner=$!
		stalled=0
		size=-1
		quiet=0
		while kill -0 "$runner" 2>/dev/null; do
			sleep 5
			now=$(stat -c %s "$log" 2>/dev/null || echo 0)
			if [[ $now == "$size" ]]; then
				quiet=$((quiet + 5))
			else
				quiet=0
				size=$now
			fi
			if ((quiet >= stall_s)); then
				stalled=1
				pkill -TERM -f -- "-initrd $work/l1-initrd" || true
				break
			fi
		done
		wait "$runner" || true
		status=$(cat "$work/qemu.status" 2>/dev/null || echo 1)
		((stalled)) || break
		cp "$log" "$out/$scenario.stalled.log"
		if ((attempt == 2)); then
			echo "nested: L1 printed nothing for $stall_s s, twice (QEMU TCG stood still); logs: $out/$scenario.stalled.log" >&2
			exit 124
		fi
		echo "NEST restart: L1 printed nothing for $stall_s s (QEMU TCG stood still; kept as $out/$scenario.stalled.log); running the scenario again"
	done
	if [[ $status == 124 ]]; then
		echo "nested: L1 did not finish within $timeout_s s (--timeout)" >&2
		exit 124
	fi
	rc=$(sed -n 's/^NEST done rc=\([0-9]*\)$/\1/p' "$log" | tail -n 1)
	if [[ -z $rc ]]; then
		echo "nested: L1 ended (QEMU exit status $status) without a 'NEST done' line" >&2
		exit 125
	fi
	exit "$rc"
}

main "$@"
