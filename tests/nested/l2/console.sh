#!/bin/sh
# L2: its CPUs, then LINES lines to the console, then ACTION: poweroff, reboot, or shell
# (an interactive shell on the console). Run by the guest kit's /init:
# guestkit.run="sh /nest/console.sh ACTION LINES".
action=${1:-poweroff}
lines=${2:-20}
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
