#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a few seconds each, from the corpus in
# fuzz/corpus/: a smoke run for CI, so the targets keep building and the easy crashes
# show at once. Usage: scripts/fuzz-smoke.sh [SECONDS_PER_TARGET] (default 20).
# A longer run: cd fuzz && cargo +nightly fuzz run TARGET -- -max_total_time=600
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$repo_root"
secs="${1:-20}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    log "fuzzing needs the nightly toolchain (rustup toolchain install nightly); it is missing"
    exit 1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

cd fuzz
targets=$(cargo +nightly fuzz list)
log "building the fuzz targets: $(echo $targets)"
cargo +nightly fuzz build --sanitizer none
for t in $targets; do
    # New inputs go to target/, never into the committed seed corpus.
    work="$repo_root/target/fuzz-corpus/$t"
    mkdir -p "$work" "corpus/$t"
    log "fuzzing $t for $secs s"
    cargo +nightly fuzz run --sanitizer none "$t" "$work" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
        | grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE|==|SUMMARY|Crash|ERROR)' || true
    # A crash leaves an artifact; the run above then failed. (One glob at a time: `ls` of
    # several exits non-zero when any of them matches nothing, which once hid a crash.)
    found=""
    for kind in crash leak oom timeout; do
        if compgen -G "artifacts/$t/$kind-*" >/dev/null; then
            found=1
        fi
    done
    if [ -n "$found" ]; then
        log "fuzz target $t found a failing input: fuzz/artifacts/$t"
        exit 1
    fi
done
log "fuzz smoke run done"
