#!/usr/bin/env bash
# Builds the freestanding test guest (its own cargo workspace) with the stable
# toolchain and copies it to <repo>/target/guest/testguest.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$repo/target/guest"

# Our own target dir: the guest must not share artefacts (or RUSTFLAGS-sensitive
# caches) with the host workspace.
export CARGO_TARGET_DIR="$out/build"
# Rustflags meant for host builds must not reach a freestanding link.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET

cargo build --release --locked --manifest-path "$here/testguest/Cargo.toml"
mkdir -p "$out"
cp "$CARGO_TARGET_DIR/release/testguest" "$out/testguest.tmp"
mv "$out/testguest.tmp" "$out/testguest"
echo "test guest: $out/testguest"
