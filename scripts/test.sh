#!/usr/bin/env bash
# The test command: installs what the tests need, builds the guests and the binaries,
# checks formatting and lints, then runs every test. Tests that boot guests or run QEMU
# run one at a time (nextest test group `guests`, .config/nextest.toml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_root"
started=$(date +%s)

ensure_packages
ensure_kvm
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

log "building"
cargo build --workspace --bins --locked

log "tests"
cargo nextest run --workspace --locked --profile ci "$@"
log "test command finished in $(( $(date +%s) - started )) s"
