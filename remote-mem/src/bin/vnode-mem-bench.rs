//! `vnode-mem-bench`: page-read round trips and batched throughput of `vnode-memd` over
//! loopback, next to a raw TCP echo baseline (16 bytes out, the same reply size back) measured
//! in the same run, so the protocol's overhead is the difference between the two.
//!
//! Usage: `vnode-mem-bench [ITERATIONS] [--placement any|same|split] [--spin-us N]`
//! (default 20000, any, no spin). `--spin-us` makes the clients (raw and memd alike) busy-poll
//! for each reply that long before sleeping.
//! `same` pins client and servers to CPU 0; `split` puts the servers' threads on CPU 1 and the
//! client on CPU 0 (every message is a cross-core wake-up); `any` leaves it to the scheduler. With the
//! `tokio-baseline` feature it also measures a tokio echo server, the alternative to the
//! server's thread per connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use remote_mem::server::{Server, ServerConfig};
use remote_mem::transport::tcp::spin_until_readable;
use remote_mem::ClientAuth;
use remote_mem::{MemClient, PAGE_SIZE};
use vnode_common::cli::{self, Exit, ExitTable, Failure, Program, ResultExt};
use vnode_common::secret::Secret;

const SECRET: &[u8] = b"bench-secret";

fn cluster_key() -> Secret {
    Secret::from_bytes(SECRET.to_vec()).expect("a fixed, valid key")
}
const REGION_PAGES: u64 = 16384; // 64 MiB
const THROUGHPUT_TIME: Duration = Duration::from_secs(1);

/// A raw TCP echo server: for each 16-byte request carrying a reply size, send that many bytes.
fn start_thread_echo() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    thread::Builder::new()
        .name("echo-accept".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                let _ = thread::Builder::new()
                    .name("echo-conn".into())
                    .spawn(move || echo_conn(s));
            }
        })?;
    Ok(addr)
}

fn echo_conn(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut req = [0u8; 16];
    let reply = vec![0x5au8; 256 * PAGE_SIZE];
    while s.read_exact(&mut req).is_ok() {
        let n = u64::from_le_bytes(req[..8].try_into().expect("8 bytes")) as usize;
        if s.write_all(&reply[..n.min(reply.len())]).is_err() {
            return;
        }
    }
}

#[cfg(feature = "tokio-baseline")]
fn start_tokio_echo(multi_thread: bool) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let std_l = TcpListener::bind("127.0.0.1:0")?;
    std_l.set_nonblocking(true)?;
    let addr = std_l.local_addr()?.to_string();
    let rt = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    thread::Builder::new()
        .name("tokio-echo".into())
        .spawn(move || {
            rt.block_on(async move {
                let Ok(l) = tokio::net::TcpListener::from_std(std_l) else {
                    return;
                };
                while let Ok((mut s, _)) = l.accept().await {
                    tokio::spawn(async move {
                        let _ = s.set_nodelay(true);
                        let mut req = [0u8; 16];
                        let reply = vec![0x5au8; 256 * PAGE_SIZE];
                        while s.read_exact(&mut req).await.is_ok() {
                            let n =
                                u64::from_le_bytes(req[..8].try_into().expect("8 bytes")) as usize;
                            if s.write_all(&reply[..n.min(reply.len())]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            })
        })?;
    Ok(addr)
}

struct Echo {
    s: TcpStream,
    buf: Vec<u8>,
    spin: Option<Duration>,
}

impl Echo {
    fn connect(addr: &str, spin: Option<Duration>) -> Result<Echo> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Echo {
            s,
            buf: vec![0u8; 256 * PAGE_SIZE],
            spin,
        })
    }

    /// `k` requests sent one write each, then the `k` replies read: the pipelining baseline.
    fn pipelined(&mut self, k: usize) -> Result<()> {
        let mut req = [0u8; 16];
        req[..8].copy_from_slice(&(PAGE_SIZE as u64).to_le_bytes());
        for _ in 0..k {
            self.s.write_all(&req)?;
        }
        self.s.read_exact(&mut self.buf[..k * PAGE_SIZE])?;
        Ok(())
    }

    fn round_trip(&mut self, bytes: usize) -> Result<()> {
        let mut req = [0u8; 16];
        req[..8].copy_from_slice(&(bytes as u64).to_le_bytes());
        self.s.write_all(&req)?;
        if let Some(limit) = self.spin {
            spin_until_readable(&self.s, limit);
        }
        self.s.read_exact(&mut self.buf[..bytes])?;
        Ok(())
    }
}

/// Times `n` calls of `f` (after a warm-up) and prints p50/p99/mean in microseconds.
fn latency(name: &str, n: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    for i in 0..n / 10 + 1 {
        f(i)?;
    }
    let mut ns: Vec<u64> = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i)?;
        ns.push(t.elapsed().as_nanos() as u64);
    }
    ns.sort_unstable();
    let pct = |p: f64| ns[((ns.len() as f64 * p) as usize).min(ns.len() - 1)] as f64 / 1000.0;
    let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1000.0;
    println!(
        "{name:<44} p50 {:>7.1} us  p99 {:>7.1} us  mean {:>7.1} us",
        pct(0.5),
        pct(0.99),
        mean
    );
    Ok(pct(0.5))
}

/// Runs `f` (moving `pages` pages per call) for a second and prints pages/s and GB/s.
fn throughput(name: &str, pages: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<()> {
    let start = Instant::now();
    let mut calls = 0usize;
    while start.elapsed() < THROUGHPUT_TIME {
        f(calls)?;
        calls += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let moved = (calls * pages) as f64;
    println!(
        "{name:<44} {:>9.0} pages/s  {:>6.2} GB/s",
        moved / secs,
        moved * PAGE_SIZE as f64 / secs / 1e9
    );
    Ok(())
}

/// A cheap pseudo-random page sequence (so reads are not all one cached page).
fn page_at(i: usize) -> u64 {
    (i as u64).wrapping_mul(2_654_435_761) % REGION_PAGES
}

fn bench_memd(addr: &str, n: usize, spin: Option<Duration>) -> Result<()> {
    let mut c = MemClient::connect(addr, &ClientAuth::from_cluster_key(1, &cluster_key()))?;
    c.set_spin(spin);
    c.alloc_region(0, REGION_PAGES)?;
    let all: Vec<u64> = (0..REGION_PAGES).collect();
    let fill = vec![0xa5u8; 256 * PAGE_SIZE];
    for chunk in all.chunks(256) {
        c.write_pages(0, chunk, &fill[..chunk.len() * PAGE_SIZE])?;
    }
    let mut buf = vec![0u8; 256 * PAGE_SIZE];
    latency("memd read 1 page (MemClient::read_pages)", n, |i| {
        c.read_pages(0, &[page_at(i)], &mut buf[..PAGE_SIZE])
            .map_err(Into::into)
    })?;
    latency("memd write 1 page (MemClient::write_pages)", n, |i| {
        c.write_pages(0, &[page_at(i)], &fill[..PAGE_SIZE])
            .map_err(Into::into)
    })?;
    let mut idx = vec![0u64; 256];
    for batch in [16usize, 64, 256] {
        throughput(&format!("memd read batches of {batch} pages"), batch, |i| {
            for (k, p) in idx[..batch].iter_mut().enumerate() {
                *p = page_at(i * batch + k);
            }
            c.read_pages(0, &idx[..batch], &mut buf[..batch * PAGE_SIZE])
                .map_err(Into::into)
        })?;
    }
    throughput("memd write batches of 64 pages", 64, |i| {
        for (k, p) in idx[..64].iter_mut().enumerate() {
            *p = page_at(i * 64 + k);
        }
        c.write_pages(0, &idx[..64], &fill[..64 * PAGE_SIZE])
            .map_err(Into::into)
    })?;
    throughput("memd 8 pipelined 1-page reads (split phase)", 8, |i| {
        let mut tickets = [const { None }; 8];
        for (k, t) in tickets.iter_mut().enumerate() {
            *t = Some(c.submit_read(0, &[page_at(i * 8 + k)])?);
        }
        for (k, t) in tickets.iter_mut().enumerate() {
            if let Some(t) = t.take() {
                c.complete_read(t, &mut buf[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])?;
            }
        }
        Ok(())
    })?;
    throughput(
        "memd split phase: 16-page prefetch + demand read",
        17,
        |i| {
            for (k, p) in idx[..16].iter_mut().enumerate() {
                *p = page_at(i * 17 + k);
            }
            let t = c.submit_read(0, &idx[..16])?;
            let (demand, rest) = buf.split_at_mut(PAGE_SIZE);
            c.read_pages(0, &[page_at(i * 17 + 16)], demand)?;
            c.complete_read(t, &mut rest[..16 * PAGE_SIZE])?;
            Ok(())
        },
    )?;
    c.free_region(0)?;
    Ok(())
}

fn bench_echo(label: &str, addr: &str, n: usize, spin: Option<Duration>) -> Result<()> {
    let mut e = Echo::connect(addr, spin)?;
    latency(&format!("{label} echo 16 B -> 4 KiB"), n, |_| {
        e.round_trip(PAGE_SIZE)
    })?;
    for batch in [16usize, 64, 256] {
        throughput(
            &format!("{label} echo 16 B -> {batch} pages"),
            batch,
            |_| e.round_trip(batch * PAGE_SIZE),
        )?;
    }
    throughput(&format!("{label} echo 8 pipelined 4 KiB"), 8, |_| {
        e.pipelined(8)
    })?;
    Ok(())
}

/// Pins the calling thread (and the threads it creates afterwards) to one CPU.
fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, filled with the CPU_* helpers.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked by the caller's choice of 0 or 1).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

/// Page-read round trips and throughput of vnode-memd over loopback, beside a raw TCP echo.
#[derive(Parser)]
#[command(name = "vnode-mem-bench")]
struct Args {
    /// Round trips per latency line.
    #[arg(default_value_t = 20_000)]
    iterations: usize,
    /// Thread placement: any (the scheduler's), same (all on CPU 0), split (servers on CPU 1,
    /// client on CPU 0).
    #[arg(long, default_value = "any", value_parser = ["any", "same", "split"])]
    placement: String,
    /// Clients busy-poll this many microseconds for each reply before sleeping.
    #[arg(long, value_name = "N")]
    spin_us: Option<u64>,
}

fn main() -> std::process::ExitCode {
    let program = Program {
        default_log: "warn",
        exits: ExitTable::Standard,
    };
    cli::main(program, |a: Args| {
        bench(
            a.iterations,
            &a.placement,
            a.spin_us.map(Duration::from_micros),
        )
        .runtime()?;
        Ok::<_, Failure>(Exit::Success)
    })
}

fn bench(n: usize, placement: &str, spin: Option<Duration>) -> Result<()> {
    // Servers' threads inherit the affinity of the thread that creates them.
    match placement {
        "any" => {}
        "same" => pin_to(0)?,
        "split" => pin_to(1)?,
        other => anyhow::bail!("unknown placement {other:?}: any, same (all on CPU 0) or split (servers on CPU 1, client on CPU 0)"),
    }
    println!("vnode-mem-bench: {n} round trips per latency line, {THROUGHPUT_TIME:?} per throughput line, placement {placement}, client spin {spin:?}");
    let server = Server::bind(
        "127.0.0.1:0",
        ServerConfig {
            max_connections: 64,
            ..ServerConfig::new(REGION_PAGES, Some(cluster_key()))
        },
    )?
    .spawn()?;
    let echo = start_thread_echo()?;
    #[cfg(feature = "tokio-baseline")]
    let tokio_echo = [
        ("raw TCP, tokio 1-thread", start_tokio_echo(false)?),
        ("raw TCP, tokio multi-thread", start_tokio_echo(true)?),
    ];
    if placement == "split" {
        pin_to(0)?;
    }
    bench_echo("raw TCP, thread/conn", &echo, n, spin)?;
    #[cfg(feature = "tokio-baseline")]
    for (label, addr) in &tokio_echo {
        bench_echo(label, addr, n, spin)?;
    }
    bench_memd(&server.addr().to_string(), n, spin)?;
    Ok(())
}
