#!/usr/bin/env bash
# The demo: builds bulkhead and the test guest, then boots the guest under bulkhead with
# two vCPUs. (Isolated disks join the demo with the worker issues.)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_root"

ensure_packages
ensure_kvm
log "building bulkhead (release)"
cargo build --release --locked --bin bulkhead
log "building the test guest"
tests/guest/build-testguest.sh

log "booting the test guest under bulkhead (plan info, 2 vCPUs)"
set +e
time target/release/bulkhead run --kernel target/guest/testguest \
    --cmdline "testguest.plan=info" --vcpus 2 --mem 64 --timeout 60
rc=$?
set -e
log "bulkhead exited with status $rc (the guest's own status; 0 = success)"
exit $rc
