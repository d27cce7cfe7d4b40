#!/usr/bin/env bash
# The demo: builds bulkhead, its worker and the test guest, then boots the guest under
# bulkhead with 2 vCPUs and an isolated disk: a sandboxed bulkhead-worker serves it, the
# VMM prints the worker's pid and sandbox facts, and the guest writes a seeded pattern
# across the disk, reads it back and verifies it (plus flush, discard, write-zeroes).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_root"

ensure_packages
ensure_kvm
log "building bulkhead and bulkhead-worker (release)"
cargo build --release --locked --bin bulkhead --bin bulkhead-worker
log "building the test guest"
tests/guest/build-testguest.sh

mkdir -p target/demo
rm -f target/demo/disk.img
truncate -s 16M target/demo/disk.img
log "booting the test guest under bulkhead: 2 vCPUs, one disk served by a sandboxed worker"
set +e
time target/release/bulkhead run --kernel target/guest/testguest \
    --cmdline "testguest.plan=blk-verify qd=32" --vcpus 2 --mem 64 \
    --disk path=target/demo/disk.img,id=demo,serial=bulkhead-demo --timeout 60
rc=$?
set -e
log "bulkhead exited with status $rc (the guest's own status; 0 = verified)"
exit $rc
