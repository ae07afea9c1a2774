#!/usr/bin/env bash
# Runs inside the hardware-virtualization sandbox (run.sh): vnode boots Debian's cloud kernel with
# our initramfs, 2 vCPUs, guest RAM on a vnode-memd (bounded by the ExCache) and root on a
# vnode-blkd NBD export, runs the guest's jobs, and leaves everything in OUTDIR. Optionally more
# runs, each a fresh guest: QEMU (qemu-ref.sh) booting the same kernel + initramfs for a boot-time
# comparison, and benchmarks through `vnodectl bench` (vmm/src/bin/vnodectl.rs).
#
#   guest-images/sandbox/run.sh --share OUTDIR -- bash guest-images/sandbox/vnode-linux-check.sh \
#       --out OUTDIR --bin-dir /abs/target/debug --rootfs OUTDIR/rootfs.ext4 \
#       [--vcpus 2] [--mem 1G] [--local-mem 512M] [--append "vnode.job=all ..."] [--qemu-ref] \
#       [--fio-verify SECONDS] [--randread SECONDS [--data-size 128M]] [--memcached-net SECONDS]
#       [--power-button]
#
# --power-button: the main run serves vnode's API, and once the guest's init is up
#   `vnodectl vm shutdown --deadline 60` presses the ACPI power button (use --append
#   "vnode.job=idle"): the guest prints VNODE-POWER-BUTTON and powers off, vnode exits 0 (253 if
#   the deadline had to stop it). vnodectl's answer goes to shutdown.json.
# --fio-verify S: vnodectl bench fio-verify --runtime S (time-based crc32c verify, 4 MiB area on
#   the root disk), RAM on vnode-memd with an ExCache of half the guest RAM, root on vnode-blkd.
# --randread S: one vnode-blkd serves the root image and a data image (export "data", zeros,
#   --data-size); vnodectl bench fio-randread (4 KiB random reads, QD32) reads it as /dev/vdb of
#   a vnode guest (local RAM), then qemu-ref.sh runs the same job in a QEMU guest whose /dev/vdb
#   is the same export through QEMU's NBD client.
# --memcached-net S: vnodectl bench memcached: the guest serves memcached on a TAP (--net tap=vnsb0,
#   10.77.0.2/24; the host side 10.77.0.1/24), vnodectl's load client runs in L1 for S seconds.
#
# OUTDIR gets: console.log (each console line as "[ms since vnode started] line"), vnode.stderr
# (the --stats JSON line is its last line starting with '{'), vnode.rc, memd.log, blkd.log,
# cmdline; with --qemu-ref also qemu-ref.log, qemu-ref.rc and a quiet vnode.job=boot run
# (console-quiet.log, vnode-quiet.*); for each vnodectl run TAG (fio-verify, randread-vnode,
# memcached): TAG.json (vnodectl's document), console-TAG.log, TAG.stderr, TAG.rc; for the QEMU
# randread qemu-randread.log and qemu-randread.rc. timing.txt has one "key=value" a line.
# Exit status: the main run's, or 1 if any other run failed (failed.txt names them).
# --rootfs is a scratch copy: the guest writes to it.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT_IMG=$(cd "$HERE/.." && pwd)/out
OUTDIR= BIN= ROOTFS= VCPUS=2 MEM=1G LOCAL=512M APPEND="vnode.job=boot" QREF=0
FIOV=0 RANDREAD=0 DATA_SIZE=128M MCNET=0 PBUTTON=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUTDIR=$2; shift 2 ;;
        --bin-dir) BIN=$2; shift 2 ;;
        --rootfs) ROOTFS=$2; shift 2 ;;
        --vcpus) VCPUS=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --local-mem) LOCAL=$2; shift 2 ;;
        --append) APPEND=$2; shift 2 ;;
        --qemu-ref) QREF=1; shift ;;
        --fio-verify) FIOV=$2; shift 2 ;;
        --randread) RANDREAD=$2; shift 2 ;;
        --data-size) DATA_SIZE=$2; shift 2 ;;
        --memcached-net) MCNET=$2; shift 2 ;;
        --power-button) PBUTTON=1; shift ;;
        *) sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
die() { echo "vnode-linux-check: error: $*" >&2; exit 1; }
[ -d "$OUTDIR" ] && [ -w "$OUTDIR" ] || die "--out $OUTDIR: not a writable directory (share it)"
for b in vnode vnode-memd vnode-blkd vnodectl; do [ -x "$BIN/$b" ] || die "$BIN/$b missing"; done
[ -f "$ROOTFS" ] || die "--rootfs $ROOTFS missing"
[ -c /dev/kvm ] || die "no /dev/kvm (run this inside guest-images/sandbox/run.sh)"
export TMPDIR=${TMPDIR:-/tmp} VNODE_SECRET=${VNODE_SECRET:-sandbox-insecure}
now_ms() { local t=${EPOCHREALTIME/./}; echo $(( t / 1000 )); }
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT

# Starts a server in the background (its pid joins PIDS) and waits for its --ready-file: ADDR.
start_server() { # name ready-file args...
    local name=$1 ready=$2 i; shift 2
    rm -f "$ready"
    "$@" --ready-file "$ready" >"$OUTDIR/$name.log" 2>&1 &
    PIDS+=($!)
    for i in $(seq 600); do
        [ -s "$ready" ] && { ADDR=$(cat "$ready"); return 0; }
        kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$OUTDIR/$name.log" >&2; die "$name exited"; }
        sleep 0.1
    done
    die "$name did not start listening in 60 s"
}
# One vnode run: guest RAM on a fresh vnode-memd, root on a vnode-blkd export of --rootfs.
# Writes console$TAG.log, vnode$TAG.stderr, vnode$TAG.rc and ${KEY}_{initramfs,init,total}_ms.
run_vnode() { # TAG KEY CMDLINE
    local tag=$1 key=$2 cmdline=$3 memd blkd start vrc api=()
    [ "$PBUTTON" = 1 ] && [ -z "$tag" ] && api=(--api-socket "$TMPDIR/vnode-api.sock")
    start_server memd$tag "$TMPDIR/memd.ready" "$BIN/vnode-memd" --listen 127.0.0.1:0 --capacity 2G
    memd=$ADDR
    start_server blkd$tag "$TMPDIR/blkd.ready" "$BIN/vnode-blkd" --insecure --listen 127.0.0.1:0 --export "root=$ROOTFS"
    blkd=$ADDR
    echo "vnode-linux-check: vnode-memd on $memd, vnode-blkd on $blkd; cmdline: $cmdline" >&2
    start=$(now_ms)
    "$BIN/vnode" run --kernel "$OUT_IMG/vmlinux" --initrd "$OUT_IMG/initrd.img" --vcpus "$VCPUS" \
        --mem "$MEM" --mem-server "$memd" --local-mem "$LOCAL" --disk "nbd://$blkd/root" --stats \
        "${api[@]}" --cmdline "$cmdline" </dev/null 2>"$OUTDIR/vnode$tag.stderr" \
        | while IFS= read -r line; do
            line=${line%$'\r'}
            t=$(( $(now_ms) - start ))
            printf '[%7d ms] %s\n' "$t" "$line"
            case "$line" in
                VNODE-INITRAMFS-UP*) echo "${key}_initramfs_ms=$t" >>"$OUTDIR/timing.txt" ;;
                VNODE-INIT-UP*) echo "${key}_init_ms=$t" >>"$OUTDIR/timing.txt"
                    [ ${#api[@]} = 0 ] || "$BIN/vnodectl" vm "${api[@]}" -o json shutdown \
                        --deadline 60 >"$OUTDIR/shutdown.json" 2>&1 & ;;
                VNODE-*|'{'*) echo "[$t ms] $line" >&2 ;;
            esac
        done >"$OUTDIR/console$tag.log"
    vrc=${PIPESTATUS[0]}
    echo "$vrc" >"$OUTDIR/vnode$tag.rc"
    echo "${key}_total_ms=$(( $(now_ms) - start ))" >>"$OUTDIR/timing.txt"
    echo "vnode-linux-check: vnode exited $vrc after $(( $(now_ms) - start )) ms" >&2
    cleanup; PIDS=()
    return "$vrc"
}

# One `vnodectl bench` run (the servers it uses are already up): TAG.json, console-TAG.log,
# TAG.stderr, TAG.rc. The caller stops the servers.
ctl() { # TAG BENCH-ARGS... -- VNODE-ARGS...
    local tag=$1 rc start; shift
    start=$(now_ms)
    echo "vnode-linux-check: $tag: vnodectl bench $*" >&2
    "$BIN/vnodectl" bench --json-out "$OUTDIR/$tag.json" --console-log "$OUTDIR/console-$tag.log" \
        "$@" >/dev/null 2>"$OUTDIR/$tag.stderr"
    rc=$?
    echo "$rc" >"$OUTDIR/$tag.rc"
    echo "vnode-linux-check: $tag: vnodectl exited $rc after $(( $(now_ms) - start )) ms" >&2
    [ $rc = 0 ] || { grep -v '^{' "$OUTDIR/$tag.stderr" | tail -n 5 >&2; FAILED="$FAILED $tag"; }
    return $rc
}

: >"$OUTDIR/timing.txt"
FAILED=
mem_mib=$(numfmt --from=iec "$MEM"); mem_mib=$(( mem_mib / 1048576 ))
KARGS=(--kernel "$OUT_IMG/vmlinux" --initrd "$OUT_IMG/initrd.img" --vcpus "$VCPUS" --mem "$MEM")
cmdline="console=ttyS0 panic=-1 $APPEND"
echo "$cmdline" >"$OUTDIR/cmdline"
run_vnode "" vnode "$cmdline"; vrc=$?

if [ "$FIOV" != 0 ]; then
    # Time-based crc32c verify; RAM on vnode-memd behind an ExCache of half the guest RAM.
    start_server memd-fio-verify "$TMPDIR/memd.ready" "$BIN/vnode-memd" --listen 127.0.0.1:0 --capacity 2G
    memd=$ADDR
    start_server blkd-fio-verify "$TMPDIR/blkd.ready" "$BIN/vnode-blkd" --insecure --listen 127.0.0.1:0 --export "root=$ROOTFS"
    ctl fio-verify fio-verify --runtime "$FIOV" --guest-arg fio_size=2M -- "${KARGS[@]}" \
        --mem-server "$memd" --local-mem "$(( mem_mib / 2 ))M" --disk "nbd://$ADDR/root"
    cleanup; PIDS=()
fi

if [ "$RANDREAD" != 0 ]; then
    # The same vnode-blkd export read by a vnode guest and then by a QEMU guest.
    data=$TMPDIR/data.img
    dd if=/dev/zero of="$data" bs=1M count="$(( $(numfmt --from=iec "$DATA_SIZE") / 1048576 ))" status=none \
        || die "cannot create $data"
    start_server blkd-randread "$TMPDIR/blkd.ready" "$BIN/vnode-blkd" --insecure --listen 127.0.0.1:0 \
        --export "root=$ROOTFS" --export "data=$data"
    blkd=$ADDR
    ctl randread-vnode fio-randread --runtime "$RANDREAD" -- "${KARGS[@]}" \
        --disk "nbd://$blkd/root" --disk "nbd://$blkd/data"
    bash "$HERE/qemu-ref.sh" --inside --job fio-randread --kernel vmlinux --smp "$VCPUS" --mem "$mem_mib" \
        --append "vnode.fio_runtime=$RANDREAD" --nbd-disk2 "nbd://$blkd/data" --timeout $(( RANDREAD + 300 )) \
        >"$OUTDIR/qemu-randread.log" 2>&1
    qrc=$?
    echo "$qrc" >"$OUTDIR/qemu-randread.rc"
    [ $qrc = 0 ] || { tail -n 5 "$OUTDIR/qemu-randread.log" >&2; FAILED="$FAILED qemu-randread"; }
    grep '"job":"fio-randread"' "$OUTDIR/qemu-randread.log" >&2
    cleanup; PIDS=()
    rm -f "$data"
fi

if [ "$MCNET" != 0 ]; then
    # memcached in the guest, the load client here in L1, over a TAP.
    start_server memd-memcached "$TMPDIR/memd.ready" "$BIN/vnode-memd" --listen 127.0.0.1:0 --capacity 2G
    memd=$ADDR
    start_server blkd-memcached "$TMPDIR/blkd.ready" "$BIN/vnode-blkd" --insecure --listen 127.0.0.1:0 --export "root=$ROOTFS"
    ctl memcached memcached --runtime "$MCNET" --net-host-ip 10.77.0.1/24 --guest-ip 10.77.0.2 \
        --client builtin --connections 4 --keys 50 -- "${KARGS[@]}" --mem-server "$memd" --local-mem "$LOCAL" \
        --disk "nbd://$ADDR/root" --net tap=vnsb0
    cleanup; PIDS=()
fi

if [ $QREF = 1 ]; then
    # Boot time against QEMU, both `quiet` (a verbose console costs nested QEMU far more than
    # vnode: every character is an exit to L1's QEMU process) and both to the same end
    # (vnode.job=boot, root mounted, /sbin/init up). QEMU (qemu-ref.sh): the same kernel (ELF, PVH
    # entry) and initramfs, q35, local RAM, the image with snapshot=on. vnode: as above, RAM on
    # vnode-memd behind the ExCache, root on vnode-blkd.
    bash "$HERE/qemu-ref.sh" --inside --job boot --kernel vmlinux --smp "$VCPUS" --mem "$mem_mib" \
        >"$OUTDIR/qemu-ref.log" 2>&1
    echo "$?" >"$OUTDIR/qemu-ref.rc"
    awk '/\] VNODE-INITRAMFS-UP/{gsub(/\[ */,""); print "qemu_quiet_initramfs_ms=" $1+0}
         /\] VNODE-INIT-UP/{gsub(/\[ */,""); print "qemu_quiet_init_ms=" $1+0}
         /^qemu-ref: QEMU exit/{for(i=1;i<=NF;i++) if ($i=="after") print "qemu_quiet_total_ms=" $(i+1)}' \
        "$OUTDIR/qemu-ref.log" >>"$OUTDIR/timing.txt"
    run_vnode -quiet vnode_quiet "console=ttyS0 quiet panic=-1 vnode.job=boot"
fi
cat "$OUTDIR/timing.txt" >&2
echo "${FAILED# }" >"$OUTDIR/failed.txt"
[ -z "$FAILED" ] || { echo "vnode-linux-check: failed runs:$FAILED" >&2; [ "$vrc" != 0 ] || vrc=1; }
exit "$vrc"
