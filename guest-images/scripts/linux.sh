#!/usr/bin/env bash
# Builds the unmodified-Linux guest from Debian packages only.
#
#   linux.sh kernel                 Debian's linux-image-cloud-amd64, unmodified
#                                   -> out/vmlinuz (bzImage), out/vmlinux (ELF), out/modules/<kver>/
#   linux.sh linux [--add PATH]...  kernel + out/initrd.img + out/rootfs.ext4
#
# Called by guest-images/build.sh. Needs root (apt-get). Outputs in guest-images/out/,
# downloads and unpacked packages in guest-images/cache/ (both gitignored).
# Idempotent: a second run reuses the cached .debs and skips steps whose output is current.
set -euo pipefail

GI=$(cd "$(dirname "$0")/.." && pwd)
SCRIPTS=$GI/scripts
OUT=$GI/out
CACHE=$GI/cache
DEBS=$CACHE/debs
KMETA=linux-image-cloud-amd64
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

T0=$(date +%s)
step() { printf '==> [%4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
info() { printf '    %s\n' "$*" >&2; }
die()  { printf 'linux.sh: error: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || printf "linux.sh: FAILED (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' EXIT

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (apt-get download/install)"; }

APT_UPDATED=0
apt_update_once() {
    [ $APT_UPDATED = 1 ] && return 0
    step "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    APT_UPDATED=1
}

# need_tool CMD PKG: install PKG (Debian) if CMD is missing.
need_tool() {
    command -v "$1" >/dev/null 2>&1 && return 0
    step "installing $2 (for $1)"
    apt-get install -y -qq --no-install-recommends "$2" >/dev/null 2>&1 || {
        apt_update_once
        apt-get install -y -qq --no-install-recommends "$2" >/dev/null || die "cannot install $2"
    }
    command -v "$1" >/dev/null 2>&1 || die "$2 installed but $1 still missing"
}

# meta_dep META: the linux-image-* package a meta package depends on.
meta_dep() {
    local p
    p=$(apt-cache depends "$1" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
    if [ -z "$p" ]; then
        apt_update_once
        p=$(apt-cache depends "$1" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
    fi
    [ -n "$p" ] || die "apt-cache finds no linux-image-* dependency of $1"
    echo "$p"
}

# fetch_deb PKG: prints the path of PKG's .deb in the cache, downloading it if absent.
fetch_deb() {
    local pkg=$1 ver f
    ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/{print $2; exit}')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || { apt_update_once; ver=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2; exit}'); }
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no installable version of $pkg"
    mkdir -p "$DEBS"
    # dpkg file names encode ':' in epochs as %3a
    f=$(ls "$DEBS/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$f" ]; then
        info "downloading $pkg $ver"
        (cd "$DEBS" && apt-get download -q "$pkg=$ver" >/dev/null 2>"$DEBS/.err.$pkg") \
            || { cat "$DEBS/.err.$pkg" >&2; die "apt-get download $pkg failed"; }
        rm -f "$DEBS/.err.$pkg"
        f=$(ls "$DEBS/${pkg}_${ver//:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
        [ -n "$f" ] || die "downloaded $pkg but cannot find its .deb in $DEBS"
    fi
    echo "$f"
}

# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------
KVER=
build_kernel() {
    need_root
    local pkg deb dir vmlinuz
    step "kernel: resolving $KMETA"
    pkg=$(meta_dep "$KMETA")
    KVER=${pkg#linux-image-}
    info "$KMETA -> $pkg (kernel $KVER)"
    deb=$(fetch_deb "$pkg")
    info "package: $deb"
    dir=$CACHE/kernel/$KVER
    if [ ! -f "$dir/.unpacked" ] || [ "$deb" -nt "$dir/.unpacked" ]; then
        step "kernel: dpkg -x $(basename "$deb")"
        rm -rf "$dir"; mkdir -p "$dir"
        dpkg -x "$deb" "$dir" || die "dpkg -x $deb failed"
        touch "$dir/.unpacked"
    fi
    vmlinuz=$dir/boot/vmlinuz-$KVER
    [ -f "$vmlinuz" ] || die "$vmlinuz not in the package"
    [ -d "$dir/lib/modules/$KVER" ] || die "modules tree lib/modules/$KVER not in the package"

    mkdir -p "$OUT"
    if [ -f "$OUT/vmlinux" ] && [ -f "$OUT/kernel.version" ] && [ "$(cat "$OUT/kernel.version")" = "$KVER" ] \
        && cmp -s "$vmlinuz" "$OUT/vmlinuz" && [ -d "$OUT/modules/$KVER" ] && [ "$OUT/vmlinux" -nt "$OUT/vmlinuz" ]; then
        step "kernel: out/ is current ($KVER), nothing to do"
    else
        step "kernel: out/vmlinuz (unmodified bzImage)"
        cp "$vmlinuz" "$OUT/vmlinuz.tmp" && mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
        step "kernel: extracting ELF vmlinux from the bzImage"
        need_tool xz xz-utils
        need_tool zstd zstd
        need_tool lz4 lz4
        /usr/bin/python3 "$SCRIPTS/linux-extract-vmlinux.py" "$OUT/vmlinuz" "$OUT/vmlinux" >&2 \
            || die "could not extract vmlinux from $vmlinuz"
        head -c4 "$OUT/vmlinux" | cmp -s - <(printf '\177ELF') || die "out/vmlinux is not an ELF file"
        step "kernel: out/modules/$KVER"
        rm -rf "$OUT/modules"; mkdir -p "$OUT/modules"
        cp -a "$dir/lib/modules/$KVER" "$OUT/modules/$KVER"
        # modules.dep etc. are not shipped in the .deb (the postinst runs depmod): make them here.
        if [ ! -f "$OUT/modules/$KVER/modules.dep" ]; then
            need_tool depmod kmod
            depmod_tree "$OUT/modules/$KVER"
        fi
        [ -f "$OUT/modules/$KVER/modules.dep" ] || die "no modules.dep for $KVER"
        cp "$dir/boot/config-$KVER" "$OUT/config" 2>/dev/null || true
        echo "$KVER" > "$OUT/kernel.version"
    fi
    if command -v file >/dev/null; then info "vmlinux: $(file -b "$OUT/vmlinux" | cut -c1-100)"; fi
    info "vmlinuz: $(stat -c %s "$OUT/vmlinuz") bytes, vmlinux: $(stat -c %s "$OUT/vmlinux") bytes, kernel $KVER"
}

# depmod_tree DIR: runs depmod on a modules tree DIR (= .../<kver>) outside /lib/modules
# (bookworm's kmod has no --moduledir): through a temporary base with lib/modules/<kver> -> DIR.
depmod_tree() {
    local mdir=$1 tmp
    tmp=$(mktemp -d)
    mkdir -p "$tmp/lib/modules"
    ln -s "$mdir" "$tmp/lib/modules/$KVER"
    depmod -b "$tmp" "$KVER" || die "depmod failed"
    rm -rf "$tmp"
}

# ---------------------------------------------------------------------------------------------
usage() { echo "usage: linux.sh kernel | linux [--add PATH]..." >&2; exit 2; }
cmd=${1:-}; [ $# -gt 0 ] && shift
case "$cmd" in
    kernel) [ $# -eq 0 ] || usage; build_kernel ;;
    linux) build_kernel; build_linux "$@" ;;
    *) usage ;;
esac
step "done"
