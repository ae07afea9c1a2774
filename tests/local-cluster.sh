#!/usr/bin/env bash
# The main job on one machine: build everything, start a memory server (vnode-memd) and a
# storage server (vnode-blkd) on loopback, then run the test guest as a vNode whose RAM lives on
# the memory server behind a 256 MiB ExCache and whose disk is an NBD export of the storage
# server: first a memory workload over 1 GiB, then a disk workload that writes, flushes, reads
# back and verifies. Stats (faults, evictions, write-backs, latency) are printed after each run.
#
#   bash tests/local-cluster.sh [--keep]      (--keep leaves the servers' files in the work dir)
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(mktemp -d /tmp/vnode-cluster.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ "${1:-}" = "--keep" ] || rm -rf "$W"; }
trap 'cleanup "${1:-}"' EXIT

echo "== building (guest image, release binaries)"
bash guest-images/build.sh testguest
cargo build --release --workspace --bins
B=target/release
export VNODE_SECRET=${VNODE_SECRET:-local-cluster-secret}

wait_line() { for _ in $(seq 100); do grep -q "listening on" "$1" 2>/dev/null && { grep -m1 -o 'listening on .*' "$1" | cut -d' ' -f3; return; }; sleep 0.1; done; echo "server did not start: $1" >&2; exit 1; }

echo "== memory server"
"$B/vnode-memd" --listen 127.0.0.1:0 --capacity 4G --data-dir "$W/mem" >"$W/memd.out" 2>"$W/memd.err" &
pids+=($!)
MEM=$(wait_line "$W/memd.out"); echo "vnode-memd on $MEM"
echo "== storage server"
"$B/vnode-blkd" --listen 127.0.0.1:0 --export "disk0=$W/disk0.img:256M" >"$W/blkd.out" 2>"$W/blkd.err" &
pids+=($!)
BLK=$(wait_line "$W/blkd.out"); echo "vnode-blkd on $BLK"

run() {
    echo "== vnode: $*"
    "$B/vnode" run --kernel guest-images/out/testguest.elf --mem 1280M --vcpus 2 \
        --mem-server "$MEM" --local-mem 256M --excache-policy clock \
        --disk "nbd://$BLK/disk0" --stats "$@"
}
run --cmdline "test=mem bytes=1G pattern=zipf seed=1 writes=30 passes=2"
run --cmdline "test=blk sectors=65536 pattern=random seed=3"
echo "== done: guest RAM on $MEM, disk on nbd://$BLK/disk0"
