#!/usr/bin/env bash
# The main job on one machine: build everything, then run the test guest as a vNode.
set -euo pipefail
cd "$(dirname "$0")/.."
bash guest-images/build.sh testguest
cargo build --release --workspace --bins
B=target/release
"$B/vnode" run --kernel guest-images/out/testguest.elf --mem 1G --vcpus 2 \
    --cmdline "test=mem bytes=900M pattern=random writes=50 passes=1"
