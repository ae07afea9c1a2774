#!/usr/bin/env python3
"""Compare vnode-blkd with qemu-nbd and nbdkit through fio's nbd engine on loopback TCP.

Every server exports the same raw file through the page cache (qemu-nbd --cache=writeback,
nbdkit file's default, vnode-blkd without --direct); the file is re-read into the cache right
before every fio run (DESIGN.md: kdamond pages out idle file cache after about a minute).
Each job runs RUNS times per server; the table shows the median of each metric and, on the
vnode-blkd rows, the ratio to the best peer (IOPS/bandwidth: higher is better; latency: lower).

Usage: nbd-bench.py --blkd PATH [--runs 3] [--runtime 5] [--size-mib 512] [--extra NAME=ARGS]
  --extra 'pool4=--threads pool:4' adds a vnode-blkd variant (threading-model measurements).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

JOBS = [
    # name, rw, bs, iodepth
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd32", "randread", "4k", 32),
    ("randwrite-4k-qd32", "randwrite", "4k", 32),
    ("seqread-1m-qd8", "read", "1m", 8),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(uri, proc, timeout=20.0):
    """Polls with a real NBD handshake (nbdinfo) until the server answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited early: {proc.args}")
        r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.05)
    sys.exit(f"server not ready: {uri}")


def start_blkd(blkd, img, extra_args):
    p = subprocess.Popen([blkd, "--listen", "127.0.0.1:0", "--export", f"disk={img}", *extra_args],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("listening on "):
        sys.exit(f"vnode-blkd did not start: {line!r}")
    return p, f"nbd://{line.split()[-1]}/disk"


def start_qemu_nbd(img):
    port = free_port()
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", str(port),
                          "-t", "-e", "8", "--cache=writeback", "--aio=threads", img],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"nbd://127.0.0.1:{port}/disk"
    wait_ready(uri, p)
    return p, uri


def start_nbdkit(img):
    port = free_port()
    p = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-e", "disk",
                          "file", f"file={img}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"nbd://127.0.0.1:{port}/disk"
    wait_ready(uri, p)
    return p, uri


def warm(img):
    with open(img, "rb") as f:
        while f.read(8 << 20):
            pass


def run_fio(uri, rw, bs, qd, runtime, size_mib):
    cmd = ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", f"--size={size_mib}M", "--time_based", f"--runtime={runtime}",
           "--ramp_time=1", "--randrepeat=0", "--norandommap", "--output-format=json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"fio failed: {' '.join(cmd)}\n{r.stderr}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    d = job["write" if "write" in rw else "read"]
    return {
        "iops": d["iops"],
        "bw": d["bw_bytes"] / 2**20,
        "mean": d["lat_ns"]["mean"] / 1000,
        "p99": d["clat_ns"]["percentile"]["99.000000"] / 1000,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blkd", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--extra", action="append", default=[])
    ap.add_argument("--jobs", default=",".join(j[0] for j in JOBS))
    ap.add_argument("--no-peers", action="store_true")
    a = ap.parse_args()
    for tool in ("fio", "qemu-nbd", "nbdkit", "nbdinfo"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (apt-get install fio qemu-utils nbdkit libnbd-bin)")

    tmp = tempfile.mkdtemp(prefix="nbd-bench-")
    img = os.path.join(tmp, "disk.img")
    with open(img, "wb") as f:  # real data, not a sparse file: every server reads the same pages
        chunk = os.urandom(1 << 20)
        for _ in range(a.size_mib):
            f.write(chunk)

    servers = [("vnode-blkd", lambda: start_blkd(a.blkd, img, []))]
    for spec in a.extra:
        name, _, args = spec.partition("=")
        servers.append((f"vnode-blkd:{name}", lambda args=args: start_blkd(a.blkd, img, args.split())))
    if not a.no_peers:
        servers += [("qemu-nbd", lambda: start_qemu_nbd(img)), ("nbdkit-file", lambda: start_nbdkit(img))]

    jobs = [j for j in JOBS if j[0] in a.jobs.split(",")]
    results = {}  # (job, server) -> list of runs
    procs = []
    try:
        started = []
        for name, start in servers:
            p, uri = start()
            procs.append(p)
            started.append((name, uri))
        # Interleave servers within each run so drift (other load, cache) hits all alike.
        for job, rw, bs, qd in jobs:
            for _ in range(a.runs):
                for name, uri in started:
                    warm(img)
                    results.setdefault((job, name), []).append(
                        run_fio(uri, rw, bs, qd, a.runtime, a.size_mib))
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"# fio nbd engine, loopback TCP, {a.size_mib} MiB file in page cache, "
          f"{a.runtime}s per run, median of {a.runs} runs")
    hdr = f"{'job':<18} {'server':<20} {'IOPS':>9} {'MiB/s':>8} {'mean us':>8} {'p99 us':>8}   vs best peer (IOPS, mean, p99)"
    print(hdr)
    print("-" * len(hdr))
    names = [n for n, _ in servers]
    peers = [n for n in names if not n.startswith("vnode-blkd")]
    for job, *_ in jobs:
        med = {n: {k: statistics.median(r[k] for r in results[(job, n)]) for k in ("iops", "bw", "mean", "p99")}
               for n in names}
        for n in names:
            m = med[n]
            line = f"{job:<18} {n:<20} {m['iops']:>9.0f} {m['bw']:>8.1f} {m['mean']:>8.1f} {m['p99']:>8.1f}"
            if n.startswith("vnode-blkd") and peers:
                best_iops = max(med[p]["iops"] for p in peers)
                best_mean = min(med[p]["mean"] for p in peers)
                best_p99 = min(med[p]["p99"] for p in peers)
                line += (f"   {m['iops'] / best_iops:.2f}x, {m['mean'] / best_mean:.2f}x, "
                         f"{m['p99'] / best_p99:.2f}x")
            print(line)
    print("(IOPS ratio > 1 is better; latency ratios < 1 are better)")


if __name__ == "__main__":
    main()
