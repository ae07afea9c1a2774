#!/usr/bin/env bash
# The main job on one machine, from a bare Debian machine: install what is missing
# (scripts/setup.sh), build everything, start a memory server (vnode-memd) and a storage server
# (vnode-blkd) on loopback, then run the test guest as a vNode whose RAM lives on the memory
# server behind a 256 MiB ExCache and whose disk is an NBD export of the storage server: first a
# memory workload over 1 GiB, then a disk workload that writes, flushes, reads back and verifies.
# Ends with a short summary per run; the full JSON (the guest's report and vnode's --stats) is in
# the work directory, and with --json the summary itself is printed as JSON.
#
#   bash tests/local-cluster.sh [--keep] [--json]   (--keep leaves the work dir and its files)
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0; json=0
for a in "$@"; do case "$a" in --keep) keep=1 ;; --json) json=1 ;; *) echo "usage: $0 [--keep] [--json]" >&2; exit 2 ;; esac; done
bash scripts/setup.sh
W=$(mktemp -d /tmp/vnode-cluster.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ $keep = 1 ] || rm -rf "$W/mem" "$W/disk0.img"; }
trap cleanup EXIT

echo "== building (guest image, release binaries)"
bash guest-images/build.sh testguest
cargo build --release --workspace --bins
B=target/release
export VNODE_SECRET=${VNODE_SECRET:-local-cluster-secret}

wait_line() { for _ in $(seq 100); do grep -q "listening on" "$1" 2>/dev/null && { grep -m1 -o 'listening on .*' "$1" | cut -d' ' -f3; return; }; sleep 0.1; done; echo "server did not start: $1" >&2; cat "${1%.out}.err" >&2; exit 1; }

echo "== memory server"
"$B/vnode-memd" --listen 127.0.0.1:0 --capacity 4G --data-dir "$W/mem" >"$W/memd.out" 2>"$W/memd.err" &
pids+=($!)
MEM=$(wait_line "$W/memd.out"); echo "vnode-memd on $MEM"
echo "== storage server"
"$B/vnode-blkd" --listen 127.0.0.1:0 --export "disk0=$W/disk0.img:256M" >"$W/blkd.out" 2>"$W/blkd.err" &
pids+=($!)
BLK=$(wait_line "$W/blkd.out"); echo "vnode-blkd on $BLK"
# The disk's credential, as the manager would hand it to this vNode (never the cluster key).
"$B/vnode-cred" blk --export disk0 >"$W/disk0.cred"

runs=()
run() {
    local name=$1; shift
    echo "== vnode ($name): $*"
    local rc=0
    echo "${@: -1}" >"$W/$name.workload"
    "$B/vnode" run --kernel guest-images/out/testguest.elf --mem 1280M --vcpus 2 \
        --mem-server "$MEM" --local-mem 256M --excache-policy clock \
        --disk "nbd://$BLK/disk0,credential-file=$W/disk0.cred" --stats "$@" >"$W/$name.serial" 2>"$W/$name.stderr" || rc=$?
    tail -n 3 "$W/$name.serial"
    echo "$rc" >"$W/$name.rc"
    runs+=("$name")
}
run mem --cmdline "test=mem bytes=1G pattern=zipf seed=1 writes=30 passes=2"
run blk --cmdline "test=blk sectors=65536 pattern=random seed=3"

python3 - "$W" "$json" "${runs[@]}" <<'PY'
import json, sys
w, as_json, runs = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
def last_json(path, key):
    for line in reversed(open(path, errors="replace").read().splitlines()):
        line = line.strip()
        if line.startswith("{") and key in line:
            try: return json.loads(line)
            except ValueError: pass
    return {}
rows = []
for r in runs:
    guest = last_json(f"{w}/{r}.serial", '"done"')
    stats = last_json(f"{w}/{r}.stderr", '"vmm"')
    ex = stats.get("excache") or {}
    rc = int(open(f"{w}/{r}.rc").read())
    rows.append({"run": r, "workload": open(f"{w}/{r}.workload").read().strip(), "ok": guest.get("ok") is True and rc == 0,
                 "exit": rc, "faults": ex.get("faults"), "evictions": ex.get("evictions"),
                 "writebacks": ex.get("writebacks"), "bytes_in": ex.get("bytes_in"),
                 "bytes_out": ex.get("bytes_out"), "fault_p50_us": ex.get("fault_p50_us"),
                 "fault_p99_us": ex.get("fault_p99_us"), "guest": guest, "stats": stats})
json.dump(rows, open(f"{w}/summary.json", "w"), indent=1)
if as_json:
    print(json.dumps(rows))
else:
    mib = lambda b: "-" if b is None else f"{b / 2**20:.0f} MiB"
    for x in rows: print(f"{x['run']}: {x['workload']}")
    print(f"\n{'run':<5} {'ok':<5} {'faults':>8} {'evictions':>9} {'writebacks':>10} {'in':>9} {'out':>9} {'fault p50/p99':>14}")
    for x in rows:
        lat = f"{x['fault_p50_us']}/{x['fault_p99_us']} us" if x["fault_p50_us"] is not None else "-"
        print(f"{x['run']:<5} {str(x['ok']).lower():<5} {x['faults'] or 0:>8} {x['evictions'] or 0:>9} "
              f"{x['writebacks'] or 0:>10} {mib(x['bytes_in']):>9} {mib(x['bytes_out']):>9} {lat:>14}")
    print(f"full JSON (guest reports and vnode --stats): {w}/summary.json")
sys.exit(0 if all(x["ok"] for x in rows) else 1)
PY
echo "== done: guest RAM on $MEM, disk on nbd://$BLK/disk0"
