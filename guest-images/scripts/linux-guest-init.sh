#!/bin/sh
# vNode guest /sbin/init (installed into rootfs.ext4 by guest-images/scripts/linux.sh).
# Brings the system up, runs the job named on the kernel command line, prints its results as
# JSON lines between markers on the console, and powers off.
#
#   vnode.job=boot            (default) system facts: kernel, cpus, memory, uptime
#   vnode.job=fio-verify      fio random writes with crc32c verification on a virtio-blk disk
#                             (vnode.fio_runtime=S: time-based, verified as it goes: verify_backlog)
#   vnode.job=fio-randread    fio 4 KiB random reads, libaio, direct, iodepth 32, time-based
#                             (vnode.fio_runtime, default 10) on vnode.fio_target (default /dev/vdb)
#   vnode.job=memcached-serve memcached on 0.0.0.0:11211 (eth0 with vnode.ip=ADDR/PREFIX); prints a
#                             READY line, serves until a line "stop" arrives on the console
#                             (or vnode.serve_time=600 s pass), then prints memcached's stats
#   vnode.job=memcached-bench memcached + memtier_benchmark if present, else memcaslap (memaslap)
#   vnode.job=redis-bench     redis-server + memtier_benchmark if present, else redis-benchmark
#   vnode.job=all             boot, fio-verify, memcached-bench, redis-bench
#   vnode.job=idle            waits vnode.idle_time=600 s (the host acts on the running system, e.g.
#                             presses the power button)
#   vnode.job=shell           an interactive shell on the console; power off when it exits
#   vnode.job=NAME            runs /etc/vnode/jobs/NAME if present (a user's job added to the image)
# Options: vnode.fio_size=64M vnode.fio_target=/var/tmp/fio-verify.dat (or /dev/vdb)
#          vnode.fio_bs=4k vnode.fio_iodepth=16 vnode.bench_time=10 (seconds)
#          vnode.clients=8 (connections) vnode.threads=1 vnode.mem=128 (server MiB)
#          vnode.keys=10000 (key space) vnode.requests=N (redis-benchmark requests per test; default: sized to bench_time)
#          vnode.exit=poweroff|reboot|halt (reboot: for a VMM without ACPI power-off; i8042 reset)
#          vnode.ip=ADDR/PREFIX (eth0, or vnode.iface=NAME) vnode.gw=ADDR (default route)
#          vnode.fio_runtime=S vnode.fio_backlog=64 (fio-verify: blocks written between verifies)
#
# Console protocol (one item per line):
#   VNODE-INIT-UP uptime=<s> ...
#   VNODE-JSON-BEGIN
#   {"job":"...", ...}            one or more JSON objects, one per line
#   VNODE-JSON-END
#   VNODE-EXIT rc=<n>             then the machine powers off (or reboots, see vnode.exit)
# The ACPI power button (vnode's PUT /vm/shutdown presses it): VNODE-POWER-BUTTON, then the
# machine syncs and powers off as at the end of a job, whatever the job was doing.
# A job that serves (memcached-serve) prints {"job":...,"ready":true,...} between the markers when
# the host may start its load, then waits for a console line "stop" (the VMM forwards its stdin to
# the serial port); its results follow as further JSON lines before VNODE-JSON-END.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=linux LANG=C
umask 022
cd /

up() { cut -d' ' -f1 /proc/uptime; }

# Command line -> variables: vnode.fio_size=1G -> V_fio_size=1G
read_config() {
    V_job=boot V_exit=poweroff V_fio_size=64M V_fio_target= V_fio_bs=4k V_fio_iodepth= V_fio_runtime=
    V_fio_backlog=64 V_bench_time=10 V_clients=8 V_threads=1 V_mem=128 V_keys=10000
    V_ip= V_gw= V_iface= V_serve_time=600
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
        memtier "$(command -v memtier_benchmark >/dev/null && echo yes || echo no)" \
        net "$NET_STATUS" ifaces "$(ls /sys/class/net 2>/dev/null | tr '\n' ' ' | sed 's/ $//')"
}

# fio's terse v3 output -> JSON fields. Columns: 5 error; read 6 KiB 7 bw(KiB/s) 8 iops
# 9 runtime(ms) 14-17 clat min/max/mean/dev (us) 18-37 clat percentiles "P%=us"; write 47 KiB 48 bw
# 49 iops 50 runtime(ms).
fio_terse_awk='function pct(first, want,   i, kv) { for (i = first; i < first + 20; i++) {
        split($i, kv, "%="); if (kv[1] + 0 == want) return kv[2] + 0 } return "null" }'

job_fio_verify() {
    local t=${V_fio_target:-/var/tmp/fio-verify.dat} log=${TMPDIR:-/tmp}/fio-verify.log rc frc=0
    local timed= flog=${TMPDIR:-/tmp}/fio-verify-final.log
    [ -b "$t" ] || mkdir -p "$(dirname "$t")"
    # Random writes over the area, each block with a crc32c header. Size-based (default): one
    # pass, then a read-back verify pass in the same job. Time-based (vnode.fio_runtime=S): fio
    # skips its own verify pass once the runtime is up, so (1) it verifies as it goes: every
    # vnode.fio_backlog blocks written are read back and checked (verify_backlog), and (2) a
    # second fio then reads the whole area and checks every block's header and crc32c (this
    # catches a block that went bad after its backlog check; it needs every block written once,
    # which the random map guarantees once write_kib >= size). A wrong or lost write fails the
    # job (verify_fatal).
    [ -n "$V_fio_runtime" ] && timed="--time_based --runtime=$V_fio_runtime --verify_backlog=$V_fio_backlog"
    fio --name=fio-verify --filename="$t" --size="$V_fio_size" --rw=randwrite --bs="$V_fio_bs" \
        --ioengine=libaio --iodepth="${V_fio_iodepth:-16}" --direct=1 --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --randrepeat=0 --verify_state_save=0 $timed \
        --output-format=terse --terse-version=3 >"$log" 2>&1
    rc=$?
    : >"$flog"
    if [ -n "$timed" ] && [ $rc -eq 0 ]; then
        fio --name=fio-verify-final --filename="$t" --size="$V_fio_size" --rw=read --bs="$V_fio_bs" \
            --ioengine=libaio --iodepth="${V_fio_iodepth:-16}" --direct=1 --verify=crc32c \
            --verify_fatal=1 --verify_state_save=0 --output-format=terse --terse-version=3 >"$flog" 2>&1
        frc=$?
    fi
    awk -F';' -v rc=$rc -v frc=$frc -v t="$t" -v sz="$V_fio_size" -v bs="$V_fio_bs" -v rt="${V_fio_runtime:-0}" \
        -v bl="$V_fio_backlog" -v bsk="$(fio_kib "$V_fio_bs")" -v szk="$(fio_kib "$V_fio_size")" '
        FILENAME == ARGV[2] && $1 == 3 { fkib = $6; fms = $9; ferr = $5; next }
        FILENAME == ARGV[1] && $1 == 3 { found = 1; for (i = 1; i <= NF; i++) m[i] = $i }
        END {
            if (!found) { printf "{\"job\":\"fio-verify\",\"rc\":%d,\"target\":\"%s\",\"error\":\"no terse output\",\"verified\":false}\n", rc, t; exit }
            # size-based: all that was written was read back; time-based: all but the last
            # backlog as it went, and the final pass read the whole area without an error.
            # Interleaved verify reads get a meaningless read runtime from fio: rate them over the run.
            vbw = m[7]; viops = m[8]; vms = m[9]; final = "null"
            if (rt > 0) {
                ok = m[6] > 0 && m[47] - m[6] <= bl * bsk && m[47] >= szk && frc == 0 && ferr == 0 && fkib == szk
                if (m[50] > 0 && bsk > 0) { vbw = int(m[6] * 1000 / m[50]); viops = int(m[6] / bsk * 1000 / m[50]); vms = m[50] }
                final = sprintf("{\"rc\":%d,\"error\":%s,\"read_kib\":%s,\"ms\":%s}", frc, ferr == "" ? "null" : ferr, fkib == "" ? 0 : fkib, fms == "" ? 0 : fms)
                if (m[47] < szk) note = ",\"note\":\"the run wrote less than the area (size) once: lower vnode.fio_size or raise vnode.fio_runtime\""
            } else ok = m[6] == m[47]
            printf "{\"job\":\"fio-verify\",\"rc\":%d,\"target\":\"%s\",\"size\":\"%s\",\"bs\":\"%s\",\"runtime_s\":%s,\"error\":%s,\"write_kib\":%s,\"write_bw_kib_s\":%s,\"write_iops\":%s,\"write_ms\":%s,\"verify_read_kib\":%s,\"verify_bw_kib_s\":%s,\"verify_iops\":%s,\"verify_ms\":%s,\"final_verify\":%s,\"verified\":%s%s}\n",
                rc, t, sz, bs, rt, m[5], m[47], m[48], m[49], m[50], m[6], vbw, viops, vms, final, (rc==0 && m[5]==0 && ok) ? "true" : "false", note }' "$log" "$flog"
    [ $rc -eq 0 ] || grep -v '^3;' "$log" | tail -n 8 >&2
    [ $frc -eq 0 ] || grep -v '^3;' "$flog" | tail -n 8 >&2
    [ -b "$t" ] || rm -f "$t"
    [ $rc -eq 0 ] && [ $frc -eq 0 ]
}

# fio_kib SIZE: 4k -> 4, 64K -> 64, 1m -> 1024, 512 -> 0 (bytes below 1 KiB)
fio_kib() {
    case "$1" in
        *[kK]) echo "${1%[kK]}" ;;
        *[mM]) echo $(( ${1%[mM]} * 1024 )) ;;
        *[gG]) echo $(( ${1%[gG]} * 1048576 )) ;;
        *) echo $(( $1 / 1024 )) ;;
    esac
}

job_fio_randread() {
    local t=${V_fio_target:-/dev/vdb} log=${TMPDIR:-/tmp}/fio-randread.log rc sz=
    # 4 KiB random reads, libaio, O_DIRECT, iodepth 32, for vnode.fio_runtime seconds: the IOPS
    # a disk gives a guest. On a file (not a block device) fio lays out vnode.fio_size first.
    if [ -b "$t" ]; then :; elif [ -e "$t" ] || [ "${t#/dev/}" = "$t" ]; then sz="--size=$V_fio_size"
    else json job fio-randread rc 1 target "$t" error "no such block device $t (a second disk: vnode run --disk ... --disk DATA)"; return 1; fi
    fio --name=fio-randread --filename="$t" $sz --rw=randread --bs=4k --ioengine=libaio \
        --iodepth="${V_fio_iodepth:-32}" --direct=1 --time_based --runtime="${V_fio_runtime:-10}" \
        --norandommap --randrepeat=0 --output-format=terse --terse-version=3 >"$log" 2>&1
    rc=$?
    awk -F';' -v rc=$rc -v t="$t" -v rt="${V_fio_runtime:-10}" -v qd="${V_fio_iodepth:-32}" "$fio_terse_awk"'
        $1==3{found=1;
        printf "{\"job\":\"fio-randread\",\"rc\":%d,\"target\":\"%s\",\"bs\":\"4k\",\"iodepth\":%d,\"runtime_s\":%s,\"error\":%s,\"read_kib\":%s,\"iops\":%s,\"bw_kib_s\":%s,\"read_ms\":%s,\"clat_mean_us\":%s,\"clat_p50_us\":%s,\"clat_p99_us\":%s}\n",
            rc, t, qd, rt, $5, $6, $8, $7, $9, $16, pct(18, 50), pct(18, 99) }
        END{ if (!found) printf "{\"job\":\"fio-randread\",\"rc\":%d,\"target\":\"%s\",\"error\":\"no terse output\"}\n", rc, t }' "$log"
    [ $rc -eq 0 ] || grep -v '^3;' "$log" | tail -n 8 >&2
    [ -b "$t" ] || [ -z "$sz" ] || rm -f "$t"
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

# The first network interface that is not lo (virtio_net's eth0), or vnode.iface=NAME.
net_iface() {
    if [ -n "$V_iface" ]; then echo "$V_iface"; return; fi
    ls /sys/class/net 2>/dev/null | grep -v '^lo$' | head -n1
}

# vnode.ip=ADDR/PREFIX [vnode.gw=ADDR]: configure the guest's NIC (busybox ip). Waits up to 5 s for
# the interface to appear (virtio_net is loaded by the initramfs). Sets NET_STATUS for the JSON.
NET_STATUS=none
setup_net() {
    local dev i=0
    [ -n "$V_ip" ] || return 0
    case "$V_ip" in */*) ;; *) NET_STATUS="error: vnode.ip=$V_ip needs a prefix, e.g. 10.0.0.2/24"; return 1 ;; esac
    while dev=$(net_iface); [ -z "$dev" ] && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
    [ -n "$dev" ] || { NET_STATUS="error: no network interface (virtio-net: vnode run --net tap=NAME)"; return 1; }
    ip link set "$dev" up && ip addr add "$V_ip" dev "$dev" || { NET_STATUS="error: cannot configure $dev"; return 1; }
    if [ -n "$V_gw" ]; then ip route add default via "$V_gw" dev "$dev" || { NET_STATUS="error: cannot add route via $V_gw"; return 1; }; fi
    NET_STATUS="$dev $V_ip"
}

# memcached's "stats" -> JSON fields (numbers only).
memcached_stats_json() {
    printf 'stats\r\nquit\r\n' | nc -w 2 127.0.0.1 11211 2>/dev/null | tr -d '\r' | awk -v job="$1" '
        $1=="STAT" && $3 ~ /^[0-9]+(\.[0-9]+)?$/ && $2 ~ /^(uptime|curr_connections|total_connections|cmd_get|cmd_set|get_hits|get_misses|curr_items|total_items|bytes|bytes_read|bytes_written|evictions|threads)$/ {
            out = out sprintf(",\"%s\":%s", $2, $3); n++ }
        END{ if (n == 0) printf "{\"job\":\"%s\",\"error\":\"no stats from memcached\"}\n", job;
             else printf "{\"job\":\"%s\"%s}\n", job, out; exit (n == 0) }'
}

job_memcached_serve() {
    local line= rc=0 got=timeout
    [ "${NET_STATUS#error}" = "$NET_STATUS" ] || { json job memcached-serve ready false error "$NET_STATUS"; return 1; }
    memcached -u root -d -l 0.0.0.0 -p 11211 -m "$V_mem" -t "$V_threads" -c 4096 -P /run/memcached.pid || {
        json job memcached-serve ready false error "memcached did not start"; return 1; }
    wait_for 10 memcached_up || { json job memcached-serve ready false error "memcached not listening"; return 1; }
    # The host starts its load client when it sees this line; it ends the job with "stop".
    json job memcached-serve ready true ip "${V_ip%/*}" port 11211 iface "$(net_iface)" net "$NET_STATUS"
    stty -echo 2>/dev/null   # the console does not echo the host's "stop" into the results
    local end=$(( $(cut -d. -f1 /proc/uptime) + V_serve_time ))
    while [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do
        if read -r -t 1 line; then
            line=$(printf '%s' "$line" | tr -d '\r ')
            [ "$line" = stop ] && { got=stop; break; }
        elif [ $? -le 128 ]; then
            sleep 1   # end of input (not a timeout): nothing will come, wait out serve_time
        fi
    done
    stty echo 2>/dev/null
    memcached_stats_json memcached-stats || rc=1
    json job memcached-serve ended "$got" serve_time_s "$V_serve_time"
    [ $got = stop ] || rc=1
    kill "$(cat /run/memcached.pid)" 2>/dev/null
    return $rc
}

run_job() {
    case "$1" in
        boot) job_boot ;;
        fio-verify) job_fio_verify ;;
        fio-randread) job_fio_randread ;;
        memcached-serve) job_memcached_serve ;;
        memcached-bench) job_memcached_bench ;;
        redis-bench) job_redis_bench ;;
        idle) json job idle ready true; sleep "${V_idle_time:-600}" ;;
        all) local r=0; job_boot || r=1; job_fio_verify || r=1; job_memcached_bench || r=1; job_redis_bench || r=1; return $r ;;
        *) if [ -x "/etc/vnode/jobs/$1" ]; then "/etc/vnode/jobs/$1"
           else json job "$1" error "unknown job (known: boot fio-verify fio-randread memcached-bench memcached-serve redis-bench all shell)"; return 2; fi ;;
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
    setup_net
    echo "VNODE-JSON-BEGIN"; run_job "$V_job"; rc=$?; echo "VNODE-JSON-END"; echo "VNODE-EXIT rc=$rc"; exit $rc
fi
# The ACPI power button (button.ko binds vnode's PNP0C0C, evdev gives it a /dev/input node):
# the first event it sends (KEY_POWER, 24 bytes) ends the system like the end of a job.
watch_power_button() {
    modprobe -q evdev 2>/dev/null
    modprobe -q button 2>/dev/null || return 0
    local e dev=
    for e in /sys/class/input/event*; do
        [ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ] && dev=/dev/input/${e##*/}
    done
    [ -n "$dev" ] || return 0
    ( head -c 24 "$dev" >/dev/null && echo "VNODE-POWER-BUTTON uptime=$(up)" && finish ) &
}

setup_system
read_config
setup_net
watch_power_button
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
