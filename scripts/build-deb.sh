#!/usr/bin/env bash
# Builds bulkhead's Debian package: both binaries (stripped), the man pages, shell
# completions for bash, zsh and fish, an example systemd unit and the example VM file.
#
# Usage: scripts/build-deb.sh [--bin-dir DIR] [--out DIR]
#   --bin-dir  where bulkhead and bulkhead-worker are (default: target/release, built here
#              with `cargo build --release` first)
#   --out      where the .deb goes (default: target/deb); its path is the last line printed
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Modes in the package are these, whatever the caller's umask.
umask 022

bin_dir=
out=target/deb
while [[ $# -gt 0 ]]; do
    case $1 in
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-deb: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
# Paths given are the caller's; from here on the repository's.
[[ -z $bin_dir ]] || bin_dir=$(realpath -- "$bin_dir")
mkdir -p "$out" && out=$(realpath -- "$out")
cd "$repo_root"
if [[ -z $bin_dir ]]; then
    log "building bulkhead and bulkhead-worker (release)"
    cargo build --release --locked --bin bulkhead --bin bulkhead-worker
    bin_dir=target/release
fi
for b in bulkhead bulkhead-worker; do
    [[ -x $bin_dir/$b ]] || { echo "build-deb: $bin_dir/$b is missing" >&2; exit 2; }
done
command -v dpkg-deb >/dev/null || { echo "build-deb: dpkg-deb is missing (apt-get install dpkg)" >&2; exit 2; }

version=$("$bin_dir/bulkhead" --version | awk '{print $2}')
arch=$(dpkg --print-architecture)
name=bulkhead_${version}_${arch}
root=$out/$name
rm -rf "$root"
mkdir -p "$root/DEBIAN" "$root/usr/bin" "$root/usr/share/man/man1" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d" "$root/lib/systemd/system" \
    "$root/usr/share/doc/bulkhead/examples"

# bulkhead finds its worker beside itself.
for b in bulkhead bulkhead-worker; do
    install -m 0755 "$bin_dir/$b" "$root/usr/bin/$b"
    strip --strip-unneeded "$root/usr/bin/$b"
done
bh=$root/usr/bin/bulkhead
"$bh" man >"$root/usr/share/man/man1/bulkhead.1"
for c in run policy ctl completions man; do
    "$bh" man "$c" >"$root/usr/share/man/man1/bulkhead-$c.1"
done
gzip -9n "$root"/usr/share/man/man1/*.1
"$bh" completions bash >"$root/usr/share/bash-completion/completions/bulkhead"
"$bh" completions zsh >"$root/usr/share/zsh/vendor-completions/_bulkhead"
"$bh" completions fish >"$root/usr/share/fish/vendor_completions.d/bulkhead.fish"
install -m 0644 packaging/bulkhead@.service "$root/lib/systemd/system/bulkhead@.service"
install -m 0644 examples/vm.json "$root/usr/share/doc/bulkhead/examples/vm.json"
cat >"$root/usr/share/doc/bulkhead/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: bulkhead

Files: *
Copyright: the bulkhead developers
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
# The shared libraries the binaries load, as Debian packages with their versions.
depends=$(cd "$root" && mkdir -p debian && touch debian/control &&
    dpkg-shlibdeps -O -e usr/bin/bulkhead -e usr/bin/bulkhead-worker 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p'; rm -rf debian)
[[ -n $depends ]] || depends="libc6 (>= 2.34), libgcc-s1 (>= 4.2)"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
    xargs -0 md5sum >DEBIAN/md5sums)
cat >"$root/DEBIAN/control" <<CONTROL
Package: bulkhead
Version: $version
Architecture: $arch
Maintainer: bulkhead developers <bulkhead@localhost>
Installed-Size: $size
Depends: $depends
Section: admin
Priority: optional
Description: KVM virtual machine monitor with sandboxed disk workers
 bulkhead boots Linux guests under KVM; each virtio-blk disk is served by its
 own exec'd, seccomp-confined worker process (vhost-user), restarted under a
 running guest if it dies. The VMM confines each of its own threads too.
CONTROL

dpkg-deb --root-owner-group -Zxz --build "$root" "$out/$name.deb" >/dev/null
log "built $out/$name.deb: bulkhead $(stat -c %s "$root/usr/bin/bulkhead") bytes, bulkhead-worker $(stat -c %s "$root/usr/bin/bulkhead-worker") bytes (stripped)"
echo "$out/$name.deb"
