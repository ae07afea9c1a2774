#!/bin/sh
# vNode guest /sbin/init (installed into rootfs.ext4 by guest-images/scripts/linux.sh).
# Brings the system up, runs the job named on the kernel command line, prints its results as
# JSON lines between markers on the console, and powers off.
#
#   vnode.job=boot            (default) system facts: kernel, cpus, memory, uptime
#   vnode.job=fio-verify      fio random writes with crc32c verification on a virtio-blk disk
#   vnode.job=memcached-bench memcached + memtier_benchmark if present, else memcaslap (memaslap)
#   vnode.job=redis-bench     redis-server + memtier_benchmark if present, else redis-benchmark
#   vnode.job=all             boot, fio-verify, memcached-bench, redis-bench
#   vnode.job=shell           an interactive shell on the console; power off when it exits
#   vnode.job=NAME            runs /etc/vnode/jobs/NAME if present (a user's job added to the image)
# Options: vnode.fio_size=64M vnode.fio_target=/var/tmp/fio-verify.dat (or /dev/vdb)
#          vnode.fio_bs=4k vnode.fio_iodepth=16 vnode.bench_time=10 (seconds)
#          vnode.clients=8 (connections) vnode.threads=1 vnode.mem=128 (server MiB)
#          vnode.keys=10000 (key space) vnode.requests=N (redis-benchmark requests per test; default: sized to bench_time)
#          vnode.exit=poweroff|reboot|halt (reboot: for a VMM without ACPI power-off; i8042 reset)
#
# Console protocol (one item per line):
#   VNODE-INIT-UP uptime=<s> ...
#   VNODE-JSON-BEGIN
#   {"job":"...", ...}            one or more JSON objects, one per line
#   VNODE-JSON-END
#   VNODE-EXIT rc=<n>             then the machine powers off (or reboots, see vnode.exit)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=linux LANG=C
umask 022
cd /

up() { cut -d' ' -f1 /proc/uptime; }

# Command line -> variables: vnode.fio_size=1G -> V_fio_size=1G
read_config() {
    V_job=boot V_exit=poweroff V_fio_size=64M V_fio_target=/var/tmp/fio-verify.dat V_fio_bs=4k V_fio_iodepth=16
    V_bench_time=10 V_clients=8 V_threads=1 V_mem=128 V_keys=10000
    for w in ${VNODE_CMDLINE:-$(cat /proc/cmdline)}; do
        case "$w" in
            vnode.*=*) k=${w%%=*}; k=$(echo "${k#vnode.}" | tr -c 'a-zA-Z0-9_\n' _); eval "V_$k=\${w#*=}" ;;
        esac
    done

    NCPU=$(grep -c ^processor /proc/cpuinfo)
    MEMKB=$(awk '/^MemTotal:/{print $2}' /proc/meminfo)
}

# json k v [k v]... : one JSON object on one line; values that look like numbers stay numbers.
json() {
    local sep= out='{' k v
    while [ $# -ge 2 ]; do
        k=$1 v=$2; shift 2
        case "$v" in
            true|false|null) ;;
            ''|.|*[!0-9.eE+-]*|*.*.*|[eE+]*|*[+-]) v="\"$(printf '%s' "$v" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr '\n\t' '  ')\"" ;;
        esac
        out="$out$sep\"$k\":$v"; sep=,
    done
    echo "$out}"
}

wait_for() {  # seconds command...: retries the command every 0.1 s
    local i=0 n=$(($1 * 10)); shift
    while [ $i -lt $n ]; do
        "$@" >/dev/null 2>&1 && return 0
        usleep 100000; i=$((i + 1))
    done
    return 1
}
memcached_up() { printf 'version\r\n' | nc -w 1 127.0.0.1 11211 2>/dev/null | grep -q VERSION; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

# memtier_benchmark's "Totals" line: Type Ops/sec Hits/sec Misses/sec Avg.Latency p50 p99 p99.9 KB/sec
memtier() {  # job protocol port
    local log=/tmp/memtier.$1.log rc
    memtier_benchmark -s 127.0.0.1 -p "$3" -P "$2" --test-time="$V_bench_time" -t "$V_threads" \
        -c "$V_clients" --ratio=1:4 --key-pattern=R:R --key-maximum="$V_keys" --hide-histogram >"$log" 2>&1
    rc=$?
    awk -v job="$1" -v rc=$rc -v t="$V_bench_time" '/^Totals/{tot=$0} END{
        n=split(tot, f, " ");
        if (n < 6) { printf "{\"job\":\"%s\",\"client\":\"memtier_benchmark\",\"rc\":%d,\"error\":\"no Totals line\"}\n", job, rc; exit }
        printf "{\"job\":\"%s\",\"client\":\"memtier_benchmark\",\"rc\":%d,\"seconds\":%s,\"ops_per_sec\":%s,\"hits_per_sec\":%s,\"misses_per_sec\":%s,\"avg_latency_ms\":%s,\"p50_latency_ms\":%s,\"p99_latency_ms\":%s,\"kb_per_sec\":%s}\n", job, rc, t, f[2], f[3], f[4], f[5], f[6], f[7], f[n] }' "$log"
    [ $rc -eq 0 ] || tail -n 5 "$log" >&2
    return $rc
}

job_boot() {
    json job boot kernel "$(uname -r)" cpus "$NCPU" mem_kb "$MEMKB" uptime_s "$(up)" \
        root "$(awk '$2=="/"{print $1; exit}' /proc/mounts)" \
        virtio_devices "$(ls /sys/bus/virtio/devices 2>/dev/null | wc -l)" \
        block "$(ls /sys/block | tr '\n' ' ' | sed 's/ $//')" \
        memtier "$(command -v memtier_benchmark >/dev/null && echo yes || echo no)"
}

job_fio_verify() {
    local t=$V_fio_target log=/tmp/fio.log rc
    [ -b "$t" ] || mkdir -p "$(dirname "$t")"
    # Random writes of the whole area, each block with a crc32c header, then a read-back verify
    # pass in the same job: a wrong or lost write fails the job (verify_fatal).
    fio --name=fio-verify --filename="$t" --size="$V_fio_size" --rw=randwrite --bs="$V_fio_bs" \
        --ioengine=libaio --iodepth="$V_fio_iodepth" --direct=1 --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --randrepeat=0 --output-format=terse --terse-version=3 >"$log" 2>&1
    rc=$?
    # terse v3: 5 error; read 6 kb 7 bw(KiB/s) 8 iops 9 runtime(ms); write 47 kb 48 bw 49 iops 50 runtime
    awk -F';' -v rc=$rc -v t="$t" -v sz="$V_fio_size" -v bs="$V_fio_bs" '$1==3{found=1;
        printf "{\"job\":\"fio-verify\",\"rc\":%d,\"target\":\"%s\",\"size\":\"%s\",\"bs\":\"%s\",\"error\":%s,\"write_kib\":%s,\"write_bw_kib_s\":%s,\"write_iops\":%s,\"write_ms\":%s,\"verify_read_kib\":%s,\"verify_bw_kib_s\":%s,\"verify_iops\":%s,\"verify_ms\":%s,\"verified\":%s}\n",
            rc, t, sz, bs, $5, $47, $48, $49, $50, $6, $7, $8, $9, (rc==0 && $5==0 && $6==$47) ? "true" : "false" }
        END{ if (!found) printf "{\"job\":\"fio-verify\",\"rc\":%d,\"target\":\"%s\",\"error\":\"no terse output\",\"verified\":false}\n", rc, t }' "$log"
    [ $rc -eq 0 ] || tail -n 8 "$log" >&2
    [ -b "$t" ] || rm -f "$t"
    return $rc
}

job_memcached_bench() {
    local rc log=/tmp/memcaslap.log
    memcached -u root -d -l 127.0.0.1 -p 11211 -m "$V_mem" -t "$V_threads" -P /run/memcached.pid || {
        json job memcached-bench error "memcached did not start"; return 1; }
    wait_for 10 memcached_up || { json job memcached-bench error "memcached not listening"; return 1; }
    if command -v memtier_benchmark >/dev/null; then
        memtier memcached-bench memcache_binary 11211; rc=$?
    else
        memcaslap -s 127.0.0.1:11211 -t "${V_bench_time}s" -T "$V_threads" -c "$V_clients" >"$log" 2>&1
        rc=$?
        # memaslap's summary: "Run time: 10.0s Ops: 123456 TPS: 12345 Net_rate: 1.2M/s"
        awk -v rc=$rc '/^Run time:/{rt=$3; ops=$5; tps=$7; net=$9}
            /^Get Statistics/{s="get"} /^Set Statistics/{s="set"} /^Total Statistics/{s="total"}
            /^Period/ && s!="" && lat[s]=="" {lat[s]=$NF}
            END{ sub(/s$/, "", rt);
                if (ops == "") { printf "{\"job\":\"memcached-bench\",\"client\":\"memcaslap\",\"rc\":%d,\"error\":\"no summary line\"}\n", rc; exit }
                printf "{\"job\":\"memcached-bench\",\"client\":\"memcaslap\",\"rc\":%d,\"seconds\":%s,\"ops\":%s,\"ops_per_sec\":%s,\"net_rate\":\"%s\"}\n", rc, rt, ops, tps, net }' "$log"
        [ $rc -eq 0 ] || tail -n 8 "$log" >&2
    fi
    # A correctness spot check through a second client: set, get back, compare.
    printf 'set vnode-check 0 0 5\r\nhello\r\nget vnode-check\r\nquit\r\n' | nc -w 2 127.0.0.1 11211 2>/dev/null | grep -q hello \
        && json job memcached-check ok true || { json job memcached-check ok false; rc=1; }
    kill "$(cat /run/memcached.pid)" 2>/dev/null
    return $rc
}

job_redis_bench() {
    local rc log=/tmp/redis-benchmark.log
    redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --protected-mode no \
        --daemonize yes --pidfile /run/redis.pid --logfile /tmp/redis.log --dir /tmp || {
        json job redis-bench error "redis-server did not start"; return 1; }
    wait_for 10 redis_up || { json job redis-bench error "redis-server not listening"; return 1; }
    if command -v memtier_benchmark >/dev/null; then
        memtier redis-bench redis 6379; rc=$?
    else
        # redis-benchmark counts requests, not seconds: size the run from a short calibration so
        # that SET and GET take about vnode.bench_time seconds together (or vnode.requests=N).
        local n=${V_requests:-}
        if [ -z "$n" ]; then
            n=$(redis-benchmark -h 127.0.0.1 -p 6379 -c "$V_clients" -n 2000 -t set -d 64 --csv 2>/dev/null \
                | awk -F'","' -v t="$V_bench_time" '/SET/{r=$2+0; n=int(r*t/2); if (n<1000) n=1000; print n}')
            [ -n "$n" ] || n=10000
        fi
        redis-benchmark -h 127.0.0.1 -p 6379 -c "$V_clients" -n "$n" -t set,get -r "$V_keys" -d 64 --csv >"$log" 2>&1
        rc=$?
        # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
        awk -F'","' -v rc=$rc -v n=$n '{gsub(/^"|"$/, "")} $1=="SET"||$1=="GET"{found=1;
            printf "{\"job\":\"redis-bench\",\"client\":\"redis-benchmark\",\"rc\":%d,\"test\":\"%s\",\"requests\":%d,\"ops_per_sec\":%s,\"avg_latency_ms\":%s,\"p50_latency_ms\":%s,\"p99_latency_ms\":%s}\n", rc, $1, n, $2, $3, $5, $7 }
            END{ if (!found) printf "{\"job\":\"redis-bench\",\"client\":\"redis-benchmark\",\"rc\":%d,\"error\":\"no csv output\"}\n", rc }' "$log"
        [ $rc -eq 0 ] || tail -n 8 "$log" >&2
    fi
    [ "$(redis-cli -h 127.0.0.1 -p 6379 set vnode-check hello >/dev/null && redis-cli -h 127.0.0.1 -p 6379 get vnode-check)" = hello ] \
        && json job redis-check ok true || { json job redis-check ok false; rc=1; }
    redis-cli -h 127.0.0.1 -p 6379 shutdown nosave >/dev/null 2>&1
    return $rc
}

run_job() {
    case "$1" in
        boot) job_boot ;;
        fio-verify) job_fio_verify ;;
        memcached-bench) job_memcached_bench ;;
        redis-bench) job_redis_bench ;;
        all) local r=0; job_boot || r=1; job_fio_verify || r=1; job_memcached_bench || r=1; job_redis_bench || r=1; return $r ;;
        *) if [ -x "/etc/vnode/jobs/$1" ]; then "/etc/vnode/jobs/$1"
           else json job "$1" error "unknown job (known: boot fio-verify memcached-bench redis-bench all shell)"; return 2; fi ;;
    esac
}

finish() {
    sync
    case "$V_exit" in
        reboot) reboot -f ;;
        halt) halt -f ;;
        *) poweroff -f ;;
    esac
    echo o > /proc/sysrq-trigger; sleep 5; reboot -f
}

setup_system() {
    mounted() { [ -r /proc/mounts ] && grep -q "^[^ ]* $1 " /proc/mounts; }
    mounted /proc || mount -t proc proc /proc
    mounted /sys || mount -t sysfs sysfs /sys
    mounted /dev || mount -t devtmpfs devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts 2>/dev/null
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm 2>/dev/null
    mount -t tmpfs -o mode=0755 tmpfs /run
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    grep -q ' / ext4 rw' /proc/mounts || mount -o remount,rw / 2>/dev/null
    hostname vnode-guest
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
    echo 0 > /proc/sys/kernel/printk 2>/dev/null  # keep kernel messages off the results
}

# Test hook: VNODE_INIT_TEST=1 /sbin/init runs the job without setting up or powering off the
# system (e.g. in a chroot with private mount and network namespaces on the build host).
if [ "${VNODE_INIT_TEST:-}" = 1 ]; then
    read_config
    echo "VNODE-JSON-BEGIN"; run_job "$V_job"; rc=$?; echo "VNODE-JSON-END"; echo "VNODE-EXIT rc=$rc"; exit $rc
fi
setup_system
read_config
echo "VNODE-INIT-UP uptime=$(up) kernel=$(uname -r) cpus=$NCPU mem_kb=$MEMKB job=$V_job"

if [ "$V_job" = shell ]; then
    echo "vnode: shell on the console; 'exit' powers off"
    setsid cttyhack sh -l
    finish
fi

start=$(up)
echo "VNODE-JSON-BEGIN"
run_job "$V_job"
rc=$?
json job summary name "$V_job" rc "$rc" started_s "$start" ended_s "$(up)"
echo "VNODE-JSON-END"
echo "VNODE-EXIT rc=$rc"
finish
