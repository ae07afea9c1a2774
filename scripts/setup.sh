#!/usr/bin/env bash
# One idempotent set-up step for vNode on a Debian 12 machine: installs every Debian package the
# build, the guest images, the tests, the benchmarks and the nested sandbox need, then checks that
# each tool is really there, that we are root and that /dev/kvm works. A second run installs
# nothing and takes about a second. Called by the README's two commands and by .ci/run.
#
#   bash scripts/setup.sh          install what is missing, check, print one line per problem
#   bash scripts/setup.sh --check  check only (exit 1 if anything is missing)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
check_only=0; [ "${1:-}" = "--check" ] && check_only=1
say() { echo "setup: $*" >&2; }

# package -> a file it must leave behind (checked after the install: a package can be "installed"
# while another transaction removed what we need, e.g. qemu-utils by qemu-system-x86).
declare -A need=(
    [libclang-dev]=/usr/lib/llvm-14/lib/libclang.so      # bindgen (userfaultfd-sys, rdma-sys)
    [libibverbs-dev]=/usr/include/infiniband/verbs.h      # rdma-sys, behind the rdma feature
    [librdmacm-dev]=/usr/include/rdma/rdma_cma.h
    [busybox-static]=/bin/busybox                         # guest initramfs
    [cpio]=/usr/bin/cpio
    [e2fsprogs]=/sbin/mkfs.ext4                           # guest root file systems
    [xz-utils]=/usr/bin/xz
    [zstd]=/usr/bin/zstd
    [lz4]=/usr/bin/lz4                                    # Debian's kernel image is lz4
    [kmod]=/sbin/depmod
    [nbdkit]=/usr/bin/nbdkit                             # NBD peers for interop tests, benches
    [libnbd-bin]=/usr/bin/nbdinfo
    [qemu-utils]=/usr/bin/qemu-img                        # qemu-img, qemu-nbd, qemu-io
    [qemu-system-x86]=/usr/bin/qemu-system-x86_64         # the nested hardware-virt sandbox
    [fio]=/usr/bin/fio
    [memcached]=/usr/bin/memcached
    [iproute2]=/sbin/ip                                   # TAPs, network namespaces
    [nftables]=/usr/sbin/nft                              # partitions and loss between namespaces
    [etcd-server]=/usr/bin/etcd                           # the manager's HA store
    [etcd-client]=/usr/bin/etcdctl
    [protobuf-compiler]=/usr/bin/protoc                   # etcd-client's gRPC code (manager)
    [python3]=/usr/bin/python3                             # guest-image scripts, summaries (stdlib only)
    [acpica-tools]=/usr/bin/iasl                          # tests decompile vnode's ACPI tables (iasl)
    [python3-prometheus-client]=/usr/lib/python3/dist-packages/prometheus_client/openmetrics/parser.py  # tests parse /metrics
)
tools=(clang-14:/usr/lib/llvm-14/lib/libclang.so qemu-img:/usr/bin/qemu-img qemu-nbd:/usr/bin/qemu-nbd
       qemu-io:/usr/bin/qemu-io qemu-system-x86_64:/usr/bin/qemu-system-x86_64 nbdkit:/usr/bin/nbdkit
       nbdinfo:/usr/bin/nbdinfo fio:/usr/bin/fio memcached:/usr/bin/memcached ip:/sbin/ip
       nft:/usr/sbin/nft etcd:/usr/bin/etcd etcdctl:/usr/bin/etcdctl busybox:/bin/busybox)

missing=()
for p in "${!need[@]}"; do [ -e "${need[$p]}" ] || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ] && [ $check_only = 0 ]; then
    [ "$(id -u)" = 0 ] || { say "error: packages missing (${missing[*]}) and not root: run as root"; exit 1; }
    say "installing: ${missing[*]}"
    extra=()
    # qemu-system-x86 (bookworm's 7.2) breaks any newer qemu-utils (a machine may come with 10.0
    # from backports) and apt would remove it: install both from one suite in one transaction.
    if printf '%s\n' "${missing[@]}" | grep -qx qemu-system-x86; then
        extra=(--allow-downgrades "qemu-utils/$(. /etc/os-release; echo "$VERSION_CODENAME")")
        rest=()
        for p in "${missing[@]}"; do [ "$p" = qemu-utils ] || rest+=("$p"); done
        missing=("${rest[@]}")
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" "${extra[@]}" >/dev/null
fi

bad=0
when=""; [ $check_only = 1 ] || when=" after the install"
for t in "${tools[@]}"; do
    [ -e "${t#*:}" ] || { say "error: ${t%%:*} missing (${t#*:})$when"; bad=1; }
done
[ "$(id -u)" = 0 ] || { say "error: not root: the tests create TAPs, namespaces and cgroups"; bad=1; }
if [ ! -e /dev/kvm ]; then say "error: /dev/kvm missing: vNode needs KVM"; bad=1
elif ! [ -r /dev/kvm ] || ! [ -w /dev/kvm ]; then say "error: /dev/kvm not readable and writable"; bad=1; fi
command -v cargo >/dev/null || { say "error: cargo missing: install Rust (rustup)"; bad=1; }
# Python tools the tests run: the OpenAPI validator (tests/vmm_api.rs checks docs/api/).
py_need=(openapi_spec_validator:openapi-spec-validator)
for m in "${py_need[@]}"; do
    python3 -c "import ${m%%:*}" 2>/dev/null && continue
    if [ $check_only = 0 ]; then say "installing python package ${m#*:}"; python3 -m pip install -q "${m#*:}" >&2 || true; fi
    python3 -c "import ${m%%:*}" 2>/dev/null || { say "error: python package ${m#*:} missing"; bad=1; }
done
exit $bad
