#!/usr/bin/env bash
# Fuzzes a running vnode's control API against its committed OpenAPI document with
# Schemathesis (from PyPI, in a venv under target/): a test guest runs a memory workload on a
# real vnode-memd while every operation but those that end the VM or write files (stop,
# shutdown, snapshot) gets schema-driven requests. Passes when no request gets a 5xx, no
# response breaks the schema, and vnode is still running at the end.
#
#   bash tests/api-fuzz.sh [SECONDS]     (default 240; needs the debug binaries and test guest:
#                                          cargo build --bins; bash guest-images/build.sh testguest)
#
# The positive_data_acceptance check is left out: the API refuses sizes the schema cannot
# bound (local_mem above this guest's RAM) and malformed server addresses with a 400 and a
# message, which is the intended answer.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-240}
venv=target/schemathesis
[ -x "$venv/bin/schemathesis" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q schemathesis; }
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
VNODE_SECRET=api-fuzz target/debug/vnode-memd --listen 127.0.0.1:0 --capacity 1G \
    > "$work/memd.out" 2> "$work/memd.log" &
for _ in $(seq 50); do grep -q "listening on" "$work/memd.out" && break; sleep 0.1; done
memd=$(awk '/listening on/{print $3}' "$work/memd.out")
VNODE_SECRET=api-fuzz target/debug/vnode run --kernel guest-images/out/testguest.elf \
    --mem 256M --vcpus 1 --mem-server "$memd" --local-mem 64M \
    --cmdline "test=mem bytes=192M pattern=random passes=255 seed=3" \
    --api-socket "$work/api.sock" --api-listen-tcp 127.0.0.1:0 > "$work/guest.out" 2> "$work/vnode.log" &
vnode=$!
for _ in $(seq 100); do grep -q "API listening on tcp" "$work/vnode.log" && break; sleep 0.1; done
addr=$(grep -o "API listening on tcp [0-9.:]*" "$work/vnode.log" | awk '{print $5}')
rc=0
"$venv/bin/schemathesis" run docs/api/vnode.openapi.json --url "http://$addr" \
    --exclude-path /vm/stop --exclude-path /vm/shutdown --exclude-path /vm/snapshot \
    --checks all --exclude-checks positive_data_acceptance --max-time "$secs" || rc=$?
if ! kill -0 "$vnode" 2>/dev/null; then
    echo "api-fuzz: error: vnode exited during the run:"; tail -5 "$work/vnode.log"; exit 1
fi
echo "api-fuzz: vnode still running after ${secs}s of requests"
exit "$rc"
