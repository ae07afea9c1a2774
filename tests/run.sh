#!/usr/bin/env bash
# Runs every test: builds the guest images the tests boot, the workspace's binaries, then the
# unit and integration tests (which start real vnode, vnode-memd, vnode-blkd, qemu-nbd, nbdkit,
# fio processes on loopback and real KVM guests).
#
#   bash tests/run.sh            everything
#   bash tests/run.sh -- ARGS    extra arguments for `cargo test` (e.g. a test name filter)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--" ] && shift
step() { printf '\n== %s\n' "$*"; }

step "guest images"
bash guest-images/build.sh testguest
bash guest-images/build.sh kernel
step "build"
cargo build --workspace --bins
step "test guest library (host)"
(cd guest-images/testguest && cargo test --quiet)
step "workspace tests"
cargo test --workspace "$@"
