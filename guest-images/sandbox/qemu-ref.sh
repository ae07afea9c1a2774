#!/usr/bin/env bash
# Reference check: Debian's QEMU, with KVM, boots the unmodified cloud kernel with our initramfs
# and root filesystem, and the in-guest job prints its JSON. On this PVM host it runs inside the
# hardware-virtualization sandbox (run.sh); on a host with a hardware /dev/kvm, pass --direct.
#
#   guest-images/sandbox/qemu-ref.sh [--job JOB] [--machine q35|microvm] [--mem MiB] [--smp N]
#                                    [--l1-mem SIZE] [--l1-smp N] [--append ARGS] [--direct] [-v]
#                                    [--kernel vmlinuz|vmlinux] [--no-disk] [--disk2 SIZE]
#                                    [--nbd-disk2 nbd://HOST:PORT/EXPORT] [--timeout 900]
# --kernel vmlinux boots the ELF through its PVH entry (QEMU's PVH loader), as a VMM would.
# --no-disk: kernel + initramfs only (the initramfs reports the missing root disk and powers off).
# --disk2 SIZE: a second, empty virtio-blk disk (/dev/vdb), e.g. for vnode.fio_target=/dev/vdb.
# --nbd-disk2 URI: the second disk is an NBD export through QEMU's own NBD client (e.g. vnode-blkd's
#   export that a vnode guest also reads, for a like-for-like fio-randread comparison).
#
# Needs guest-images/out/{vmlinuz,initrd.img,rootfs.ext4} (guest-images/build.sh linux).
# The root disk is opened with snapshot=on: the guest's writes go to a temporary overlay.
# Prints the guest console's marker lines (-v: every console line) with the wall time (ms since QEMU started) at which
# each arrived, then the JSON lines, and exits 0 when the job's summary says rc=0.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(cd "$HERE/.." && pwd)/out
JOB=boot MACHINE=q35 MEM=1024 SMP=1 L1MEM=4G L1SMP=1 APPEND= DIRECT=0 INSIDE=0 ALL=0 KERNEL=vmlinuz DISK=1 DISK2= NBD2= QTIMEOUT=900
while [ $# -gt 0 ]; do
    case "$1" in
        --job) JOB=$2; shift 2 ;;
        --machine) MACHINE=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --l1-mem) L1MEM=$2; shift 2 ;;
        --l1-smp) L1SMP=$2; shift 2 ;;
        --append) APPEND=$2; shift 2 ;;
        --direct) DIRECT=1; shift ;;
        -v) ALL=1; shift ;;
        --kernel) KERNEL=$2; shift 2 ;;
        --no-disk) DISK=0; shift ;;
        --disk2) DISK2=$2; shift 2 ;;
        --nbd-disk2) NBD2=$2; shift 2 ;;
        --timeout) QTIMEOUT=$2; shift 2 ;;
        --inside) INSIDE=1; shift ;;
        *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
for f in vmlinuz initrd.img rootfs.ext4; do
    [ -f "$OUT/$f" ] || { echo "qemu-ref: $OUT/$f missing: run guest-images/build.sh linux" >&2; exit 2; }
done

if [ $DIRECT = 0 ] && [ $INSIDE = 0 ]; then
    exec "$HERE/run.sh" --mem "$L1MEM" --smp "$L1SMP" -- bash "$HERE/qemu-ref.sh" --inside \
        --job "$JOB" --machine "$MACHINE" --mem "$MEM" --smp "$SMP" ${APPEND:+--append "$APPEND"} $([ $ALL = 1 ] && echo -v) --kernel "$KERNEL" $([ $DISK = 0 ] && echo --no-disk) ${DISK2:+--disk2 "$DISK2"} ${NBD2:+--nbd-disk2 "$NBD2"} --timeout "$QTIMEOUT"
fi

[ -c /dev/kvm ] || { echo "qemu-ref: no /dev/kvm" >&2; exit 1; }
export TMPDIR=${TMPDIR:-/tmp}
case "$MACHINE" in
    microvm) M=(-M microvm,acpi=on,rtc=off); BLK=virtio-blk-device ;;
    q35) M=(-M q35); BLK=virtio-blk-pci ;;
    *) echo "qemu-ref: --machine microvm|q35" >&2; exit 2 ;;
esac
[ $DISK = 1 ] && M+=(-device "$BLK,drive=root" -drive "id=root,file=$OUT/rootfs.ext4,format=raw,if=none,snapshot=on,cache=unsafe")
if [ -n "$DISK2" ]; then
    d2=$TMPDIR/qemu-ref-disk2.$$; truncate -s "$DISK2" "$d2"; trap 'rm -f "$d2"' EXIT
    M+=(-device "$BLK,drive=d2" -drive "id=d2,file=$d2,format=raw,if=none,cache=unsafe")
fi
if [ -n "$NBD2" ]; then
    # nbd://HOST:PORT/EXPORT -> QEMU's NBD block driver (no host page cache on this path)
    hp=${NBD2#nbd://}; exp=${hp#*/}; hp=${hp%%/*}
    [ "$hp" != "$NBD2" ] && [ -n "$exp" ] && [ "${hp##*:}" != "$hp" ] || { echo "qemu-ref: --nbd-disk2 nbd://HOST:PORT/EXPORT, not $NBD2" >&2; exit 2; }
    M+=(-device "$BLK,drive=nbd2" -drive "id=nbd2,if=none,driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=${hp%:*},file.server.port=${hp##*:},file.export=$exp")
fi
case "$KERNEL" in vmlinuz|vmlinux) KERNEL=$OUT/$KERNEL ;; esac
[ -f "$KERNEL" ] || { echo "qemu-ref: no kernel $KERNEL" >&2; exit 2; }
START=$(date +%s%N)
log=$TMPDIR/qemu-ref.$$.log
set +e
timeout "$QTIMEOUT" qemu-system-x86_64 -accel kvm -cpu host -m "$MEM" -smp "$SMP" -nodefaults -no-user-config \
    -display none -no-reboot -serial stdio "${M[@]}" \
    -kernel "$KERNEL" -initrd "$OUT/initrd.img" \
    -append "console=ttyS0 quiet panic=-1 root=/dev/vda rw vnode.job=$JOB $APPEND" </dev/null 2>&1 \
    | while IFS= read -r line; do
        line=${line%$'\r'}
        t=$(( ($(date +%s%N) - START) / 1000000 ))
        echo "$line" >> "$log"
        [ $ALL = 1 ] && { printf '[%6d ms] %s\n' "$t" "$line"; continue; }
        case "$line" in
            VNODE-*|vnode-initramfs:*|'{'*|*qemu-system*|*"Kernel panic"*) printf '[%6d ms] %s\n' "$t" "$line" ;;
        esac
    done
qrc=${PIPESTATUS[0]}
set -e
end=$(( ($(date +%s%N) - START) / 1000000 ))
echo "qemu-ref: QEMU exit $qrc after $end ms (machine $MACHINE, kernel $(basename "$KERNEL"), ${MEM} MiB, $SMP vCPU, disk $DISK${DISK2:+ + $DISK2}, job $JOB${NBD2:+, disk2 $NBD2})"
if grep -q '^VNODE-EXIT rc=0' "$log"; then rm -f "$log"; exit 0; fi
if [ $DISK = 0 ] && grep -q '"stage":"initramfs","error":"no root disk' "$log"; then
    echo "qemu-ref: (no disk) the initramfs reported the missing root disk as expected"; rm -f "$log"; exit 0
fi
echo "qemu-ref: FAILED; last console lines:" >&2; tail -n 25 "$log" >&2; rm -f "$log"; exit 1
