#!/usr/bin/env bash
# The test command: installs what the tests need, builds the guests and the binaries,
# checks formatting and lints, then runs every test. Tests that boot guests or run QEMU
# run one at a time (nextest test group `guests`, .config/nextest.toml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_root"
started=$(date +%s)

ensure_packages
ensure_promtool
ensure_kvm
ensure_huge_pages 64
if ! command -v cargo-nextest >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
fi

log "building the test guest"
tests/guest/build-testguest.sh
log "building the Linux guest kit"
tests/guest/guestkit.sh

log "formatting and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p device-workers --features test-hooks --all-targets --target-dir target/hooks --locked -- -D warnings

log "building"
cargo build --workspace --bins --locked
# The worker with test-only fault hooks, in its own target dir: feature unification
# must never switch the hooks on in the build above (a test checks it has none).
cargo build -p device-workers --features test-hooks --target-dir target/hooks --locked
export BULKHEAD_BIN="$repo_root/target/debug/bulkhead"
export BULKHEAD_WORKER_BIN="$repo_root/target/debug/bulkhead-worker"
export BULKHEAD_BENCH_BIN="$repo_root/target/debug/bulkhead-bench"
export BULKHEAD_WORKER_HOOKS_BIN="$repo_root/target/hooks/debug/bulkhead-worker"
export BULKHEAD_PROMTOOL="$PROMTOOL"

log "tests"
cargo nextest run --workspace --locked --profile ci "$@"
log "test command finished in $(( $(date +%s) - started )) s"
