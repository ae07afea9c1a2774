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
REPORTED=0
die()  { printf 'linux.sh: error: %s\n' "$*" >&2; REPORTED=1; exit 1; }
# an unexpected failure (set -e) names the command that failed
trap 'rc=$?; [ $rc -eq 0 ] || [ $REPORTED = 1 ] || printf "linux.sh: FAILED (exit %s): %s\n" "$rc" "$BASH_COMMAND" >&2' EXIT

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
# linux: initramfs + root filesystem
# ---------------------------------------------------------------------------------------------
# Root filesystem packages (Debian bookworm); their Depends/Pre-Depends closure is added by apt.
ROOT_PKGS="busybox-static fio memcached redis-server redis-tools libmemcached-tools"
# Initramfs modules (the cloud kernel has ext4, jbd2, mbcache, crc16, crc32c built in and they
# are skipped; modules.dep adds what these need, e.g. failover/net_failover for virtio_net).
INITRD_MODS="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio virtio_blk virtio_net ext4 jbd2 mbcache crc16 crc32c_generic crc32c-intel"
ROOTFS_EXTRA_MB=${ROOTFS_EXTRA_MB:-768}   # free space in rootfs.ext4 (fio's test file, redis, logs)

# download_closure PKGS...: downloads PKGS and their dependency closure into $DEBS and prints the
# .deb paths. apt resolves against an empty dpkg status (nothing counts as installed), so the
# closure is complete; Recommends and Suggests are left out.
download_closure() {
    local st=$CACHE/apt-empty-status list p v f
    mkdir -p "$DEBS/partial"; : > "$st"
    local aptopts=(-o "Dir::State::status=$st" -o "Dir::Cache::archives=$DEBS" -o Debug::NoLocking=1
                   -o APT::Install-Recommends=false -o APT::Install-Suggests=false)
    # "Inst NAME (VERSION REPO [ARCH])" -> "NAME VERSION"
    list=$(apt-get -s "${aptopts[@]}" install "$@" 2>"$CACHE/apt.err" | awk '/^Inst /{sub(/^\(/, "", $3); print $2, $3}') || true
    if [ -z "$list" ]; then
        apt_update_once
        list=$(apt-get -s "${aptopts[@]}" install "$@" 2>"$CACHE/apt.err" | awk '/^Inst /{sub(/^\(/, "", $3); print $2, $3}') || true
    fi
    [ -n "$list" ] || { cat "$CACHE/apt.err" >&2; die "apt cannot resolve the closure of: $*"; }
    info "closure of $*: $(echo "$list" | wc -l) packages"
    apt-get -q -y --download-only "${aptopts[@]}" install "$@" >"$CACHE/apt.log" 2>&1 || {
        tail -n 20 "$CACHE/apt.log" >&2; die "apt-get --download-only failed (log: $CACHE/apt.log)"; }
    echo "$list" | while read -r p v; do
        f=$(ls "$DEBS/${p}_${v//:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
        [ -n "$f" ] || die "closure package $p $v not in $DEBS after download"
        echo "$f"
    done
    [ "$(echo "$list" | wc -l)" -gt 0 ]
}

# module_closure MODDIR NAMES...: module paths (relative to MODDIR) in load order, dependencies
# first; names that are built in or absent are skipped.
module_closure() {
    /usr/bin/python3 "$SCRIPTS/linux-modclosure.py" "$@"
}

build_initrd() {
    local mdir=$OUT/modules/$KVER bbdeb bbdir ir stamp mods m
    step "initramfs: busybox-static and the kernel's virtio modules"
    bbdeb=$(fetch_deb busybox-static)
    stamp=$( { printf '%s\n' "$KVER" "$bbdeb" "$INITRD_MODS"; cat "$SCRIPTS/linux-initramfs-init.sh" "$0"; } | sha256sum | cut -c1-16)
    if [ -f "$OUT/initrd.img" ] && [ "$(cat "$OUT/.initrd.stamp" 2>/dev/null)" = "$stamp" ]; then
        info "out/initrd.img is current"; return 0
    fi
    bbdir=$CACHE/busybox-static
    ir=$CACHE/initramfs
    rm -rf "${bbdir:?}" "${ir:?}"
    mkdir -p "$bbdir"; dpkg -x "$bbdeb" "$bbdir"
    mkdir -p "$ir"/{bin,sbin,etc,proc,sys,dev,newroot,tmp,lib/modules,usr/bin,usr/sbin}
    cp "$bbdir/bin/busybox" "$ir/bin/busybox"
    mods=$(module_closure "$mdir" $INITRD_MODS) || die "module resolution failed"
    : > "$ir/etc/vnode-modules"
    for m in $mods; do
        cp "$mdir/$m" "$ir/lib/modules/"
        basename "$m" .ko >> "$ir/etc/vnode-modules"
    done
    info "modules (load order): $(tr '\n' ' ' < "$ir/etc/vnode-modules")"
    install -m 0755 "$SCRIPTS/linux-initramfs-init.sh" "$ir/init"
    mknod -m 600 "$ir/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$ir/dev/null" c 1 3 2>/dev/null || true
    step "initramfs: cpio + gzip -> out/initrd.img"
    (cd "$ir" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -9 -n) > "$OUT/initrd.img.tmp" \
        || die "cpio/gzip failed"
    mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
    echo "$stamp" > "$OUT/.initrd.stamp"
    info "out/initrd.img: $(stat -c %s "$OUT/initrd.img") bytes"
}

# add_binary ROOT PATH: copies PATH to ROOT/usr/local/bin and the shared libraries it needs
# (ldd on this host) to the same paths in ROOT, unless ROOT has them already.
add_binary() {
    local root=${1:?} src=$2 lib n=0
    [ -f "$src" ] && [ -x "$src" ] || die "--add $src: not an executable file"
    if ldd "$src" 2>/dev/null | grep -q 'not found'; then
        die "--add $src: ldd reports missing libraries: $(ldd "$src" | grep 'not found' | tr '\n' ' ')"
    fi
    install -m 0755 "$src" "$root/usr/local/bin/$(basename "$src")"
    if ldd "$src" >/dev/null 2>&1; then
        for lib in $(ldd "$src" | awk '/=> \//{print $3} /^[ \t]*\/[^ ]+ \(/{print $1}'); do
            [ -e "$root$lib" ] && continue
            # merged /usr on one side, not on the other: the library may be there under the other name
            [ -e "$root/usr$lib" ] || [ -e "$root${lib#/usr}" ] && continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"; n=$((n + 1))
        done
    fi
    info "added $(basename "$src") -> /usr/local/bin ($n shared libraries copied)"
}

build_rootfs() {
    local adds=("$@") debs stamp tree d size_mb a ap b missing=
    step "rootfs: resolving and downloading $ROOT_PKGS (+ dependency closure)"
    debs=$(download_closure $ROOT_PKGS)
    stamp=$( { printf '%s\n' "$KVER" $debs; cat "$SCRIPTS/linux-guest-init.sh" "$0";
               for a in ${adds[@]+"${adds[@]}"}; do echo "$a"; cat "$a"; done; } | sha256sum | cut -c1-16)
    if [ -f "$OUT/rootfs.ext4" ] && [ "$(cat "$OUT/.rootfs.stamp" 2>/dev/null)" = "$stamp" ]; then
        info "out/rootfs.ext4 is current (delete it to rebuild; note that guests write to it)"; return 0
    fi
    tree=$CACHE/rootfs
    [ -n "$CACHE" ] && [ "$tree" != / ] || die "bad rootfs tree path"
    step "rootfs: dpkg -x $(echo "$debs" | wc -l) packages into cache/rootfs"
    rm -rf "${tree:?}"; mkdir -p "$tree"
    for d in $debs; do dpkg -x "$d" "$tree" || die "dpkg -x $d failed"; done
    mkdir -p "$tree/etc/vnode/jobs"
    echo "$debs" | xargs -n1 basename | sed 's/\.deb$//' > "$tree/etc/vnode/packages"

    step "rootfs: configuring (busybox applets, users, init, modules, ld.so.cache)"
    mkdir -p "$tree"/{proc,sys,dev,run,tmp,root,var/tmp,var/log,mnt,usr/local/bin,sbin,bin}
    chmod 1777 "$tree/tmp" "$tree/var/tmp"
    # busybox applets where no package provides the command
    for ap in $("$tree/bin/busybox" --list-full); do
        case "$ap" in linuxrc|sbin/init|init) continue ;; esac
        if [ -e "$tree/$ap" ] || [ -L "$tree/$ap" ] || [ -e "$tree/usr/$ap" ] || [ -e "$tree/${ap#usr/}" ]; then continue; fi
        mkdir -p "$tree/$(dirname "$ap")"
        ln -s /bin/busybox "$tree/$ap"
    done
    [ -e "$tree/bin/sh" ] || ln -s busybox "$tree/bin/sh"
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin' \
        'memcache:x:100:101:memcached:/nonexistent:/usr/sbin/nologin' 'redis:x:101:102:redis:/var/lib/redis:/usr/sbin/nologin' \
        'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin' > "$tree/etc/passwd"
    printf '%s\n' 'root:x:0:' 'daemon:x:1:' 'memcache:x:101:' 'redis:x:102:' 'nogroup:x:65534:' > "$tree/etc/group"
    printf 'root::0:0:99999:7:::\n' > "$tree/etc/shadow"; chmod 640 "$tree/etc/shadow"
    echo vnode-guest > "$tree/etc/hostname"
    printf '127.0.0.1\tlocalhost vnode-guest\n::1\tlocalhost\n' > "$tree/etc/hosts"
    printf '/dev/vda\t/\text4\trw,noatime\t0 1\n' > "$tree/etc/fstab"
    [ -e "$tree/etc/nsswitch.conf" ] || printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files\n' > "$tree/etc/nsswitch.conf"
    rm -f "$tree/sbin/init"
    install -m 0755 "$SCRIPTS/linux-guest-init.sh" "$tree/sbin/init"
    mkdir -p "$tree/lib/modules"
    cp -a "$OUT/modules/$KVER" "$tree/lib/modules/$KVER"
    for a in ${adds[@]+"${adds[@]}"}; do add_binary "$tree" "$a"; done
    ldconfig -r "$tree" 2>/dev/null || info "ldconfig -r failed (libraries in the default paths still load)"
    # every program the jobs use must be there and start inside the tree
    for b in usr/bin/fio usr/bin/memcached usr/bin/redis-server usr/bin/redis-benchmark usr/bin/redis-cli usr/bin/memcaslap; do
        if [ ! -x "$tree/$b" ]; then missing="$missing $b"; continue; fi
        chroot "$tree" "/$b" --version >/dev/null 2>&1 || chroot "$tree" "/$b" -V >/dev/null 2>&1 \
            || info "warning: /$b --version fails in a chroot of the tree"
    done
    [ -z "$missing" ] || die "rootfs lacks:$missing"

    size_mb=$(( $(du -sm "$tree" | cut -f1) * 12 / 10 + ROOTFS_EXTRA_MB ))
    step "rootfs: mkfs.ext4 -d (${size_mb} MiB, sparse) -> out/rootfs.ext4"
    rm -f "$OUT/rootfs.ext4.tmp"
    truncate -s "${size_mb}M" "$OUT/rootfs.ext4.tmp"
    mkfs.ext4 -q -F -L vnode-root -m 0 -E root_owner=0:0 -d "$tree" "$OUT/rootfs.ext4.tmp" \
        || die "mkfs.ext4 -d failed"
    e2fsck -fn "$OUT/rootfs.ext4.tmp" >/dev/null 2>&1 || die "e2fsck finds errors in the new image"
    mv "$OUT/rootfs.ext4.tmp" "$OUT/rootfs.ext4"
    echo "$stamp" > "$OUT/.rootfs.stamp"
    info "out/rootfs.ext4: ${size_mb} MiB ($(du -m "$OUT/rootfs.ext4" | cut -f1) MiB allocated), $(echo "$debs" | wc -l) packages"
}

build_linux() {
    local adds=() a
    while [ $# -gt 0 ]; do
        case "$1" in
            --add) [ $# -ge 2 ] || usage; adds+=("$(readlink -f "$2" || echo "$2")"); shift 2 ;;
            --add=*) adds+=("$(readlink -f "${1#--add=}" || echo "${1#--add=}")"); shift ;;
            *) usage ;;
        esac
    done
    for a in ${adds[@]+"${adds[@]}"}; do
        [ -f "$a" ] && [ -x "$a" ] || die "--add $a: not an executable file"
    done
    need_tool cpio cpio
    need_tool mkfs.ext4 e2fsprogs
    build_initrd
    build_rootfs ${adds[@]+"${adds[@]}"}
    step "linux: outputs"
    ls -l "$OUT"/vmlinux "$OUT"/vmlinuz "$OUT"/initrd.img "$OUT"/rootfs.ext4 | sed 's/^/    /' >&2
}

# ---------------------------------------------------------------------------------------------
usage() { echo "usage: linux.sh kernel | linux [--add PATH]..." >&2; REPORTED=1; exit 2; }
cmd=${1:-}; [ $# -gt 0 ] && shift
# one build at a time (two builders would share cache/ and out/)
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -n 9 || { echo "linux.sh: another build holds $CACHE/.lock, waiting" >&2; flock 9; }
case "$cmd" in
    kernel) [ $# -eq 0 ] || usage; build_kernel ;;
    linux) build_kernel; build_linux "$@" ;;
    *) usage ;;
esac
step "done"
