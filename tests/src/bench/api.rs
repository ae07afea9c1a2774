//! `vnode-bench api` (issue 11): what the control API costs a running guest.
//!
//! The test guest runs a memory workload (`test=mem`, random, half writes, local RAM) under
//! `vnode run --api-socket`, in three kinds of run, interleaved (one of each, then the next
//! round) so that load drifts hit all alike:
//!
//! - `idle`: nothing talks to the API: the baseline;
//! - `scrape`: a client fetches `GET /metrics` at 10 Hz for the whole run, as Prometheus would
//!   (the target: the guest slows down by less than 1%);
//! - `latency`: a client sends `GET /vm/counters` back to back for the whole run; each round
//!   trip goes into an HDR histogram (p50, p99, max), and the same request's latency with the
//!   VM paused, measured in the same run, is its baseline (the API alone, no guest competing
//!   for the two cores).
//!
//! The guest's time is its own count of cycles for the passes and the verify sweep (the fill is
//! a first touch, the same everywhere). Medians over the rounds, with the range.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use vnode_api::client::Client;

use super::guestrun::{GuestRun, GuestSpec};
use super::stats::Summary;
use super::table::{num, Table};
use super::{fmt_size, parse_size, write_out, Common, Env};

#[derive(Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub common: Common,
    /// Working set (the guest's `bytes=`; 64M with --quick).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    bytes: u64,
    /// Passes over the working set (2 with --quick).
    #[arg(long, default_value_t = 6)]
    passes: u32,
    /// How often the `scrape` runs fetch /metrics, per second.
    #[arg(long, default_value_t = 10.0)]
    scrape_hz: f64,
    /// Round trips of `GET /vm/counters` for the paused baseline.
    #[arg(long, default_value_t = 2000)]
    paused_requests: u64,
}

/// What one client loop saw.
struct Probe {
    hist: Histogram<u64>,
    errors: u64,
}

/// Latencies in microseconds, up to a minute, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn record(hist: &mut Histogram<u64>, d: Duration) {
    hist.saturating_record(d.as_micros().clamp(1, 60_000_000) as u64);
}

/// Waits until the vnode behind `socket` answers (it is starting), up to 30 s.
fn connect(socket: &Path, stop: &AtomicBool) -> Option<Client> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) && !stop.load(Ordering::Relaxed) {
        if let Ok(c) = Client::new(socket) {
            if c.info().is_ok() {
                return Some(c);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// A thread that connects to `socket` (until `stop`) and runs `body` with the client and a
/// fresh probe, which it returns.
fn probe_thread(
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    body: impl FnOnce(&Client, &mut Probe) + Send + 'static,
) -> JoinHandle<Probe> {
    std::thread::spawn(move || {
        let mut p = Probe {
            hist: histogram(),
            errors: 0,
        };
        if let Some(c) = connect(&socket, &stop) {
            body(&c, &mut p);
        }
        p
    })
}

/// Whether the VM still runs (its API answers and says so).
fn running(c: &Client) -> bool {
    c.info()
        .is_ok_and(|i| i.state == vnode_api::VmState::Running)
}

/// A client on `socket` until `stop` or the VM's end: every `period` (back to back if zero) one
/// request, timed. A failure while the VM still runs counts as an error.
fn client_loop(
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    period: Duration,
    metrics: bool,
) -> JoinHandle<Probe> {
    probe_thread(socket, stop.clone(), move |c, p| {
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let t0 = Instant::now();
            let ok = if metrics {
                c.metrics_text().map(|t| !t.is_empty()).unwrap_or(false)
            } else {
                c.counters().is_ok()
            };
            if ok {
                record(&mut p.hist, t0.elapsed());
            } else if stop.load(Ordering::Relaxed) || !running(c) {
                // The guest ended and vnode is going: not the API's failure.
                break;
            } else {
                p.errors += 1;
            }
            if !period.is_zero() {
                next += period;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
    })
}

/// `GET /vm/counters` round trips with the VM paused: the API's own latency, no guest running.
/// Starts once the guest's fill is under way (the socket answers), pauses, measures, resumes.
fn paused_baseline(socket: PathBuf, requests: u64, stop: Arc<AtomicBool>) -> JoinHandle<Probe> {
    probe_thread(socket, stop, move |c, p| {
        if c.pause().is_err() {
            p.errors += 1;
            return;
        }
        for _ in 0..requests {
            let t0 = Instant::now();
            match c.counters() {
                Ok(_) => record(&mut p.hist, t0.elapsed()),
                Err(_) => p.errors += 1,
            }
        }
        if c.resume().is_err() {
            p.errors += 1;
        }
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Idle,
    Scrape,
    Latency,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle (no API traffic)",
            Kind::Scrape => "scrape",
            Kind::Latency => "latency",
        }
    }
}

/// One guest run of `kind`, with its API clients. Returns the guest's pass+verify cycles and
/// what the clients measured.
fn one_run(env: &Env, a: &ApiArgs, kind: Kind, round: usize) -> Result<(f64, Vec<Probe>)> {
    let socket = env
        .out
        .join(format!("api-bench-{}.sock", std::process::id()));
    let (bytes, passes) = if env.quick {
        (64 << 20, 2)
    } else {
        (a.bytes, a.passes)
    };
    let spec = GuestSpec {
        vnode: &env.vnode,
        kernel: &env.kernel,
        mem: fmt_size(bytes + (64 << 20)),
        cmdline: format!(
            "test=mem bytes={} pattern=random writes=50 passes={passes} seed={}",
            fmt_size(bytes),
            env.seed + round as u64
        ),
        extra: vec!["--api-socket".into(), socket.display().to_string()],
        env: Vec::new(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    match kind {
        Kind::Idle => {}
        Kind::Scrape => clients.push(client_loop(
            socket.clone(),
            stop.clone(),
            Duration::from_secs_f64(1.0 / a.scrape_hz),
            true,
        )),
        Kind::Latency => clients.push(client_loop(
            socket.clone(),
            stop.clone(),
            Duration::ZERO,
            false,
        )),
    }
    let run = spec.run();
    stop.store(true, Ordering::Relaxed);
    let probes: Vec<Probe> = clients
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow!("an API client thread panicked"))
        })
        .collect::<Result<_>>()?;
    let run: GuestRun = run?;
    let cycles = (run.field("pass_cycles")? + run.field("verify_cycles")?) as f64;
    Ok((cycles, probes))
}

/// The paused baseline: its own guest run (not timed), paused once its API answers.
fn paused_run(env: &Env, a: &ApiArgs, round: usize) -> Result<Probe> {
    let socket = env
        .out
        .join(format!("api-bench-p{}.sock", std::process::id()));
    let spec = GuestSpec {
        vnode: &env.vnode,
        kernel: &env.kernel,
        mem: "128M".into(),
        cmdline: format!(
            "test=mem bytes=32M pattern=random writes=50 passes=2 seed={}",
            env.seed + round as u64
        ),
        extra: vec!["--api-socket".into(), socket.display().to_string()],
        env: Vec::new(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let h = paused_baseline(socket, a.paused_requests, stop.clone());
    let run = spec.run();
    stop.store(true, Ordering::Relaxed);
    let p = h
        .join()
        .map_err(|_| anyhow!("the paused-baseline thread panicked"))?;
    run?;
    if p.hist.is_empty() {
        bail!("the paused baseline measured nothing (the guest ended before its API answered?)");
    }
    Ok(p)
}

/// Per-round results.
struct Rounds {
    idle: Vec<f64>,
    scrape: Vec<f64>,
    latency_guest: Vec<f64>,
    scrapes: Vec<f64>,
    counters: Histogram<u64>,
    counters_p50: Vec<f64>,
    counters_p99: Vec<f64>,
    paused: Histogram<u64>,
    paused_p50: Vec<f64>,
    paused_p99: Vec<f64>,
    errors: u64,
}

pub fn run(env: &Env, a: &ApiArgs) -> Result<()> {
    if a.scrape_hz <= 0.0 {
        bail!("--scrape-hz must be positive");
    }
    let started = Instant::now();
    let mut r = Rounds {
        idle: Vec::new(),
        scrape: Vec::new(),
        latency_guest: Vec::new(),
        scrapes: Vec::new(),
        counters: histogram(),
        counters_p50: Vec::new(),
        counters_p99: Vec::new(),
        paused: histogram(),
        paused_p50: Vec::new(),
        paused_p99: Vec::new(),
        errors: 0,
    };
    for round in 0..env.runs {
        for kind in [Kind::Idle, Kind::Scrape, Kind::Latency] {
            let (cycles, probes) = one_run(env, a, kind, round)
                .with_context(|| format!("round {round}, {}", kind.name()))?;
            for p in &probes {
                r.errors += p.errors;
            }
            match kind {
                Kind::Idle => r.idle.push(cycles),
                Kind::Scrape => {
                    r.scrape.push(cycles);
                    r.scrapes.push(probes[0].hist.len() as f64);
                }
                Kind::Latency => {
                    r.latency_guest.push(cycles);
                    let h = &probes[0].hist;
                    r.counters_p50.push(h.value_at_quantile(0.5) as f64);
                    r.counters_p99.push(h.value_at_quantile(0.99) as f64);
                    r.counters.add(h).context("merging histograms")?;
                }
            }
        }
        let p = paused_run(env, a, round).with_context(|| format!("round {round}, paused"))?;
        r.errors += p.errors;
        r.paused_p50.push(p.hist.value_at_quantile(0.5) as f64);
        r.paused_p99.push(p.hist.value_at_quantile(0.99) as f64);
        r.paused.add(&p.hist).context("merging histograms")?;
        println!(
            "  round {}/{} done ({:.0} s)",
            round + 1,
            env.runs,
            started.elapsed().as_secs_f64()
        );
    }
    let report = report(env, a, &r);
    print!("{report}");
    let report = format!(
        "{}{report}  at end: {}\n",
        env.header("api"),
        super::host::load_line()
    );
    let p = write_out(&env.out, "api.txt", &report)?;
    println!("  written to {}", p.display());
    Ok(())
}

fn med(v: &[f64]) -> Option<f64> {
    Summary::of(v).map(|s| s.median)
}

fn range(v: &[f64], scale: f64, d: usize) -> String {
    Summary::of(v).map_or_else(
        || "-".into(),
        |s| format!("{:.d$}..{:.d$}", s.min * scale, s.max * scale),
    )
}

fn report(env: &Env, a: &ApiArgs, r: &Rounds) -> String {
    let gcyc = 1e-9;
    let mut out = String::new();
    let mut t = Table::new(&[
        "guest run",
        "median Gcycles",
        "range",
        "vs idle",
        "requests",
    ]);
    let base = med(&r.idle);
    let rel = |v: &[f64]| match (med(v), base) {
        (Some(m), Some(b)) if b > 0.0 => format!("{:+.2}%", (m / b - 1.0) * 100.0),
        _ => "-".into(),
    };
    t.row(vec![
        Kind::Idle.name().into(),
        num(base.map(|b| b * gcyc), 3),
        range(&r.idle, gcyc, 3),
        "baseline".into(),
        "0".into(),
    ]);
    t.row(vec![
        format!("GET /metrics at {} Hz", a.scrape_hz),
        num(med(&r.scrape).map(|m| m * gcyc), 3),
        range(&r.scrape, gcyc, 3),
        rel(&r.scrape),
        num(med(&r.scrapes), 0),
    ]);
    t.row(vec![
        "GET /vm/counters back to back".into(),
        num(med(&r.latency_guest).map(|m| m * gcyc), 3),
        range(&r.latency_guest, gcyc, 3),
        rel(&r.latency_guest),
        r.counters.len().to_string(),
    ]);
    out.push_str("\nThe guest's pass+verify time (test=mem random, 50% writes, local RAM):\n");
    out.push_str(&t.render());
    let mut l = Table::new(&["GET /vm/counters", "p50 us", "p99 us", "max us", "requests"]);
    let row = |name: &str, h: &Histogram<u64>, p50: &[f64], p99: &[f64]| {
        vec![
            name.to_string(),
            format!("{} ({})", num(med(p50), 0), range(p50, 1.0, 0)),
            format!("{} ({})", num(med(p99), 0), range(p99, 1.0, 0)),
            h.max().to_string(),
            h.len().to_string(),
        ]
    };
    l.row(row(
        "while the guest runs",
        &r.counters,
        &r.counters_p50,
        &r.counters_p99,
    ));
    l.row(row(
        "VM paused (baseline)",
        &r.paused,
        &r.paused_p50,
        &r.paused_p99,
    ));
    out.push_str(
        "\nAPI latency, client to answer over the Unix socket (median of the rounds' \
         percentiles, range in brackets):\n",
    );
    out.push_str(&l.render());
    out.push_str(&format!(
        "\n  working set {}, {} rounds; failed requests: {}\n",
        fmt_size(if env.quick { 64 << 20 } else { a.bytes }),
        env.runs,
        r.errors
    ));
    out
}
