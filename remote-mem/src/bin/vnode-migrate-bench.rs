//! `vnode-migrate-bench`: live region migration between two memory servers over loopback, next
//! to bulk loopback TCP measured in the same run, for each region size asked for.
//!
//! Usage: `vnode-migrate-bench [SIZE ...]` (default `256M 1G`).
//!
//! Per size: (1) bulk loopback TCP, one connection, the region's size in 1 MiB writes: the
//! baseline; (2) an idle migration A -> B (no client traffic): its bandwidth against the
//! baseline; (3) a migration B -> A while a client, standing in for the VMM's fault thread,
//! reads and writes random pages as fast as it can, following the region when it moves: the
//! migration's bandwidth under load and the client's longest wait for one request (what a
//! guest's fault waits at worst; it includes the reconnect to the new server after the
//! switch). The servers run in this process (threads, real TCP sockets); every page is
//! written first, so no zero page is skipped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use remote_mem::server::{Server, ServerConfig, ServerHandle};
use remote_mem::{ClientAuth, MemClient, PAGE_SIZE};
use vnode_common::secret::Secret;

const VNODE: u64 = 0x5eed;
const REGION: u64 = 0;

fn cluster_key() -> Secret {
    Secret::from_bytes(b"migrate-bench-secret".to_vec()).expect("a fixed, valid key")
}

fn parse_size(s: &str) -> Result<u64> {
    vnode_common::size::parse_size(s).with_context(|| format!("bad size {s:?}"))
}

/// Bulk loopback TCP: sends `bytes` on one connection; returns bytes per second.
fn loopback(bytes: u64) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

fn server(pages: u64) -> Result<ServerHandle> {
    let cfg = ServerConfig::new(pages, Some(cluster_key()));
    Ok(Server::bind("127.0.0.1:0", cfg)?.spawn()?)
}

/// Writes every page of the region with non-zero content.
fn fill(c: &mut MemClient, pages: u64) -> Result<()> {
    let batch: Vec<u64> = (0..256).collect();
    let mut data = vec![0u8; 256 * PAGE_SIZE];
    for first in (0..pages).step_by(256) {
        let idx: Vec<u64> = batch
            .iter()
            .map(|i| first + i)
            .filter(|&p| p < pages)
            .collect();
        for (i, b) in data.iter_mut().enumerate() {
            *b = (first as usize + i / PAGE_SIZE) as u8 | 1;
        }
        c.write_pages(REGION, &idx, &data[..idx.len() * PAGE_SIZE])?;
    }
    Ok(())
}

/// Asks `from` to migrate the region to `to`, as the operator does; returns the time taken.
fn migrate(from: &str, to: &str) -> Result<Duration> {
    let auth = ClientAuth::server(
        VNODE,
        vnode_common::cred::mem_server_credential(&cluster_key()),
    );
    let mut op = MemClient::connect(from, &auth)?;
    let t = Instant::now();
    op.migrate_region(REGION, to)?;
    Ok(t.elapsed())
}

/// What the stand-in fault thread saw.
#[derive(Debug, Default)]
struct Load {
    requests: u64,
    longest: Duration,
    /// The request that found the region moved: its wait, reconnect and retry included.
    switch_wait: Duration,
}

/// Random one-page reads and writes (half each) until `stop`, following `Moved`.
fn load(addr: String, pages: u64, stop: Arc<AtomicBool>) -> Result<Load> {
    let auth = ClientAuth::from_cluster_key(VNODE, &cluster_key());
    let mut c = MemClient::connect(&addr, &auth)?;
    let mut out = vec![0u8; PAGE_SIZE];
    let data = vec![0xa5u8; PAGE_SIZE];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut l = Load::default();
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = x % pages;
        let t = Instant::now();
        let mut moved = false;
        loop {
            let r = if x & 1 == 0 {
                c.read_pages(REGION, &[page], &mut out)
            } else {
                c.write_pages(REGION, &[page], &data)
            };
            match r {
                Ok(()) => break,
                Err(e) => {
                    let target = e.moved_to().context("only Moved is expected")?.to_string();
                    c = c.connect_like(&target)?;
                    moved = true;
                }
            }
        }
        let waited = t.elapsed();
        l.requests += 1;
        l.longest = l.longest.max(waited);
        if moved {
            l.switch_wait = waited;
        }
    }
    Ok(l)
}

fn gbs(bytes_per_sec: f64) -> String {
    format!("{:.2} GB/s", bytes_per_sec / 1e9)
}

fn bench(bytes: u64) -> Result<()> {
    let pages = bytes / PAGE_SIZE as u64;
    let a = server(pages + 1024)?;
    let b = server(pages + 1024)?;
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());
    let mut c = MemClient::connect(
        &a_addr,
        &ClientAuth::from_cluster_key(VNODE, &cluster_key()),
    )?;
    c.alloc_region(REGION, pages)?;
    fill(&mut c, pages)?;
    drop(c);

    let base = loopback(bytes)?;
    let idle = migrate(&a_addr, &b_addr)?;
    let idle_bw = bytes as f64 / idle.as_secs_f64();
    let size = format!("{} MiB", bytes >> 20);
    println!(
        "{size:>9}  loopback TCP {}  idle migration {} in {:.3} s = {}  ({:.0}% of loopback)",
        gbs(base),
        size,
        idle.as_secs_f64(),
        gbs(idle_bw),
        100.0 * idle_bw / base
    );

    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (addr, stop) = (b_addr.clone(), Arc::clone(&stop));
        thread::Builder::new()
            .name("fault-stand-in".into())
            .spawn(move || load(addr, pages, stop))?
    };
    thread::sleep(Duration::from_millis(200));
    let base2 = loopback(bytes)?;
    let busy = migrate(&b_addr, &a_addr)?;
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let l = client
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let busy_bw = bytes as f64 / busy.as_secs_f64();
    println!(
        "{size:>9}  loopback TCP {}  migration under load {:.3} s = {}  ({:.0}% of loopback); client: {} requests, longest wait {:.2} ms, the request that met the switch {:.2} ms",
        gbs(base2),
        busy.as_secs_f64(),
        gbs(busy_bw),
        100.0 * busy_bw / base2,
        l.requests,
        l.longest.as_secs_f64() * 1e3,
        l.switch_wait.as_secs_f64() * 1e3,
    );
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<u64> = if args.is_empty() {
        vec![256 << 20, 1 << 30]
    } else {
        args.iter().map(|s| parse_size(s)).collect::<Result<_>>()?
    };
    println!("vnode-migrate-bench: live region migration between two in-process vnode-memd servers over loopback TCP, against bulk loopback TCP in the same run");
    for bytes in sizes {
        bench(bytes)?;
    }
    Ok(())
}
