#!/bin/sh
# Builds vnode-blkd (release) and runs the fio comparison against qemu-nbd and nbdkit file.
# Usage: remote-blk/bench/nbd-bench.sh [nbd-bench.py options, e.g. --runs 3 --runtime 5]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target=${CARGO_TARGET_DIR:-$here/../../target}
cargo build --release -q -p remote-blk --bin vnode-blkd --manifest-path "$here/../Cargo.toml"
exec python3 "$here/nbd-bench.py" --blkd "$target/release/vnode-blkd" "$@"
