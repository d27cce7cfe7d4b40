# Policy learn over Linux under bulkhead: the workloads of the disks and restart
# scenarios with every worker in learn mode (`bulkhead policy learn`: each worker keeps
# its whole sandbox, its filter records every call and lets it through). $1 = KERNEL,
# $2 = kills. The crash loop of the restart scenario is left out (its workers die on
# purpose before they serve); its 20 unbind/bind cycles stay. Each VM's fact NAME.rc is
# learn's exit status: 0 when nothing was missing from the shipped policy.
LEARN=1
NO_CRASH_LOOP=1
kernel=${1:-vmlinux}
kills=${2:-10}
set -- "$kernel"
. /nest/scenarios/disks.sh
set -- "$kernel" "$kills"
. /nest/scenarios/restart.sh
