# Shared by scripts/demo.sh and scripts/test.sh. Sourced, not run.

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Debian packages the demo and the tests need (RECIPES.md).
DEB_PACKAGES=(qemu-system-x86 qemu-utils nbdkit busybox-static cpio lz4 gzip acpica-tools fio strace binutils curl)

log() { printf '==> %s\n' "$*" >&2; }

# Installs whichever of DEB_PACKAGES are missing, refreshing the package lists first.
# Checked again afterwards: installing one package can remove another (a backports
# qemu-utils goes when Debian 12's qemu-system-x86 comes in), which a second pass brings back.
missing_packages() {
    local p
    for p in "${DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}

ensure_packages() {
    local missing pass
    export DEBIAN_FRONTEND=noninteractive
    for pass in 1 2; do
        mapfile -t missing < <(missing_packages)
        if [ ${#missing[@]} -eq 0 ]; then
            return 0
        fi
        log "installing Debian packages: ${missing[*]}"
        [ "$pass" = 1 ] && apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    done
    mapfile -t missing < <(missing_packages)
    if [ ${#missing[@]} -ne 0 ]; then
        log "cannot install Debian packages: ${missing[*]}"
        return 1
    fi
}

# promtool (Debian's prometheus package), which checks /metrics in the tests: taken out of
# the package rather than installed, so no Prometheus server is set up on the machine.
PROMTOOL="$repo_root/target/tools/promtool"
ensure_promtool() {
    [ -x "$PROMTOOL" ] && return 0
    local tmp
    tmp=$(mktemp -d)
    log "fetching promtool (Debian package prometheus)"
    (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null || { apt-get update -qq && apt-get download -qq prometheus; })
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
    mkdir -p "$(dirname "$PROMTOOL")"
    install -m 0755 "$tmp/root/usr/bin/promtool" "$PROMTOOL"
    rm -rf "$tmp"
}

ensure_kvm() {
    if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
        echo "error: /dev/kvm is missing or not accessible: bulkhead needs KVM" >&2
        return 1
    fi
}

# Makes sure at least $1 2 MiB huge pages are free (guest RAM with --hugepages), growing
# the pool (vm.nr_hugepages) by what is missing.
ensure_huge_pages() {
    local want=$1 dir=/sys/kernel/mm/hugepages/hugepages-2048kB
    local free total
    free=$(cat "$dir/free_hugepages" 2>/dev/null || echo 0)
    if [ "$free" -ge "$want" ]; then
        return 0
    fi
    total=$(cat "$dir/nr_hugepages" 2>/dev/null || echo 0)
    log "reserving $((want - free)) more 2 MiB huge pages (vm.nr_hugepages=$((total + want - free)))"
    echo $((total + want - free)) > "$dir/nr_hugepages" || {
        echo "error: cannot reserve huge pages: run as root, or set vm.nr_hugepages yourself" >&2
        return 1
    }
}
