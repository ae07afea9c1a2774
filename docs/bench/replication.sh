#!/usr/bin/env bash
# Replication's cost, in one run, with the baseline beside it: guest RAM on one vnode-memd
# against a primary and a backup (write-back throughput, fault latency), and a virtio-blk disk on
# one vnode-blkd against a replicated pair (`--disk URI,backup=URI`: guest write IOPS).
# Runs alternate one copy / two copies, ROUNDS times, so load drifts hit both alike.
#
#   cargo build --release --bins && bash guest-images/build.sh testguest
#   bash docs/bench/replication.sh > docs/bench/replication.txt
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${B:-target/release}
ROUNDS=${ROUNDS:-2}
export VNODE_SECRET=bench-secret-0123456789
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

# start NAME CMD...: runs a server, waits for its "listening on ADDR" line, sets $ADDR.
start() {
    local name=$1
    shift
    "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
    pids+=($!)
    for _ in $(seq 200); do
        ADDR=$(sed -n 's/^listening on //p' "$tmp/$name.out")
        [ -n "$ADDR" ] && return
        sleep 0.05
    done
    echo "$name did not start" >&2
    cat "$tmp/$name.err" >&2
    exit 1
}

echo "# Replication's cost: one copy against two, measured in one run ($(date -u +%FT%TZ))"
echo "# host: $(nproc) cores; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# (the machine is shared with other engineers' builds and tests: figures are noisy)"
echo

start m1 "$B/vnode-memd" --listen 127.0.0.1:0 --capacity 2G
M1=$ADDR
start m2 "$B/vnode-memd" --listen 127.0.0.1:0 --capacity 2G
M2=$ADDR

# mem SERVERS: a write-heavy guest, 256 MiB working set through a 32 MiB ExCache.
mem() {
    local t0 t1
    t0=$(date +%s.%N)
    "$B/vnode" run --kernel guest-images/out/testguest.elf --mem 320M \
        --cmdline "test=mem bytes=256M pattern=random seed=3 writes=70 passes=1" \
        --mem-server "$1" --local-mem 32M --stats >"$tmp/mem.out" 2>"$tmp/mem.err"
    t1=$(date +%s.%N)
    grep -q '"ok":true' "$tmp/mem.out" || { echo "guest failed" >&2; cat "$tmp/mem.err" >&2; exit 1; }
    python3 - "$t0" "$t1" "$tmp/mem.err" <<'EOF'
import json, sys
t0, t1, path = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
line = [l for l in open(path) if l.startswith("{") and '"excache"' in l][-1]
s = json.loads(line)["excache"]
wb_s = s["time_us"]["writeback"] / 1e6
print(f'{s["bytes_out"] / 2**20 / wb_s:9.1f} {s["fetch_fault_p50_us"]:6} {s["fetch_fault_p99_us"]:6} {s["writebacks"]:9} {t1 - t0:7.1f}')
EOF
}

echo "## guest RAM: write-back throughput (MiB/s of the fault thread's write-back time) and"
echo "## fetching-fault latency; test=mem 256M random writes=70, --local-mem 32M"
echo "copies  wb_MiB/s  p50_us p99_us writebacks  wall_s"
for r in $(seq "$ROUNDS"); do
    echo "1       $(mem "$M1")"
    echo "2       $(mem "$M1,$M2")"
done
echo

d="$tmp/disks"
mkdir -p "$d"
start b1 "$B/vnode-blkd" --listen 127.0.0.1:0 --export "disk=$d/a.img:256M"
B1=$ADDR
start b2 "$B/vnode-blkd" --listen 127.0.0.1:0 --export "disk=$d/b.img:256M"
B2=$ADDR

# blk DISK: the guest writes 128 MiB in 4 KiB requests (32 in flight), flushes, reads back.
blk() {
    "$B/vnode" run --kernel guest-images/out/testguest.elf --mem 256M \
        --cmdline "test=blk sectors=262144 pattern=random seed=4" \
        --disk "$1" >"$tmp/blk.out" 2>"$tmp/blk.err"
    grep -q '"ok":true' "$tmp/blk.out" || { echo "guest failed" >&2; cat "$tmp/blk.err" "$tmp/blk.out" >&2; exit 1; }
    python3 - "$tmp/blk.out" <<'EOF'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{"test":"blk"')][-1]
mhz = float([l for l in open("/proc/cpuinfo") if l.startswith("cpu MHz")][0].split(":")[1])
writes = r["sectors"] // 8
secs = r["write_cycles"] / (mhz * 1e6)
print(f'{writes / secs:9.0f} {r["write_cycles"]:14} {r["flush_cycles"]:12}')
EOF
}

echo "## storage: guest 4 KiB write IOPS (QD32; TSC cycles converted with /proc/cpuinfo's MHz)"
echo "copies       iops   write_cycles flush_cycles"
for r in $(seq "$ROUNDS"); do
    echo "1       $(blk "nbd://$B1/disk")"
    echo "2       $(blk "nbd://$B1/disk,backup=nbd://$B2/disk")"
done
echo
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
