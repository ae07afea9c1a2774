//! `vnode-bench handshake` (issue 10): what vNode's challenge-response authentication costs.
//!
//! Real `vnode-memd` and `vnode-blkd` processes on loopback, each twice: with a cluster key
//! (every connection proves a per-vNode or per-export credential by HMAC challenge-response,
//! both ways) and `--insecure` (no proof at all, the cheapest handshake the protocol has; the
//! plain-secret handshake the key replaced is gone, so this is the baseline). For each:
//! - connection set-up: connect, handshake, first answer (a memory `Ping`, an NBD `GO`), against
//!   the platform floor (a TCP connect and the server's first frame on the same server);
//! - the fault path: single-page (4 KiB) reads on one established connection, p50 and p99.
//!
//! The runs are interleaved (secure, insecure, floor, secure, ...) so load drifts hit all alike;
//! each figure is the median over runs of that run's per-operation median (or p99).

use std::io::Read;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use remote_blk::nbd::client::{ConnectOptions, NbdClient};
use remote_mem::{ClientAuth, MemClient};
use serde_json::json;
use vnode_common::cred;
use vnode_common::ready::{spawn_and_wait, Started};
use vnode_common::secret::Secret;

use super::guestrun::binary;
use super::stats::median;
use super::table::{num, ratio, Table};
use super::{write_out, Common, Env};

#[derive(Args)]
pub struct HandshakeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections set up per run and kind (50 with --quick).
    #[arg(long, default_value_t = 300)]
    conns: usize,
    /// Single-page reads per run and kind (1000 with --quick).
    #[arg(long, default_value_t = 5000)]
    reads: usize,
}

const KEY: &str = "vnode-bench handshake cluster key";
const REGION_PAGES: u64 = 256;
const EXPORT: &str = "d";

/// Per-run figures of one kind, in microseconds.
#[derive(Default)]
struct Series {
    connect_p50: Vec<f64>,
    connect_p99: Vec<f64>,
    read_p50: Vec<f64>,
    read_p99: Vec<f64>,
}

impl Series {
    fn add_connects(&mut self, us: &mut [f64]) {
        let (p50, p99) = p50_p99(us);
        self.connect_p50.push(p50);
        self.connect_p99.push(p99);
    }
    fn add_reads(&mut self, us: &mut [f64]) {
        let (p50, p99) = p50_p99(us);
        self.read_p50.push(p50);
        self.read_p99.push(p99);
    }
}

fn p50_p99(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// The ratio of two samples' medians (None if either is empty).
fn over(a: &[f64], b: &[f64]) -> Option<f64> {
    Some(median(a)? / median(b)?)
}

fn key() -> Result<Secret> {
    Secret::from_bytes(KEY.as_bytes().to_vec()).context("the bench key")
}

/// One server process with its flags.
/// Its log goes to `name.log` in the bench's directory.
fn start(env: &Env, name: &str, args: &[&str], secure: bool) -> Result<Started> {
    let log = env.out.join("handshake").join(format!("{name}.log"));
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut cmd = Command::new(binary(&env.bin_dir, name)?);
    cmd.args(args).stderr(log);
    if secure {
        cmd.env("VNODE_SECRET", KEY);
    } else {
        cmd.arg("--insecure").env_remove("VNODE_SECRET");
    }
    spawn_and_wait(&mut cmd, Duration::from_secs(20)).with_context(|| format!("starting {name}"))
}

/// Microseconds of `f`, which must succeed.
fn time_us(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

/// The floor: a TCP connect to `addr` and the first bytes the server sends (both servers
/// speak first: the memory server its challenge; the NBD server its greeting).
fn floor_connects(addr: &str, n: usize, first: usize) -> Result<Vec<f64>> {
    (0..n)
        .map(|_| {
            time_us(|| {
                let mut s = TcpStream::connect(addr).context("connect")?;
                s.set_nodelay(true)?;
                let mut b = vec![0u8; first];
                s.read_exact(&mut b).context("the server's first frame")?;
                Ok(())
            })
        })
        .collect()
}

fn mem_connects(addr: &str, auth: &ClientAuth, n: usize) -> Result<Vec<f64>> {
    (0..n)
        .map(|_| {
            time_us(|| {
                let mut c = MemClient::connect(addr, auth)?;
                c.ping()?;
                Ok(())
            })
        })
        .collect()
}

/// Microseconds of each of `n` calls of `read` at pseudo-random indexes below `limit`.
fn random_reads(n: usize, limit: u64, mut read: impl FnMut(u64) -> Result<()>) -> Result<Vec<f64>> {
    let mut x = 0x9e37_79b9_u64;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (x >> 33) % limit;
            time_us(|| read(i))
        })
        .collect()
}

/// Single-page reads of an allocated region, on one connection.
fn mem_reads(addr: &str, auth: &ClientAuth, n: usize, region: u64) -> Result<Vec<f64>> {
    let mut c = MemClient::connect(addr, auth)?;
    c.alloc_region(region, REGION_PAGES)?;
    let mut page = vec![0u8; remote_mem::protocol::PAGE_SIZE];
    let out = random_reads(n, REGION_PAGES, |p| {
        Ok(c.read_pages(region, &[p], &mut page)?)
    })?;
    c.free_region(region)?;
    Ok(out)
}

fn nbd_connects(uri: &str, opts: &ConnectOptions, n: usize) -> Result<Vec<f64>> {
    (0..n)
        .map(|_| time_us(|| NbdClient::connect(uri, opts).map(drop).map_err(Into::into)))
        .collect()
}

fn nbd_reads(uri: &str, opts: &ConnectOptions, n: usize) -> Result<Vec<f64>> {
    let c = NbdClient::connect(uri, opts)?;
    let mut buf = vec![0u8; 4096];
    random_reads(n, c.size() / 4096, |b| Ok(c.read_at(&mut buf, b * 4096)?))
}

/// The memory protocol's greeting: the `Challenge` frame.
const MEM_CHALLENGE_LEN: usize = remote_mem::protocol::HEADER_LEN + remote_mem::protocol::NONCE_LEN;
/// NBD's newstyle greeting: NBDMAGIC, IHAVEOPT, handshake flags.
const NBD_GREETING_LEN: usize = 18;

pub fn run(env: &Env, a: &HandshakeArgs) -> Result<()> {
    let (conns, reads) = if env.quick {
        (a.conns.min(50), a.reads.min(1000))
    } else {
        (a.conns.max(1), a.reads.max(1))
    };
    let dir = env.out.join("handshake");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let img = dir.join("disk.img");
    let export = format!("{EXPORT}={}:64M", img.display());
    let mem_args = ["--listen", "127.0.0.1:0", "--capacity", "64M"];
    let blk_args = ["--listen", "127.0.0.1:0", "--export", export.as_str()];
    let mem_sec = start(env, "vnode-memd", &mem_args, true)?;
    let mem_ins = start(env, "vnode-memd", &mem_args, false)?;
    let blk_sec = start(env, "vnode-blkd", &blk_args, true)?;
    let blk_ins = start(env, "vnode-blkd", &blk_args, false)?;

    let key = key()?;
    let vnode_id = 0x0062_656e_6368;
    let auth_sec = ClientAuth::from_cluster_key(vnode_id, &key);
    let auth_ins = ClientAuth::insecure(vnode_id);
    let blk_opts_sec = ConnectOptions {
        credential: Some(cred::blk_credential(&key, EXPORT)),
        ..ConnectOptions::default()
    };
    let blk_opts_ins = ConnectOptions::default();
    let uri = |s: &Started| format!("nbd://{}/{EXPORT}", s.addr);

    let names = [
        "memory, challenge-response",
        "memory, --insecure",
        "memory, TCP floor",
        "NBD, challenge-response",
        "NBD, --insecure",
        "NBD, TCP floor",
    ];
    let mut s: Vec<Series> = names.iter().map(|_| Series::default()).collect();
    for run in 0..env.runs {
        let region = run as u64;
        s[0].add_connects(&mut mem_connects(&mem_sec.addr, &auth_sec, conns)?);
        s[1].add_connects(&mut mem_connects(&mem_ins.addr, &auth_ins, conns)?);
        s[2].add_connects(&mut floor_connects(
            &mem_sec.addr,
            conns,
            MEM_CHALLENGE_LEN,
        )?);
        s[0].add_reads(&mut mem_reads(&mem_sec.addr, &auth_sec, reads, region)?);
        s[1].add_reads(&mut mem_reads(&mem_ins.addr, &auth_ins, reads, region)?);
        s[3].add_connects(&mut nbd_connects(&uri(&blk_sec), &blk_opts_sec, conns)?);
        s[4].add_connects(&mut nbd_connects(&uri(&blk_ins), &blk_opts_ins, conns)?);
        s[5].add_connects(&mut floor_connects(&blk_sec.addr, conns, NBD_GREETING_LEN)?);
        s[3].add_reads(&mut nbd_reads(&uri(&blk_sec), &blk_opts_sec, reads)?);
        s[4].add_reads(&mut nbd_reads(&uri(&blk_ins), &blk_opts_ins, reads)?);
        eprintln!("  run {}/{} done", run + 1, env.runs);
    }
    report(env, conns, reads, &names, &s)
}

fn report(env: &Env, conns: usize, reads: usize, names: &[&str], s: &[Series]) -> Result<()> {
    let mut t = Table::new(&[
        "kind",
        "set-up p50 us",
        "p99 us",
        "x insecure",
        "x floor",
        "4K read p50 us",
        "p99 us",
        "x insecure",
    ]);
    let mut rows = Vec::new();
    for (i, (name, x)) in names.iter().zip(s).enumerate() {
        // Each kind's insecure baseline and floor sit in fixed places: mem 0-2, NBD 3-5.
        let base = &s[i / 3 * 3 + 1];
        let floor = &s[i / 3 * 3 + 2];
        let cell = |v: &[f64]| num(median(v), 1);
        t.row(vec![
            name.to_string(),
            cell(&x.connect_p50),
            cell(&x.connect_p99),
            ratio(over(&x.connect_p50, &base.connect_p50)),
            ratio(over(&x.connect_p50, &floor.connect_p50)),
            cell(&x.read_p50),
            cell(&x.read_p99),
            ratio(over(&x.read_p50, &base.read_p50)),
        ]);
        rows.push(json!({
            "kind": name,
            "connect_p50_us": x.connect_p50, "connect_p99_us": x.connect_p99,
            "read_p50_us": x.read_p50, "read_p99_us": x.read_p99,
        }));
    }
    let text = format!(
        "connection set-up ({conns} per run: connect, handshake, first answer) and single 4 KiB \
         reads ({reads} per run, one connection), median over {} runs of each run's p50/p99\n{}",
        env.runs,
        t.render()
    );
    println!("{text}");
    let json = json!({"conns": conns, "reads": reads, "runs": env.runs, "rows": rows});
    let p = write_out(
        &env.out,
        "handshake.json",
        &serde_json::to_string_pretty(&json)?,
    )?;
    println!("  raw figures: {}", p.display());
    Ok(())
}
