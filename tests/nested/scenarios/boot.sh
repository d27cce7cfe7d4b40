# Boot and console: one VM per argument KERNEL:VCPUS:ACTION, run one after the other,
# each with a 16 MiB disk (so its boot log shows the disk as a user's would).
# KERNEL is vmlinux (PVH) or vmlinuz (bzImage, 64-bit boot protocol); ACTION is what L2
# does after printing its CPU count and $LINES console lines: poweroff, reboot, or shell
# (then this script types a command into bulkhead's stdin, waits for its answer on
# bulkhead's stdout, and types poweroff). Facts: NAME.rc and NAME.seconds per VM.
LINES=40
for spec in "$@"; do
	kernel=${spec%%:*}
	rest=${spec#*:}
	vcpus=${rest%%:*}
	action=${rest#*:}
	name=$kernel-$vcpus-$action
	t0=$(cut -d' ' -f1 /proc/uptime)
	rm -f /tmp/boot.img
	truncate -s 16M /tmp/boot.img
	vm_start "$name" run --kernel "/nest/l2/$kernel" --initrd "$L2_INITRD" --vcpus "$vcpus" \
		--mem 256 --timeout 180 --disk path=/tmp/boot.img \
		--cmdline "$L2_CMDLINE guestkit.run=\"sh /nest/console.sh $action $LINES\""
	if [ "$action" = shell ]; then
		if wait_for "/tmp/$name.console" '^NESTL2 shell ready' 150; then
			# The shell's echo of this line shows the expression; only a shell that ran
			# it prints the product.
			vm_type "$name" 'echo "typed $((6 * 7)) on $(uname -r)"'
			if ! wait_for "/tmp/$name.console" '^typed 42 on ' 60; then
				fail "$name: no answer to the typed command"
				vm_diagnose "$name"
			fi
			vm_type "$name" 'poweroff -f'
		else
			fail "$name: L2 never said its shell was ready"
			vm_diagnose "$name"
		fi
	fi
	vm_wait "$name"
	t1=$(cut -d' ' -f1 /proc/uptime)
	fact "$name.seconds" "$(echo "$t0 $t1" | awk '{ printf "%.1f", $2 - $1 }')"
done
