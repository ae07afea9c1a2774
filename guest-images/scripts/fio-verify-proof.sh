#!/usr/bin/env bash
# Proves on the build host that the guest's time-based fio-verify job really verifies data while
# it runs: the job passes on an intact file, and fails (verify_fatal) when another process
# overwrites blocks under it. Then the same two fio passes (time-based writes verified as they go,
# a final read-verify of the whole area) through fio's NBD engine against a vnode-blkd export:
# intact passes, corrupted fails.
#
#   guest-images/scripts/fio-verify-proof.sh [--bin-dir target/debug] [--runtime 6]
#
# The file cases run the guest's own /sbin/init (scripts/linux-guest-init.sh, VNODE_INIT_TEST=1,
# under busybox sh with the host's fio), so the command line checked is the one the guest runs.
# Exits 0 when all four cases behave, 1 otherwise. Needs fio and busybox (Debian: fio,
# busybox-static); the NBD cases need vnode-blkd (cargo build) and are skipped without it.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
INIT=$HERE/linux-guest-init.sh
BIN=$(cd "$HERE/../.." && pwd)/target/debug RUNTIME=6
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) BIN=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
command -v fio >/dev/null || { echo "fio-verify-proof: fio missing (apt-get install fio)" >&2; exit 2; }
command -v busybox >/dev/null || { echo "fio-verify-proof: busybox missing (apt-get install busybox-static)" >&2; exit 2; }
W=$(mktemp -d /tmp/fio-verify-proof.XXXXXX)
BLKD=
cleanup() { [ -n "$BLKD" ] && kill "$BLKD" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
FAILED=0
say() { echo "fio-verify-proof: $*"; }

# corrupt FILE: after 2 s, overwrite 20 random 64 KiB runs of FILE with random bytes.
corrupt() {
    sleep 2
    for _ in $(seq 20); do
        dd if=/dev/urandom of="$1" bs=4k count=16 seek=$((RANDOM % 4000)) conv=notrunc oflag=direct 2>/dev/null \
            || dd if=/dev/urandom of="$1" bs=4k count=16 seek=$((RANDOM % 4000)) conv=notrunc 2>/dev/null
        sleep 0.1
    done
}

# expect pass|fail WHAT JSON_OR_RC_TEXT RC
expect() {
    local want=$1 what=$2 out=$3 rc=$4 got
    if [ "$rc" = 0 ] && printf '%s' "$out" | grep -q '"verified":true\|^ok$'; then got=pass; else got=fail; fi
    if [ "$got" = "$want" ]; then say "ok: $what: $got as expected (rc=$rc)"
    else say "WRONG: $what: $got, expected $want (rc=$rc)"; FAILED=1; fi
    printf '%s\n' "$out" | grep -E '^\{|verify:|fio:' | head -n 4 | sed 's/^/    /'
}

# The guest's job on a file, through its own init script.
guest_job() { # TARGET
    VNODE_INIT_TEST=1 TMPDIR=$W VNODE_CMDLINE="vnode.job=fio-verify vnode.fio_size=16M vnode.fio_runtime=$RUNTIME vnode.fio_target=$1" \
        busybox sh "$INIT" 2>&1
}
out=$(guest_job "$W/intact.dat"); rc=$?
expect pass "guest job, file, intact, ${RUNTIME}s" "$out" "$rc"
: > "$W/bad.dat"; truncate -s 16M "$W/bad.dat"
corrupt "$W/bad.dat" & cp=$!
out=$(guest_job "$W/bad.dat"); rc=$?
wait $cp
expect fail "guest job, file, corrupted while running" "$out" "$rc"

# The same fio options through the NBD engine against vnode-blkd.
if [ -x "$BIN/vnode-blkd" ]; then
    truncate -s 16M "$W/nbd.dat"
    "$BIN/vnode-blkd" --listen 127.0.0.1:0 --export "data=$W/nbd.dat" --ready-file "$W/ready" >"$W/blkd.log" 2>&1 &
    BLKD=$!
    for _ in $(seq 100); do [ -s "$W/ready" ] && break; sleep 0.1; done
    [ -s "$W/ready" ] || { cat "$W/blkd.log" >&2; say "vnode-blkd did not start"; exit 1; }
    # as the guest job: time-based random writes verified as they go, then a full read-verify pass
    nbd_fio() {
        local uri="nbd://$(cat "$W/ready")/data"
        (cd "$W" && fio --name=nbd-verify --ioengine=nbd --uri="$uri" --size=16M \
            --rw=randwrite --bs=4k --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 \
            --randrepeat=0 --verify_state_save=0 --time_based --runtime="$RUNTIME" --verify_backlog=64 \
            --output-format=terse --terse-version=3 2>&1 \
         && fio --name=nbd-verify-final --ioengine=nbd --uri="$uri" --size=16M --rw=read --bs=4k \
            --iodepth=16 --verify=crc32c --verify_fatal=1 --verify_state_save=0 \
            --output-format=terse --terse-version=3 2>&1)
    }
    out=$(nbd_fio); rc=$?
    expect pass "fio nbd engine, vnode-blkd export, intact" "$( [ $rc = 0 ] && echo ok; printf '%s' "$out" | grep -v '^3;')" "$rc"
    corrupt "$W/nbd.dat" & cp=$!
    out=$(nbd_fio); rc=$?
    wait $cp
    expect fail "fio nbd engine, vnode-blkd export, corrupted while running" "$( [ $rc = 0 ] && echo ok; printf '%s' "$out" | grep -v '^3;')" "$rc"
else
    say "skipped the NBD cases: no $BIN/vnode-blkd (cargo build -p remote-blk)"
fi
[ $FAILED = 0 ] && say "all cases behaved" || say "FAILED"
exit $FAILED
