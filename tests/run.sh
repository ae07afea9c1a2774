#!/usr/bin/env bash
# Runs every test, from a bare Debian machine: installs what is missing (scripts/setup.sh), builds
# the guest images the tests boot (the test guest, Debian's kernel, the Linux root fs for the
# sandbox test), the workspace's binaries, then the unit and integration tests (which start real
# vnode, vnode-memd, vnode-blkd, qemu-nbd, nbdkit, fio processes on loopback, real KVM guests,
# and Debian's unmodified kernel under vnode in the nested sandbox).
#
#   bash tests/run.sh            everything (what CI runs)
#   bash tests/run.sh -- ARGS    extra arguments for `cargo test` (e.g. a test name filter)
#   VNODE_SKIP_SANDBOX=1 bash tests/run.sh
#                                skip the Linux sandbox test (minutes under TCG; CI never sets it)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--" ] && shift
step() { printf '\n== %s [%s]\n' "$*" "$(date -u +%T)"; }

step "set-up"
bash scripts/setup.sh
step "guest images"
bash guest-images/build.sh testguest
bash guest-images/build.sh kernel
[ -n "${VNODE_SKIP_SANDBOX:-}" ] || bash guest-images/build.sh linux
step "build"
cargo build --workspace --bins
step "test guest library (host)"
(cd guest-images/testguest && cargo test --quiet)
step "workspace tests"
cargo test --workspace --no-fail-fast "$@"
step "done"
