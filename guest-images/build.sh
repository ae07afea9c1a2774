#!/usr/bin/env bash
# Builds guest images. Outputs go to guest-images/out/ (never committed).
#
#   guest-images/build.sh testguest      the purpose-built test guest -> out/testguest.elf
#   guest-images/build.sh kernel         Debian's linux-image-cloud-amd64, unmodified -> out/vmlinux (ELF), out/vmlinuz
#   guest-images/build.sh linux [--add PATH]...
#                                        kernel + initramfs + ext4 root fs with fio, memcached, redis
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
what=${1:-}
[ $# -gt 0 ] && shift
case "$what" in
    testguest) exec bash "$here/scripts/testguest.sh" "$@" ;;
    kernel|linux) exec bash "$here/scripts/linux.sh" "$what" "$@" ;;
    *) echo "usage: $0 testguest | kernel | linux [--add PATH]..." >&2; exit 2 ;;
esac
