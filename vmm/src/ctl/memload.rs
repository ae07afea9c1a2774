//! Load clients for a memcached that a guest serves: `memtier_benchmark` when it is on PATH, else
//! Debian's `memaslap`/`memcaslap` (libmemcached-tools), else a small built-in client speaking the
//! memcached text protocol. The built-in client verifies every value it reads back: each
//! connection owns a disjoint set of keys and knows the last value it stored under each, so a
//! wrong or stale value is counted as a mismatch (and fails the benchmark), never as a hit.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot connect to memcached at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("memcached I/O")]
    Io(#[from] std::io::Error),
    #[error("unexpected memcached reply {0:?}")]
    Protocol(String),
    #[error("cannot run {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("{client} failed ({status}): {tail}")]
    Client {
        client: String,
        status: String,
        tail: String,
    },
    #[error("{0}: no summary in its output")]
    NoSummary(String),
    #[error("a load thread panicked")]
    Thread,
}

/// Which client to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// memtier_benchmark if on PATH, else memaslap/memcaslap, else the built-in client.
    Auto,
    Memtier,
    Memaslap,
    Builtin,
}

/// The load to apply.
#[derive(Debug, Clone)]
pub struct Load {
    pub addr: SocketAddr,
    pub seconds: u64,
    pub connections: usize,
    /// Keys per connection.
    pub keys: usize,
    pub value_size: usize,
    /// Gets per set (memtier's 1:4 by default).
    pub gets_per_set: usize,
}

/// Runs `load` with the client `kind` resolves to; returns its results as JSON. The built-in
/// client's results include `mismatches`; a nonzero count is an error.
pub fn run(kind: ClientKind, load: &Load) -> Result<Value, LoadError> {
    let on_path = |p: &str| which(p).is_some();
    let kind = match kind {
        ClientKind::Auto if on_path("memtier_benchmark") => ClientKind::Memtier,
        ClientKind::Auto if on_path("memaslap") || on_path("memcaslap") => ClientKind::Memaslap,
        ClientKind::Auto => ClientKind::Builtin,
        k => k,
    };
    match kind {
        ClientKind::Memtier => memtier(load),
        ClientKind::Memaslap => memaslap(load),
        _ => builtin(load),
    }
}

fn which(prog: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(prog))
        .find(|p| p.is_file())
}

// ---- the built-in client -------------------------------------------------------------------

/// The value stored under `key` at `version`: the key and version first, then filler derived
/// from both, `size` bytes in all (at least what the prefix needs).
pub fn value_for(key: &str, version: u64, size: usize) -> Vec<u8> {
    let mut v = format!("{key}:{version}:").into_bytes();
    let mut x = version.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ key.len() as u64;
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(b'a' + (x % 26) as u8);
    }
    v
}

/// One connection's counters.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub sets: u64,
    pub gets: u64,
    pub hits: u64,
    pub misses: u64,
    pub mismatches: u64,
    pub latencies_us: Vec<u32>,
}

impl Counts {
    fn merge(&mut self, o: Counts) {
        self.sets += o.sets;
        self.gets += o.gets;
        self.hits += o.hits;
        self.misses += o.misses;
        self.mismatches += o.mismatches;
        self.latencies_us.extend(o.latencies_us);
    }
}

/// A memcached text-protocol connection.
pub struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Result<Self, LoadError> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|source| LoadError::Connect { addr, source })?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(Self {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    fn line(&mut self) -> Result<String, LoadError> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(LoadError::Protocol("connection closed".into()));
        }
        Ok(l.trim_end_matches(['\r', '\n']).to_owned())
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<(), LoadError> {
        let mut req = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
        self.w.write_all(&req)?;
        match self.line()? {
            l if l == "STORED" => Ok(()),
            l => Err(LoadError::Protocol(l)),
        }
    }

    pub fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, LoadError> {
        self.w.write_all(format!("get {key}\r\n").as_bytes())?;
        let head = self.line()?;
        if head == "END" {
            return Ok(None);
        }
        let len =
            parse_value_header(&head, key).ok_or_else(|| LoadError::Protocol(head.clone()))?;
        let mut data = vec![0; len + 2];
        std::io::Read::read_exact(&mut self.r, &mut data)?;
        if !data.ends_with(b"\r\n") {
            return Err(LoadError::Protocol("value not followed by CRLF".into()));
        }
        data.truncate(len);
        match self.line()? {
            l if l == "END" => Ok(Some(data)),
            l => Err(LoadError::Protocol(l)),
        }
    }
}

/// `VALUE <key> <flags> <bytes>` -> bytes, if it is that header for `key`.
pub fn parse_value_header(line: &str, key: &str) -> Option<usize> {
    let mut w = line.split(' ');
    (w.next()? == "VALUE" && w.next()? == key).then_some(())?;
    w.next()?.parse::<u32>().ok()?;
    let n = w.next()?.parse().ok()?;
    w.next().is_none().then_some(n)
}

/// One connection's share of the load: keys `c<conn>-k<i>`, sets and gets at random (a fixed
/// xorshift, so runs are repeatable), every get checked against the last value set.
fn connection(load: &Load, conn: usize) -> Result<Counts, LoadError> {
    let mut c = Conn::connect(load.addr)?;
    let mut counts = Counts::default();
    let mut versions: HashMap<usize, u64> = HashMap::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ (conn as u64 + 1);
    let end = Instant::now() + Duration::from_secs(load.seconds);
    let mut version = 0u64;
    while Instant::now() < end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = (x % load.keys as u64) as usize;
        let key = format!("c{conn}-k{k}");
        let t = Instant::now();
        if (x >> 32).is_multiple_of(load.gets_per_set as u64 + 1) {
            version += 1;
            c.set(&key, &value_for(&key, version, load.value_size))?;
            versions.insert(k, version);
            counts.sets += 1;
        } else {
            let got = c.get(&key)?;
            counts.gets += 1;
            match (got, versions.get(&k)) {
                (None, None) => counts.misses += 1,
                (Some(v), Some(&ver)) if v == value_for(&key, ver, load.value_size) => {
                    counts.hits += 1
                }
                // a value we never stored, a stale one, or a miss for a key we stored
                _ => counts.mismatches += 1,
            }
        }
        counts
            .latencies_us
            .push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    Ok(counts)
}

fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    Some(sorted[i])
}

/// The built-in client: `load.connections` threads for `load.seconds`.
pub fn builtin(load: &Load) -> Result<Value, LoadError> {
    let start = Instant::now();
    let results: Vec<Result<Counts, LoadError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..load.connections)
            .map(|i| s.spawn(move || connection(load, i)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(LoadError::Thread)))
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut all = Counts::default();
    for r in results {
        all.merge(r?);
    }
    all.latencies_us.sort_unstable();
    let ops = all.sets + all.gets;
    Ok(json!({
        "client": "builtin",
        "connections": load.connections,
        "seconds": (secs * 100.0).round() / 100.0,
        "ops": ops,
        "ops_per_sec": (ops as f64 / secs).round(),
        "sets": all.sets,
        "gets": all.gets,
        "hits": all.hits,
        "misses": all.misses,
        "mismatches": all.mismatches,
        "verified": all.mismatches == 0 && all.hits > 0,
        "p50_latency_us": percentile(&all.latencies_us, 50.0),
        "p99_latency_us": percentile(&all.latencies_us, 99.0),
    }))
}

// ---- external clients ------------------------------------------------------------------------

fn run_client(name: &str, cmd: &mut Command) -> Result<String, LoadError> {
    let out = cmd
        .output()
        .map_err(|e| LoadError::Spawn(name.to_owned(), e))?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        return Err(LoadError::Client {
            client: name.to_owned(),
            status: out.status.to_string(),
            tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(text)
}

fn memtier(load: &Load) -> Result<Value, LoadError> {
    let text = run_client(
        "memtier_benchmark",
        Command::new("memtier_benchmark").args([
            "-s",
            &load.addr.ip().to_string(),
            "-p",
            &load.addr.port().to_string(),
            "-P",
            "memcache_text",
            &format!("--test-time={}", load.seconds),
            "-t",
            "1",
            "-c",
            &load.connections.to_string(),
            &format!("--ratio=1:{}", load.gets_per_set),
            "--key-pattern=R:R",
            &format!("--key-maximum={}", load.keys * load.connections),
            &format!("--data-size={}", load.value_size),
            "--hide-histogram",
        ]),
    )?;
    parse_memtier(&text).ok_or_else(|| LoadError::NoSummary("memtier_benchmark".into()))
}

/// memtier_benchmark's `Totals` line: Type Ops/sec Hits/sec Misses/sec Avg.Latency p50 p99 p99.9 KB/sec
/// (latencies in ms; older versions have fewer latency columns: KB/sec is always last).
pub fn parse_memtier(text: &str) -> Option<Value> {
    let tot = text.lines().rev().find(|l| l.starts_with("Totals"))?;
    let f: Vec<f64> = tot
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(f64::NAN))
        .collect();
    if f.len() < 5 || f[0].is_nan() {
        return None;
    }
    let at = |i: usize| f.get(i).copied().filter(|v| !v.is_nan());
    Some(json!({
        "client": "memtier_benchmark",
        "ops_per_sec": f[0],
        "hits_per_sec": at(1),
        "misses_per_sec": at(2),
        "avg_latency_ms": at(3),
        "p50_latency_ms": if f.len() >= 7 { at(4) } else { None },
        "p99_latency_ms": if f.len() >= 7 { at(5) } else { None },
        "kb_per_sec": f.last(),
    }))
}

fn memaslap(load: &Load) -> Result<Value, LoadError> {
    let prog = if which("memaslap").is_some() {
        "memaslap"
    } else {
        "memcaslap"
    };
    let text = run_client(
        prog,
        Command::new(prog).args([
            "-s",
            &load.addr.to_string(),
            "-t",
            &format!("{}s", load.seconds),
            "-T",
            "1",
            "-c",
            &load.connections.to_string(),
        ]),
    )?;
    parse_memaslap(&text, prog).ok_or_else(|| LoadError::NoSummary(prog.into()))
}

/// memaslap's summary: `Run time: 10.0s Ops: 123456 TPS: 12345 Net_rate: 1.2M/s`.
pub fn parse_memaslap(text: &str, prog: &str) -> Option<Value> {
    let l = text.lines().rev().find(|l| l.starts_with("Run time:"))?;
    let w: Vec<&str> = l.split_whitespace().collect();
    let after = |k: &str| w.iter().position(|x| *x == k).and_then(|i| w.get(i + 1));
    Some(json!({
        "client": prog,
        "seconds": after("time:")?.trim_end_matches('s').parse::<f64>().ok()?,
        "ops": after("Ops:")?.parse::<u64>().ok()?,
        "ops_per_sec": after("TPS:")?.parse::<f64>().ok()?,
        "net_rate": after("Net_rate:").copied(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn values_carry_key_and_version_and_have_the_size() {
        let v = value_for("c1-k7", 3, 64);
        assert_eq!(v.len(), 64);
        assert!(v.starts_with(b"c1-k7:3:"));
        assert_ne!(v, value_for("c1-k7", 4, 64));
        assert_eq!(v, value_for("c1-k7", 3, 64));
        assert_eq!(value_for("a-long-key", 1, 4), b"a-long-key:1:".to_vec());
    }

    #[test]
    fn value_headers() {
        assert_eq!(parse_value_header("VALUE k1 0 5", "k1"), Some(5));
        assert_eq!(parse_value_header("VALUE k2 0 5", "k1"), None);
        assert_eq!(parse_value_header("VALUE k1 0", "k1"), None);
        assert_eq!(parse_value_header("VALUE k1 0 5 99", "k1"), None);
        assert_eq!(parse_value_header("SERVER_ERROR out of memory", "k1"), None);
    }

    #[test]
    fn memtier_totals() {
        let out = "ALL STATS\n====\nType Ops/sec Hits/sec Misses/sec Avg. Latency p50 Latency p99 Latency p99.9 Latency KB/sec\n\
                   Sets 340.1 --- --- 2.3 2.1 5.0 9.0 30.1\n\
                   Totals 1701.24 1200.00 160.96 2.34500 2.17500 5.11900 9.21500 151.01\n";
        let v = parse_memtier(out).unwrap();
        assert_eq!(v["ops_per_sec"], 1701.24);
        assert_eq!(v["p99_latency_ms"], 5.119);
        assert_eq!(v["kb_per_sec"], 151.01);
        assert!(parse_memtier("no totals here").is_none());
        assert!(parse_memtier("Totals x y").is_none());
    }

    #[test]
    fn memaslap_summary() {
        let out = "servers : 10.0.0.2:11211\n...\nRun time: 10.0s Ops: 11106 TPS: 1109 Net_rate: 1.2M/s\n";
        let v = parse_memaslap(out, "memcaslap").unwrap();
        assert_eq!(v["ops"], 11106);
        assert_eq!(v["ops_per_sec"], 1109.0);
        assert_eq!(v["net_rate"], "1.2M/s");
        assert!(parse_memaslap("Run time: x", "memaslap").is_none());
    }

    /// A tiny in-test memcached (text set/get) that can be told to corrupt what it returns.
    fn fake_memcached(corrupt: bool) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let s = s.unwrap();
                std::thread::spawn(move || {
                    let mut store: HashMap<String, Vec<u8>> = HashMap::new();
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    let mut w = s;
                    loop {
                        let mut l = String::new();
                        if r.read_line(&mut l).unwrap_or(0) == 0 {
                            return;
                        }
                        let p: Vec<&str> = l.trim_end().split(' ').collect();
                        if p[0] == "set" {
                            let n: usize = p[4].parse().unwrap();
                            let mut d = vec![0; n + 2];
                            std::io::Read::read_exact(&mut r, &mut d).unwrap();
                            d.truncate(n);
                            if corrupt {
                                d[n - 1] ^= 1;
                            }
                            store.insert(p[1].to_owned(), d);
                            w.write_all(b"STORED\r\n").unwrap();
                        } else if let Some(v) = store.get(p[1]) {
                            let mut out = format!("VALUE {} 0 {}\r\n", p[1], v.len()).into_bytes();
                            out.extend_from_slice(v);
                            out.extend_from_slice(b"\r\nEND\r\n");
                            w.write_all(&out).unwrap();
                        } else {
                            w.write_all(b"END\r\n").unwrap();
                        }
                    }
                });
            }
        });
        addr
    }

    fn load(addr: SocketAddr) -> Load {
        Load {
            addr,
            seconds: 1,
            connections: 2,
            keys: 50,
            value_size: 100,
            gets_per_set: 4,
        }
    }

    #[test]
    fn the_builtin_client_verifies_what_it_reads() {
        let v = builtin(&load(fake_memcached(false))).unwrap();
        assert_eq!(v["mismatches"], 0, "{v}");
        assert_eq!(v["verified"], true, "{v}");
        assert!(v["hits"].as_u64().unwrap() > 0, "{v}");
        assert!(v["sets"].as_u64().unwrap() > 0, "{v}");
    }

    #[test]
    fn the_builtin_client_catches_a_corrupted_value() {
        let v = builtin(&load(fake_memcached(true))).unwrap();
        assert!(v["mismatches"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["verified"], false, "{v}");
    }

    #[test]
    fn no_server_is_a_connect_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = builtin(&load(addr)).unwrap_err();
        assert!(e.to_string().contains("cannot connect to memcached"), "{e}");
    }
}
