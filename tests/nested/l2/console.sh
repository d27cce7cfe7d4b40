#!/bin/sh
# L2: its CPUs, then LINES lines to the console, then ACTION: poweroff, reboot, or shell
# (an interactive shell on the console). Run by the guest kit's /init:
# guestkit.run="sh /nest/console.sh ACTION LINES".
action=${1:-poweroff}
lines=${2:-20}
# Only emergencies reach the console from here on: a kernel warning (under nested TCG,
# "hrtimer: interrupt took N ns") printed in the middle of a line would split it, and the
# test checks every line arrives whole and in order.
echo 1 >/proc/sys/kernel/printk
echo "NESTL2 cpus online=$(cat /sys/devices/system/cpu/online) count=$(grep -c ^processor /proc/cpuinfo)"
i=1
while [ "$i" -le "$lines" ]; do
	echo "NESTL2 console line $i of $lines"
	i=$((i + 1))
done
case $action in
poweroff) poweroff -f ;;
reboot) reboot -f ;;
shell)
	echo "NESTL2 shell ready"
	exec sh
	;;
*) echo "NESTL2 unknown action $action" ;;
esac
