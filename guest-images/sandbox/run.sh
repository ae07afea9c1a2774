#!/usr/bin/env bash
# The hardware-virtualization sandbox: runs a command where /dev/kvm is hardware-style (SVM + NPT).
#
#   guest-images/sandbox/run.sh [options] -- CMD ARGS...
#   guest-images/sandbox/run.sh --build          only prepare the L1 kernel and initramfs
#
# L1 is QEMU in TCG mode emulating an AMD EPYC with SVM and nested paging, running Debian's
# generic kernel (linux-image-amd64, unmodified; its ELF, started through the PVH entry) with
# kvm-amd loaded. The host's root directory is
# shared read-only over 9p and CMD runs chrooted in it, in the caller's working directory, so any
# host binary (vnode, qemu-system-x86_64, ...) runs there as it is. Directories given with --share
# (and a private run directory) are shared writable, at the same paths, so results come back.
# CMD's stdout and stderr come back on run.sh's stdout and stderr (streamed), and run.sh exits with
# CMD's exit status; 125 when the sandbox itself failed (L1 did not come up or crashed), 124 on
# timeout.
#
# Options:
#   --mem SIZE      L1 memory, QEMU syntax (default 4G; L2 guests and their servers live in it)
#   --smp N         L1 vCPUs (default 1; N>1 uses N host threads: the host has 2 cores, shared)
#   --share DIR     share DIR writable at the same path (repeatable). The current directory is
#                   NOT writable unless shared. Host /tmp is visible read-only; TMPDIR is a tmpfs.
#   --env NAME=VAL  set an environment variable for CMD (repeatable); PATH, HOME, TERM, LANG,
#                   RUST_LOG, RUST_BACKTRACE and VNODE_* are passed through from the caller
#   --timeout SEC   kill L1 after SEC seconds (default 1800)
#   --console FILE  also keep L1's serial console log in FILE
#   -v              show progress and L1's console on stderr;  -q  no timing summary
#
# Inside: /dev/kvm, /proc, /sys, /dev/pts, /dev/shm, a tmpfs /run (TMPDIR=/run/tmp), loopback up.
# No network beyond loopback (the tun module is loaded: a command may make TAP devices, e.g. for
# vnode --net). The host root is read-only: write only into shared directories.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
GI=$(cd "$HERE/.." && pwd)
CACHE=$GI/cache
SB=$CACHE/sandbox
DEBS=$CACHE/debs
export LC_ALL=C

MEM=4G SMP=1 TIMEOUT=1800 VERBOSE=0 QUIET=0 CONSOLE= BUILD_ONLY=0
SHARES=() ENVS=()
usage() { sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//; /^set -e/d' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --mem) MEM=${2:?}; shift 2 ;;
        --smp) SMP=${2:?}; shift 2 ;;
        --share) SHARES+=("$(readlink -f "${2:?}")"); shift 2 ;;
        --env) ENVS+=("${2:?}"); shift 2 ;;
        --timeout) TIMEOUT=${2:?}; shift 2 ;;
        --console) CONSOLE=${2:?}; shift 2 ;;
        --build) BUILD_ONLY=1; shift ;;
        -v) VERBOSE=1; shift ;;
        -q) QUIET=1; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        *) echo "run.sh: unknown option $1 (the command goes after --)" >&2; usage ;;
    esac
done
[ $BUILD_ONLY = 1 ] || [ $# -gt 0 ] || usage

T0=$(date +%s%N)
ms() { echo $(( ($(date +%s%N) - T0) / 1000000 )); }
log() { [ $VERBOSE = 1 ] && echo "sandbox: [$(ms) ms] $*" >&2 || true; }
die() { echo "sandbox: error: $*" >&2; exit 125; }

# ---------------------------------------------------------------------------------------------
# L1 kernel + initramfs (built once, cached in guest-images/cache/sandbox)
# ---------------------------------------------------------------------------------------------
L1_MODS="virtio_pci virtio_net 9p 9pnet_virtio kvm kvm_amd tun"
build_l1() {
    local pkg kver deb kdir bbdeb ir stamp mods m
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (apt-get install -y --no-install-recommends qemu-system-x86)"
    # Fast path (no apt-cache call): L1 is prepared and our files have not changed since.
    # --build looks the kernel package up again and rebuilds when Debian has a newer one.
    local fstamp
    fstamp=$( { cat "$HERE/l1-init.sh" "$GI/scripts/linux-modclosure.py" "$GI/scripts/linux-extract-vmlinux.py"; echo "$L1_MODS"; } | sha256sum | cut -c1-16)
    if [ $BUILD_ONLY = 0 ] && [ -f "$SB/initrd.img" ] && [ "$(cat "$SB/fstamp" 2>/dev/null)" = "$fstamp" ]; then
        return 0
    fi
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
    if [ -z "$pkg" ]; then apt-get update -qq >&2 || true
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'); fi
    [ -n "$pkg" ] || die "apt-cache finds no image package for linux-image-amd64"
    kver=${pkg#linux-image-}
    stamp=$( { echo "$pkg pvh"; cat "$HERE/l1-init.sh" "$GI/scripts/linux-modclosure.py"; echo "$L1_MODS"; } | sha256sum | cut -c1-16)
    if [ -f "$SB/vmlinuz" ] && [ -f "$SB/initrd.img" ] && [ "$(cat "$SB/stamp" 2>/dev/null)" = "$stamp" ]; then
        echo "$fstamp" > "$SB/fstamp"
        return 0
    fi
    echo "sandbox: preparing L1 ($pkg, busybox-static) in $SB" >&2
    mkdir -p "$DEBS" "$SB"
    deb=$(ls "$DEBS/${pkg}_"*.deb 2>/dev/null | head -n1 || true)
    [ -n "$deb" ] || { (cd "$DEBS" && apt-get download -q "$pkg" >/dev/null) || die "apt-get download $pkg failed"; deb=$(ls "$DEBS/${pkg}_"*.deb | head -n1); }
    bbdeb=$(ls "$DEBS/busybox-static_"*.deb 2>/dev/null | head -n1 || true)
    [ -n "$bbdeb" ] || { (cd "$DEBS" && apt-get download -q busybox-static >/dev/null) || die "apt-get download busybox-static failed"; bbdeb=$(ls "$DEBS/busybox-static_"*.deb | head -n1); }
    kdir=$SB/kernel
    rm -rf "${kdir:?}" "$SB/bb"; mkdir -p "$kdir" "$SB/bb"
    dpkg -x "$deb" "$kdir" && dpkg -x "$bbdeb" "$SB/bb" || die "dpkg -x failed"
    local mdir=$kdir/lib/modules/$kver
    if [ ! -f "$mdir/modules.dep" ]; then
        command -v depmod >/dev/null || apt-get install -y -qq --no-install-recommends kmod >/dev/null
        local tmp; tmp=$(mktemp -d); mkdir -p "$tmp/lib/modules"; ln -s "$mdir" "$tmp/lib/modules/$kver"
        depmod -b "$tmp" "$kver" || die "depmod failed"; rm -rf "${tmp:?}"
    fi
    ir=$SB/initramfs
    rm -rf "${ir:?}"; mkdir -p "$ir"/{bin,sbin,etc,proc,sys,dev,host,tmp,lib/modules}
    cp "$SB/bb/bin/busybox" "$ir/bin/busybox"
    mods=$(/usr/bin/python3 "$GI/scripts/linux-modclosure.py" "$mdir" $L1_MODS 2>/dev/null) || die "module resolution failed"
    : > "$ir/etc/sandbox-modules"
    for m in $mods; do cp "$mdir/$m" "$ir/lib/modules/"; basename "$m" .ko >> "$ir/etc/sandbox-modules"; done
    install -m 0755 "$HERE/l1-init.sh" "$ir/init"
    mknod -m 600 "$ir/dev/console" c 5 1 2>/dev/null || true
    (cd "$ir" && find . | sort | cpio -o -H newc -R 0:0 --quiet | gzip -1 -n) > "$SB/initrd.img" || die "cpio failed"
    cp "$kdir/boot/vmlinuz-$kver" "$SB/vmlinuz"
    # L1 boots the ELF through its PVH entry: skips the bzImage decompressor, which under TCG
    # costs ~3.5 s of every sandbox run. The bzImage stays as the fallback.
    rm -f "$SB/vmlinux"
    /usr/bin/python3 "$GI/scripts/linux-extract-vmlinux.py" "$SB/vmlinuz" "$SB/vmlinux" >/dev/null \
        || echo "sandbox: could not extract an ELF vmlinux for L1, booting the bzImage" >&2
    echo "$kver" > "$SB/kernel.version"
    echo "$stamp" > "$SB/stamp"
    echo "$fstamp" > "$SB/fstamp"
    echo "sandbox: L1 kernel $kver, modules: $(tr '\n' ' ' < "$ir/etc/sandbox-modules")" >&2
}
mkdir -p "$SB"
exec 9>"$SB/.lock"
flock 9            # concurrent sandboxes: the first one prepares L1, the others wait for it
build_l1
exec 9>&-
[ $BUILD_ONLY = 1 ] && { echo "sandbox: L1 ready: $SB/vmlinux (ELF, PVH; bzImage $SB/vmlinuz), $SB/initrd.img, kernel $(cat "$SB/kernel.version")"; exit 0; }
log "L1 ready ($(cat "$SB/kernel.version"))"

# ---------------------------------------------------------------------------------------------
# The run directory: the command, its results, and the list of shares
# ---------------------------------------------------------------------------------------------
RUN=$(mktemp -d /tmp/vnode-sandbox.XXXXXX)
QPID=
cleanup() {
    [ -n "$QPID" ] && kill "$QPID" 2>/dev/null || true
    [ -n "${TAILS:-}" ] && kill $TAILS 2>/dev/null || true
    rm -rf "${RUN:?}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

case "$PWD" in *[[:space:]]*) die "the working directory has white space in its path" ;; esac
{
    echo 'set -o pipefail 2>/dev/null'
    printf 'cd %q 2>/dev/null || { echo "sandbox: $PWD not visible inside, running in /" >&2; cd /; }\n' "$PWD"
    echo 'export TMPDIR=/run/tmp'
    for v in PATH HOME TERM LANG RUST_LOG RUST_BACKTRACE $(compgen -e | grep '^VNODE_' || true); do
        [ -n "${!v+x}" ] && printf 'export %s=%q\n' "$v" "${!v}"
    done
    for e in ${ENVS[@]+"${ENVS[@]}"}; do printf 'export %q\n' "$e"; done
    printf 'exec'; printf ' %q' "$@"; echo
} > "$RUN/cmd.sh"

VIRTFS=(-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
        -virtfs "local,path=$RUN,mount_tag=run,security_model=none,multidevs=remap")
: > "$RUN/shares"
i=0
for s in ${SHARES[@]+"${SHARES[@]}"}; do
    [ -d "$s" ] || die "--share $s: not a directory"
    case "$s" in *[[:space:]]*) die "--share $s: white space in the path" ;; esac
    VIRTFS+=(-virtfs "local,path=$s,mount_tag=share$i,security_model=none,multidevs=remap")
    echo "share$i $s" >> "$RUN/shares"
    i=$((i + 1))
done
: > "$RUN/stdout"; : > "$RUN/stderr"

# ---------------------------------------------------------------------------------------------
# Boot L1
# ---------------------------------------------------------------------------------------------
L1K=$SB/vmlinuz
[ -f "$SB/vmlinux" ] && L1K=$SB/vmlinux
log "booting L1 ($(basename "$L1K")): TCG, -cpu EPYC,+svm,+npt, $MEM, $SMP vCPU(s)"
timeout -k 5 "$TIMEOUT" \
    qemu-system-x86_64 -accel tcg -M q35 -cpu EPYC,+svm,+npt -m "$MEM" -smp "$SMP" \
    -nodefaults -display none -no-reboot -serial "file:$RUN/console.log" \
    -kernel "$L1K" -initrd "$SB/initrd.img" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off vnode.run=$RUN" \
    "${VIRTFS[@]}" </dev/null >"$RUN/qemu.log" 2>&1 &
QPID=$!
# stream the command's output while it runs (tail exits when QEMU does)
tail -n +1 -s 0.2 -f --pid=$QPID "$RUN/stdout" 2>/dev/null &
TAILS=$!
tail -n +1 -s 0.2 -f --pid=$QPID "$RUN/stderr" >&2 2>/dev/null &
TAILS="$TAILS $!"
if [ $VERBOSE = 1 ]; then tail -n +1 -s 0.2 -f --pid=$QPID "$RUN/console.log" >&2 2>/dev/null & TAILS="$TAILS $!"; fi
set +e
wait $QPID
qrc=$?
set -e
QPID=
wait $TAILS 2>/dev/null || true
TAILS=
[ -n "$CONSOLE" ] && cp "$RUN/console.log" "$CONSOLE"

total=$(ms)
if [ -f "$RUN/rc" ]; then
    rc=$(cat "$RUN/rc")
    [ $QUIET = 1 ] || echo "sandbox: rc=$rc, $(cat "$RUN/l1.up" 2>/dev/null || echo 'l1_up_s=?'), total ${total} ms" >&2
    exit "$rc"
fi
if [ $qrc = 124 ] || [ $qrc = 137 ]; then
    echo "sandbox: error: timed out after ${TIMEOUT}s" >&2
    rc=124
else
    echo "sandbox: error: L1 stopped without a result (qemu exit $qrc)" >&2
    rc=125
fi
{ grep -v "TCG doesn't support requested feature" "$RUN/qemu.log" || true; cat "$RUN/l1.log" 2>/dev/null || true
  echo "--- L1 console (last 30 lines) ---"; tail -n 30 "$RUN/console.log" || true; } | sed 's/^/    /' >&2
exit $rc
