#!/usr/bin/env bash
# Builds the bulkhead "Linux guest kit" from Debian packages:
#
#   target/guest/vmlinuz             bzImage of Debian's linux-image-cloud-amd64 (6.1)
#   target/guest/vmlinux             the same kernel as an uncompressed ELF (PVH entry note)
#   target/guest/initramfs.cpio.gz   busybox-static + virtio modules + /init
#   target/guest/l1-modules.cpio     KVM's modules (kvm-amd and what it needs) for the L1 of
#                                    the nested harness (tests/guest/nested.sh), appended to
#                                    initramfs.cpio.gz there: /lib/modules/nest/*.ko and
#                                    /etc/nest/modules (load order)
#   target/guest/debs/               the downloaded .deb files
#
# (target/guest is $BULKHEAD_GUEST_DIR when that is set, like tests::guest_dir().)
#
# Usage: tests/guest/guestkit.sh      (any cwd; as root on Debian 12; uses apt-get)
#
# Inputs: the candidate version of linux-image-cloud-amd64 (resolved to the versioned
# kernel package it depends on, e.g. linux-image-6.1.0-56-cloud-amd64), busybox-static,
# this script and tests/guest/guestkit-init. They are recorded in target/guest/guestkit.stamp;
# when nothing changed and all outputs exist the script prints "guest kit up to date".
# Runs `apt-get update` only when apt has no package lists at all; installs lz4, cpio,
# gzip and binutils (readelf) with apt-get when they are missing.
#
# The guest's /init (tests/guest/guestkit-init) mounts proc, sys and devtmpfs, insmods
# virtio, virtio_ring, virtio_mmio, virtio_pci (+ legacy/modern libs) and virtio_blk and
# their dependencies in dependency order, runs the command from the kernel command line with
# `sh -c`, prints `GUESTKIT done rc=N` (N = the command's exit status, 0 without a
# command), syncs and runs `poweroff -f` (QEMU with -no-reboot then exits).
#
# Passing the command on the kernel command line:
#   guestkit.run="dd if=/dev/vda of=/dev/null bs=4096 count=8 && echo ok"
#       The value is everything between the double quote right after `guestkit.run=` and
#       the next double quote. Linux keeps the quotes in /proc/cmdline; /init reads it
#       from there. The command itself therefore cannot contain a double quote. Spaces,
#       `|`, `&&`, `>`, `'`, `=` are fine (when you build the line in a shell, quote the
#       whole -append argument with single quotes).
#   guestkit.run=CMD
#       Short form for a command without spaces and quotes (e.g. guestkit.run=true).
#   guestkit.run64=BASE64
#       The command base64-encoded (standard alphabet, with padding): for commands that
#       contain double quotes or anything else awkward. Takes precedence over guestkit.run.
# Mind the kernel's command-line limit (2048 bytes on x86-64).
#
# Example (QEMU TCG):
#   qemu-system-x86_64 -accel tcg -M q35 -cpu max -smp 1 -m 512 -display none \
#     -serial stdio -no-reboot -kernel target/guest/vmlinuz \
#     -initrd target/guest/initramfs.cpio.gz \
#     -drive id=d0,file=disk.img,format=raw,if=none -device virtio-blk-pci,drive=d0 \
#     -append 'console=ttyS0 panic=-1 guestkit.run="dd if=/dev/vda bs=4096 count=8 | md5sum"'
#
# Notes: the kernel has CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES off, so it finds virtio-mmio
# devices only through ACPI (LNRO0005), not through `virtio_mmio.device=`.
# The package ships no modules.dep; the script generates one with busybox's depmod.

set -euo pipefail

KERNEL_META=linux-image-cloud-amd64
BUSYBOX_PKG=busybox-static
# Modules the guest needs (both transports + the block driver); their dependencies are
# added from modules.dep.
WANTED_MODULES=(virtio_mmio virtio_pci virtio_blk)
# What the nested harness's L1 loads on top to get a /dev/kvm (emulated SVM under QEMU TCG).
L1_MODULES=(kvm_amd)

log() { printf 'guestkit: %s\n' "$*"; }
die() {
	printf 'guestkit: ERROR: %s\n' "$*" >&2
	exit 1
}
trap 'rc=$?; printf "guestkit: ERROR: command failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT")
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
[[ -f $REPO/Cargo.toml && -d $REPO/tests ]] || die "cannot find the repository root above $SCRIPT_DIR"
INIT_SRC=$SCRIPT_DIR/guestkit-init
[[ -f $INIT_SRC ]] || die "missing $INIT_SRC (the guest's /init)"

OUT=${BULKHEAD_GUEST_DIR:-$REPO/target/guest}
DEBS=$OUT/debs
STAMP=$OUT/guestkit.stamp
VMLINUZ=$OUT/vmlinuz
VMLINUX=$OUT/vmlinux
INITRAMFS=$OUT/initramfs.cpio.gz
L1_MODULES_CPIO=$OUT/l1-modules.cpio

for tool in apt-get apt-cache apt-config dpkg-deb; do
	command -v "$tool" >/dev/null || die "needs $tool: this script runs on Debian (12) only"
done

as_root() {
	[[ $(id -u) == 0 ]] || die "'$*' needs root; run this script as root"
	"$@"
}

# --- apt package lists: update only when there are none at all ---------------------------
LISTS=
eval "$(apt-config shell LISTS Dir::State::Lists/d)"
LISTS=${LISTS:-/var/lib/apt/lists}
if [[ -z $(find "$LISTS" -maxdepth 1 -name '*_Packages*' 2>/dev/null) ]]; then
	log "apt has no package lists yet: running apt-get update"
	as_root apt-get update || die "apt-get update failed"
fi

# --- host tools ----------------------------------------------------------------------------
need_pkgs=()
for pair in lz4:lz4 cpio:cpio gzip:gzip readelf:binutils sha256sum:coreutils; do
	tool=${pair%%:*}
	command -v "$tool" >/dev/null || need_pkgs+=("${pair#*:}")
done
if ((${#need_pkgs[@]})); then
	log "installing missing host tools: ${need_pkgs[*]} (apt-get install)"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		"${need_pkgs[@]}" || die "apt-get install ${need_pkgs[*]} failed"
fi

# --- resolve package versions --------------------------------------------------------------
# apt-cache needs 1-2 s per call when apt keeps no binary cache (Debian container images),
# so the resolved versions are cached in $RESOLVED together with a fingerprint of apt's
# state (package lists, sources, preferences); they are only looked up again when that
# fingerprint changes.
RESOLVED=$OUT/guestkit.resolved
apt_paths=()
for p in "$LISTS" /etc/apt/sources.list /etc/apt/sources.list.d /etc/apt/preferences \
	/etc/apt/preferences.d; do
	if [[ -e $p ]]; then apt_paths+=("$p"); fi
done
apt_state=$(
	find "${apt_paths[@]}" -maxdepth 1 -type f \( -path '/etc/apt/*' -o -name '*_Packages*' \
		-o -name '*Release' \) -printf '%p %s %T@\n' 2>/dev/null |
		LC_ALL=C sort | sha256sum | cut -d' ' -f1
)
resolved=()
if [[ -f $RESOLVED ]]; then
	mapfile -t resolved <"$RESOLVED"
	if ((${#resolved[@]} != 5)) || [[ ${resolved[0]} != "apt-state $apt_state" ]]; then
		resolved=()
	fi
fi
if ((${#resolved[@]} == 5)); then
	meta_ver=${resolved[1]}
	kernel_pkg=${resolved[2]}
	kernel_ver=${resolved[3]}
	busybox_ver=${resolved[4]}
else
	# Candidate version of package $1 (empty if apt cannot install it).
	candidate() {
		apt-cache policy "$1" 2>/dev/null | sed -n 's/^  Candidate: //p' | grep -v '^(none)$' || true
	}
	# One call for both packages: the candidate versions' Package/Version/Depends fields.
	# (No pipeline here stops reading early: with pipefail a SIGPIPE would be a failure.)
	fields=$(apt-cache show --no-all-versions "$KERNEL_META" "$BUSYBOX_PKG" 2>/dev/null |
		sed -n 's/^\(Package\|Version\|Depends\): /\1 /p') ||
		die "apt-cache show $KERNEL_META $BUSYBOX_PKG failed: unknown packages? (check /etc/apt/sources.list; apt-get update)"
	meta_ver= meta_depends= busybox_ver= pkg=
	while read -r key value; do
		case $key in
		Package) pkg=$value ;;
		Version)
			if [[ $pkg == "$KERNEL_META" ]]; then meta_ver=$value; else busybox_ver=$value; fi
			;;
		Depends)
			if [[ $pkg == "$KERNEL_META" ]]; then meta_depends=$value; fi
			;;
		esac
	done <<<"$fields"
	[[ -n $meta_ver ]] || die "apt knows no installable $KERNEL_META (check /etc/apt/sources.list; apt-get update?)"
	[[ -n $busybox_ver ]] || die "apt knows no installable $BUSYBOX_PKG"
	# e.g. "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"
	dep=$(tr ',' '\n' <<<"$meta_depends" | sed -n 's/^ *\(linux-image-[0-9].*\)$/\1/p')
	dep=${dep%%$'\n'*}
	kernel_pkg=${dep%% *}
	[[ -n $kernel_pkg ]] || die "cannot resolve $KERNEL_META $meta_ver (Depends: $meta_depends) to a versioned linux-image package"
	if [[ $dep =~ \(=\ ([^\)]+)\) ]]; then
		kernel_ver=${BASH_REMATCH[1]}
	else
		kernel_ver=$(candidate "$kernel_pkg")
		[[ -n $kernel_ver ]] || die "apt has no candidate for $kernel_pkg"
	fi
	mkdir -p "$OUT"
	printf 'apt-state %s\n%s\n%s\n%s\n%s\n' "$apt_state" "$meta_ver" "$kernel_pkg" \
		"$kernel_ver" "$busybox_ver" >"$RESOLVED"
fi

script_hash=$(sha256sum "$SCRIPT" | cut -d' ' -f1)
init_hash=$(sha256sum "$INIT_SRC" | cut -d' ' -f1)
stamp_text="$KERNEL_META $meta_ver
$kernel_pkg $kernel_ver
$BUSYBOX_PKG $busybox_ver
guestkit.sh $script_hash
guestkit-init $init_hash"

print_outputs() {
	local f
	for f in "$VMLINUZ" "$VMLINUX" "$INITRAMFS" "$L1_MODULES_CPIO"; do
		printf '  %s (%s bytes)\n' "$f" "$(stat -c %s "$f")"
	done
}

if [[ -f $STAMP && -f $VMLINUZ && -f $VMLINUX && -f $INITRAMFS && -f $L1_MODULES_CPIO ]] &&
	[[ "$(cat "$STAMP")" == "$stamp_text" ]]; then
	log "guest kit up to date ($kernel_pkg $kernel_ver, $BUSYBOX_PKG $busybox_ver)"
	print_outputs
	exit 0
fi

log "building guest kit: $kernel_pkg $kernel_ver (from $KERNEL_META $meta_ver), $BUSYBOX_PKG $busybox_ver"
mkdir -p "$OUT" "$DEBS"
rm -f "$STAMP"

# --- download ------------------------------------------------------------------------------
# Prints the path of the .deb of package $1 version $2, downloading it if needed.
fetch_deb() {
	local pkg=$1 ver=$2 files
	# apt-get download names the file PKG_VERSION_ARCH.deb, with ':' (epoch) as %3a.
	find_debs() { compgen -G "$DEBS/${pkg}_${ver//:/%3a}_*.deb" || true; }
	files=$(find_debs)
	if [[ -z $files ]]; then
		rm -f "$DEBS/${pkg}"_*.deb
		local opts=()
		# As root apt would try to drop to _apt, which may not be able to write here.
		if [[ $(id -u) == 0 ]]; then
			opts=(-o APT::Sandbox::User=root)
		fi
		(cd "$DEBS" && apt-get "${opts[@]}" -q download "$pkg=$ver") >&2 ||
			die "apt-get download $pkg=$ver failed"
		files=$(find_debs)
		[[ -n $files ]] || die "apt-get download $pkg=$ver did not produce ${pkg}_*.deb in $DEBS"
	fi
	[[ $files != *$'\n'* ]] || die "several .deb files for $pkg $ver in $DEBS: $files"
	printf '%s\n' "$files"
}
kernel_deb=$(fetch_deb "$kernel_pkg" "$kernel_ver")
busybox_deb=$(fetch_deb "$BUSYBOX_PKG" "$busybox_ver")

WORK=$(mktemp -d "$OUT/.guestkit-work.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

log "extracting $(basename "$kernel_deb")"
dpkg-deb -x "$kernel_deb" "$WORK/kernel"
log "extracting $(basename "$busybox_deb")"
dpkg-deb -x "$busybox_deb" "$WORK/busybox"

# --- kernel: bzImage and uncompressed ELF ----------------------------------------------------
shopt -s nullglob
bzimages=("$WORK"/kernel/boot/vmlinuz-*)
shopt -u nullglob
((${#bzimages[@]} == 1)) || die "expected exactly one /boot/vmlinuz-* in $kernel_deb, found ${#bzimages[@]}"
bzimage=${bzimages[0]}
kver=${bzimage##*/vmlinuz-}
[[ -d $WORK/kernel/lib/modules/$kver ]] || die "no /lib/modules/$kver in $kernel_deb"

# Little-endian unsigned integer of $3 bytes at offset $2 of file $1.
le_uint() { od -An -t "u$3" -j "$2" -N "$3" "$1" | tr -d ' \n'; }

[[ $(od -An -c -j $((0x202)) -N 4 "$bzimage" | tr -d ' \n') == HdrS ]] ||
	die "$bzimage is not a bzImage (no HdrS boot protocol signature)"
setup_sects=$(le_uint "$bzimage" $((0x1f1)) 1)
if ((setup_sects == 0)); then setup_sects=4; fi
payload_offset=$(le_uint "$bzimage" $((0x248)) 4)
payload_length=$(le_uint "$bzimage" $((0x24c)) 4)
payload_start=$(((setup_sects + 1) * 512 + payload_offset))
((payload_length > 8)) || die "$bzimage: bad payload length $payload_length"

# The compressed payload is the kernel's compressed vmlinux followed by a 4-byte
# little-endian uncompressed size. Debian's 6.1 kernels use LZ4 (legacy frame, magic
# 02 21 4c 18); gzip and xz are handled too in case a later build changes it.
dd if="$bzimage" of="$WORK/payload" iflag=skip_bytes,count_bytes skip="$payload_start" \
	count="$payload_length" status=none
(($(stat -c %s "$WORK/payload") == payload_length)) || die "$bzimage is shorter than its header says"
expect_size=$(le_uint "$WORK/payload" $((payload_length - 4)) 4)
magic=$(od -An -tx1 -N 6 "$WORK/payload" | tr -d ' \n')
case $magic in
02214c18*)
	log "bzImage payload: LZ4 (legacy), $payload_length bytes at offset $payload_start"
	head -c -4 "$WORK/payload" | lz4 -qdc >"$WORK/vmlinux" || die "lz4 failed to decompress the kernel payload"
	;;
1f8b*)
	log "bzImage payload: gzip, $payload_length bytes at offset $payload_start"
	gzip -dc <"$WORK/payload" >"$WORK/vmlinux" 2>/dev/null || true
	;;
fd377a585a00)
	command -v xz >/dev/null || die "the kernel payload is xz: install xz-utils"
	log "bzImage payload: xz, $payload_length bytes at offset $payload_start"
	xz -dc --single-stream <"$WORK/payload" >"$WORK/vmlinux" 2>/dev/null || true
	;;
*) die "$bzimage: unsupported payload compression (first bytes $magic)" ;;
esac
got_size=$(stat -c %s "$WORK/vmlinux")
((got_size == expect_size)) ||
	die "decompressed kernel is $got_size bytes, the bzImage says $expect_size"
[[ $(od -An -c -N 4 "$WORK/vmlinux" | tr -d ' \n') == '177ELF' ]] ||
	die "decompressed kernel is not an ELF file"
# PVH entry: Xen ELF note type 0x12 (XEN_ELFNOTE_PHYS32_ENTRY).
notes=$(readelf -n "$WORK/vmlinux")
grep -Eq '^[[:space:]]*Xen[[:space:]]+0x[0-9a-f]+[[:space:]].*(\(0x0*12\)|PHYS32_ENTRY)' <<<"$notes" ||
	die "decompressed kernel has no PVH entry note (Xen note type 0x12)"
log "vmlinux: ELF, $got_size bytes, PVH entry note present"

# --- initramfs -------------------------------------------------------------------------------
moddir=$WORK/kernel/lib/modules/$kver
# Decompress modules busybox insmod might not read.
while IFS= read -r -d '' m; do
	case $m in
	*.ko.xz)
		command -v xz >/dev/null || die "modules are xz-compressed: install xz-utils"
		xz -dc "$m" >"${m%.xz}"
		;;
	*.ko.zst)
		command -v zstd >/dev/null || die "modules are zstd-compressed: install zstd"
		zstd -qdc "$m" >"${m%.zst}"
		;;
	*.ko.gz) gzip -dc "$m" >"${m%.gz}" ;;
	esac
	rm -f "$m"
done < <(find "$moddir/kernel" \( -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)

bb=$WORK/busybox/bin/busybox
[[ -x $bb ]] || die "no /bin/busybox in $busybox_deb"
# The package ships no modules.dep (depmod runs at install time): generate it.
"$bb" depmod -b "$WORK/kernel" "$kver" || die "busybox depmod failed"
[[ -s $moddir/modules.dep ]] || die "depmod produced no modules.dep"

declare -A dep_of=() path_of=() visited=()
while IFS= read -r line; do
	mpath=${line%%:*}
	name=${mpath##*/}
	name=${name%.ko}
	name=${name//-/_}
	path_of[$name]=$mpath
	dep_of[$name]=${line#*:}
done <"$moddir/modules.dep"

load_order=()
# Depth-first, dependencies before dependants.
visit() {
	local name=$1 d dn deps
	if [[ -n ${visited[$name]:-} ]]; then return 0; fi
	[[ -n ${path_of[$name]:-} ]] || die "module $name is not in $kernel_pkg's modules.dep"
	visited[$name]=1
	read -ra deps <<<"${dep_of[$name]}"
	for d in "${deps[@]}"; do
		dn=${d##*/}
		dn=${dn%.ko}
		visit "${dn//-/_}"
	done
	load_order+=("$name")
}
builtin_list=$moddir/modules.builtin
# Appends the modules $@ and their dependencies to load_order (built-in ones are skipped).
visit_wanted() {
	local m
	for m in "$@"; do
		if [[ -z ${path_of[$m]:-} ]] && grep -q "/${m}\.ko$" "$builtin_list" 2>/dev/null; then
			log "module $m is built into the kernel"
			continue
		fi
		visit "$m"
	done
}
visit_wanted "${WANTED_MODULES[@]}"

root=$WORK/initramfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc/guestkit,lib/modules/guestkit}
cp "$bb" "$root/bin/busybox"
while IFS= read -r applet; do
	if [[ $applet == bin/busybox || -e $root/$applet ]]; then continue; fi
	mkdir -p "$root/$(dirname "$applet")"
	ln -s /bin/busybox "$root/$applet"
done < <("$bb" --list-full)
[[ -L $root/bin/sh ]] || die "busybox has no sh applet"
: >"$root/etc/guestkit/modules"
for m in "${load_order[@]}"; do
	cp "$moddir/${path_of[$m]}" "$root/lib/modules/guestkit/$m.ko"
	printf '%s.ko\n' "$m" >>"$root/etc/guestkit/modules"
done
log "modules (load order): ${load_order[*]}"
printf '%s\n' "$kver" >"$root/etc/guestkit/kernel-release"
install -m 0755 "$INIT_SRC" "$root/init"
# A console node, so /init has stdout before it mounts devtmpfs (needs root).
if [[ $(id -u) == 0 ]]; then
	mknod -m 600 "$root/dev/console" c 5 1
fi
# Fixed owners, order and timestamps: the same inputs give the same archive.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet --reproducible -o -H newc -R 0:0) |
	gzip -9n >"$WORK/initramfs.cpio.gz"

# The L1 modules: their own small archive, so the L2 initramfs does not carry them.
load_order=()
visit_wanted "${L1_MODULES[@]}"
l1root=$WORK/l1-modules
mkdir -p "$l1root"/{lib/modules/nest,etc/nest}
: >"$l1root/etc/nest/modules"
for m in "${load_order[@]}"; do
	cp "$moddir/${path_of[$m]}" "$l1root/lib/modules/nest/$m.ko"
	printf '%s.ko\n' "$m" >>"$l1root/etc/nest/modules"
done
log "L1 modules (load order): ${load_order[*]}"
find "$l1root" -exec touch -h -d @0 {} +
(cd "$l1root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet --reproducible -o -H newc -R 0:0) \
	>"$WORK/l1-modules.cpio"

# --- install outputs -----------------------------------------------------------------------
mv -f "$WORK/vmlinux" "$VMLINUX"
cp -f "$bzimage" "$WORK/vmlinuz" && mv -f "$WORK/vmlinuz" "$VMLINUZ"
mv -f "$WORK/initramfs.cpio.gz" "$INITRAMFS"
mv -f "$WORK/l1-modules.cpio" "$L1_MODULES_CPIO"
printf '%s\n' "$stamp_text" >"$STAMP"

log "guest kit built: kernel $kver ($kernel_pkg $kernel_ver), $BUSYBOX_PKG $busybox_ver"
print_outputs
