#!/usr/bin/env bash
# Builds the test guest (guest-images/testguest) into guest-images/out/testguest.elf.
#
#   guest-images/build.sh testguest [--debug]
#
# Needs only a stable Rust toolchain for x86_64-unknown-linux-gnu (rustup's default) and the
# system C compiler as linker: the guest is a freestanding, static, non-PIE ELF linked at 2 MiB
# (see testguest/linker.ld, testguest/build.rs and testguest/.cargo/config.toml for the flags).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
crate="$here/testguest"
out="$here/out"
profile=release
case "${1:-}" in
    --debug) profile=debug ;;
    "") ;;
    *) echo "usage: $0 [--debug]" >&2; exit 2 ;;
esac
export CARGO_TARGET_DIR="${TESTGUEST_TARGET_DIR:-$crate/target}"
flags=()
[ "$profile" = release ] && flags+=(--release)
# cargo reads testguest/.cargo/config.toml from the current directory.
(cd "$crate" && cargo build --locked "${flags[@]}" --bin testguest)
mkdir -p "$out"
cp "$CARGO_TARGET_DIR/$profile/testguest" "$out/testguest.elf"
echo "testguest: $out/testguest.elf"
