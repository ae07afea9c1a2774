//! `vnode-bench excache` (issue 4).
//!
//! Runs the test guest's seq / random / zipf(0.99) workloads with guest RAM behind the ExCache
//! (`--mem-server ADDR --local-mem SIZE`) at 100%, 50%, 25% and 12.5% of the working set, and
//! with all-local memory (no `--mem-server`) as the baseline; and the same userfaultfd path over
//! the in-process page store (`--mem-server local`) as the platform's fault floor, at the fault
//! comparison's point and at each target's point. A fresh
//! `vnode-memd` serves each remote run. Runs are interleaved (run r of every cell, then run r+1)
//! so that load drifts hit every cell alike. Reported: medians of the guest's pass+verify cycles
//! (the fill phase is the same first touch everywhere), wall time, the ExCache's counters, and
//! PASS/MISS against the targets, computed from the medians shown.
//!
//! Bounds: Belady's OPT replayed over the guest's own accesses (`opt.rs`) gives the fewest pages
//! any cache of C pages must bring in during the passes and the verify sweep. Each costs at least
//! KVM's mapping of a page the host already holds, measured in the same run as the first-touch
//! fill of all-local RAM preallocated with `--mem-prealloc` less a warm access; a zipf miss in
//! the passes, which no prefetcher can foresee, costs at least a fault at the local userfaultfd
//! floor's p50 (same run). Added to all-local's own time, that is the best ratio any ExCache
//! could reach on this host, before a single byte is copied or a page dropped.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::{json, Value};

use super::guestrun::{binary, vnode_has_flag, GuestRun, GuestSpec};
use super::memd::MemServer;
use super::opt;
use super::stats::{median, Summary};
use super::table::{num, ratio, Table};
use super::{fmt_size, parse_size, plot, write_out, Common, Env};

#[derive(Args)]
pub struct ExcacheArgs {
    #[command(flatten)]
    pub common: Common,
    /// Working set (the guest's `bytes=`; 64M with --quick).
    #[arg(long, value_parser = parse_size, default_value = "512M")]
    bytes: u64,
    /// Share of the passes' accesses that write, in percent.
    #[arg(long, default_value_t = 50)]
    writes: u32,
    /// Passes over the working set (1 with --quick).
    #[arg(long, default_value_t = 2)]
    passes: u32,
    /// Workloads.
    #[arg(long, value_delimiter = ',', default_value = "seq,random,zipf")]
    patterns: Vec<String>,
    /// ExCache sizes as fractions of the working set.
    #[arg(long, value_delimiter = ',', default_value = "1,0.5,0.25,0.125")]
    fractions: Vec<f64>,
    /// Eviction policy (`--excache-policy`).
    #[arg(long, default_value = "clock")]
    policy: String,
    /// The fault-floor comparison runs this workload at this fraction, remote and `local`.
    #[arg(long, default_value = "random")]
    floor_pattern: String,
    #[arg(long, default_value_t = 0.25)]
    floor_fraction: f64,
    /// Further in-process page store cells, PATTERN@FRACTION (by default at the targets' points).
    #[arg(long, value_delimiter = ',', default_value = "seq@0.25,zipf@0.5")]
    floor_cells: Vec<String>,
    /// Size the ExCache as a bare fraction of the working set. By default the guest's own
    /// pages below the working set (image, page tables, metadata: measured by a probe run) are
    /// added, so that "100%" holds everything the guest touches.
    #[arg(long)]
    no_footprint: bool,
    /// Extra argument for every `vnode run` (repeat it), e.g. --vnode-arg=--prefetch=0.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    vnode_arg: Vec<String>,
    /// Use this memory server for every remote run instead of starting a fresh vnode-memd.
    #[arg(long, value_name = "ADDR")]
    mem_server: Option<String>,
    /// Remote cells (which run with `--excache-reclaim`) run again without it (eviction on
    /// the fault path, vnode's default), PATTERN@FRACTION; empty for none.
    #[arg(long, value_delimiter = ',', default_value = "seq@0.25,zipf@0.5")]
    no_reclaim_cells: Vec<String>,
    /// The Linux-swap peer's sizes as fractions of the working set (an all-local vnode in a
    /// memory cgroup of that size plus `SWAP_SLACK`, swapping to a swap file); empty for none.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.25")]
    swap_fractions: Vec<f64>,
}

/// The Linux-swap peer's memory limit beyond the ExCache's size: the vnode process's own
/// memory beside guest RAM (its binary, heap and thread stacks), which the ExCache's limit does
/// not count either.
const SWAP_SLACK: u64 = 16 << 20;

/// Where guest RAM lives in one cell.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Backing {
    AllLocal,
    Remote(f64),
    /// `--mem-server local`: the in-process page store behind the same userfaultfd path.
    LocalStore(f64),
    /// All-local RAM populated before the guest starts (`--mem-prealloc`): the fill phase's
    /// first touch costs only KVM's mapping.
    Prealloc,
    /// Remote without the reclaimer: faults evict when the ExCache is full.
    NoReclaim(f64),
    /// All-local RAM in a memory cgroup of the ExCache's size, swapping to a swap file.
    LinuxSwap(f64),
}

impl Backing {
    fn label(&self) -> String {
        match self {
            Backing::AllLocal => "all-local".into(),
            Backing::Remote(f) => format!("remote {}%", f * 100.0),
            Backing::LocalStore(f) => format!("local store {}%", f * 100.0),
            Backing::Prealloc => "all-local, prealloc".into(),
            Backing::NoReclaim(f) => format!("no reclaimer {}%", f * 100.0),
            Backing::LinuxSwap(f) => format!("Linux swap {}%", f * 100.0),
        }
    }
}

#[derive(Clone, Debug)]
struct Cell {
    pattern: String,
    backing: Backing,
}

/// The samples of one cell.
#[derive(Default)]
struct Samples {
    runs: Vec<GuestRun>,
    failures: Vec<String>,
}

impl Samples {
    fn values(&self, f: impl Fn(&GuestRun) -> Option<f64>) -> Vec<f64> {
        self.runs.iter().filter_map(f).collect()
    }

    fn median(&self, f: impl Fn(&GuestRun) -> Option<f64>) -> Option<f64> {
        median(&self.values(f))
    }
}

/// Guest cycles of the passes and verify phases.
fn work_cycles(g: &GuestRun) -> Option<f64> {
    Some((g.field("pass_cycles").ok()? + g.field("verify_cycles").ok()?) as f64)
}

fn wall_s(g: &GuestRun) -> Option<f64> {
    Some(g.wall.as_secs_f64())
}

struct Plan<'a> {
    env: &'a Env,
    args: &'a ExcacheArgs,
    bytes: u64,
    passes: u32,
    memd: Option<std::path::PathBuf>,
    secret: String,
    /// Bytes added to every ExCache size: the guest's pages outside the working set.
    footprint: u64,
    /// vnode has --mem-prealloc, so the KVM mapping floor can be measured.
    prealloc: bool,
    /// The swap file and memory cgroup of the Linux-swap cells.
    swap: Option<super::swap::SwapPeer>,
}

pub fn run(env: &Env, a: &ExcacheArgs) -> Result<()> {
    if !vnode_has_flag(&env.vnode, "--mem-server")? {
        bail!(
            "{} has no --mem-server flag: the ExCache is not in this build. Rebuild it \
             (cargo build --release -p vmm -p remote-mem) once the ExCache has landed, or pass \
             --bin-dir to a vnode that has it",
            env.vnode.display()
        );
    }
    let mut plan = Plan {
        env,
        args: a,
        bytes: if env.quick { 64 << 20 } else { a.bytes },
        passes: if env.quick { 1 } else { a.passes.max(1) },
        memd: match a.mem_server {
            Some(_) => None,
            None => Some(binary(&env.bin_dir, "vnode-memd")?),
        },
        secret: format!("vnode-bench-{}", std::process::id()),
        footprint: 0,
        prealloc: vnode_has_flag(&env.vnode, "--mem-prealloc")?,
        swap: None,
    };
    if !a.swap_fractions.is_empty() {
        let size = plan.bytes + (256 << 20);
        match super::swap::SwapPeer::start(&env.out, size) {
            Ok(s) => plan.swap = Some(s),
            Err(e) => println!("  no Linux-swap peer: {e:#}"),
        }
    }
    if !a.no_footprint {
        plan.footprint = plan.probe_footprint()?;
    }
    let cells = plan.cells();
    println!(
        "  ExCache size (--local-mem) = fraction x {} + {} of guest pages below the working set{}",
        fmt_size(plan.bytes),
        fmt_size(plan.footprint),
        if a.no_footprint {
            " (--no-footprint)"
        } else {
            " (measured; --no-footprint to drop)"
        }
    );
    println!(
        "  workload: test=mem bytes={} writes={} passes={} seed={}, 1 vCPU, policy {}",
        fmt_size(plan.bytes),
        a.writes,
        plan.passes,
        env.seed,
        a.policy
    );
    println!(
        "  e.g.: {}",
        plan.spec(&cells[cells.len() - 1], "ADDR").shell_line()
    );
    let results = plan.run_all(&cells)?;
    let failed = report(&plan, &cells, &results)?;
    if failed > 0 {
        bail!("{failed} runs failed (listed above)");
    }
    Ok(())
}

impl Plan<'_> {
    fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for p in &self.args.patterns {
            let mut add = |backing| {
                cells.push(Cell {
                    pattern: p.clone(),
                    backing,
                })
            };
            add(Backing::AllLocal);
            for &f in &self.args.fractions {
                add(Backing::Remote(f));
            }
            for (fp, f) in self.floor_points() {
                if fp == *p {
                    add(Backing::LocalStore(f));
                }
            }
            if *p == "seq" && self.prealloc {
                add(Backing::Prealloc);
            }
            for (np, f) in points(&self.args.no_reclaim_cells) {
                if np == *p {
                    add(Backing::NoReclaim(f));
                }
            }
            if self.swap.is_some() {
                for &f in &self.args.swap_fractions {
                    add(Backing::LinuxSwap(f));
                }
            }
        }
        cells
    }

    /// Where the in-process page store runs: the fault comparison's point, then --floor-cells.
    fn floor_points(&self) -> Vec<(String, f64)> {
        let mut pts = vec![(self.args.floor_pattern.clone(), self.args.floor_fraction)];
        for pt in points(&self.args.floor_cells) {
            if !pts.contains(&pt) {
                pts.push(pt);
            }
        }
        pts
    }

    /// The guest's footprint below the working set: where R starts in a tiny all-local run.
    fn probe_footprint(&self) -> Result<u64> {
        let mut probe = self.spec(
            &Cell {
                pattern: "seq".into(),
                backing: Backing::AllLocal,
            },
            "",
        );
        probe.cmdline = "test=mem bytes=4K pattern=seq writes=0 passes=1".into();
        let g = probe.run()?;
        g.base
            .ok_or_else(|| anyhow::anyhow!("the guest's fill line has no base: {}", g.summary))
    }

    /// The ExCache's size at fraction `f` of the working set.
    fn cache_bytes(&self, f: f64) -> u64 {
        ((self.bytes as f64 * f) as u64 + self.footprint) / 4096 * 4096
    }

    fn guest_mem(&self) -> String {
        // The working set plus room for the guest's image, page tables and metadata.
        fmt_size(self.bytes + (32 << 20))
    }

    fn spec(&self, c: &Cell, addr: &str) -> GuestSpec<'_> {
        let cache = |f: f64| fmt_size(self.cache_bytes(f));
        let mut extra: Vec<String> = self.args.vnode_arg.clone();
        let mut ex = |server: &str, f: f64| {
            extra.extend(
                [
                    "--mem-server",
                    server,
                    "--local-mem",
                    &cache(f),
                    "--excache-policy",
                    &self.args.policy,
                ]
                .map(String::from),
            )
        };
        match c.backing {
            Backing::AllLocal | Backing::LinuxSwap(_) => {}
            Backing::Prealloc => extra.push("--mem-prealloc".into()),
            Backing::Remote(f) => {
                ex(addr, f);
                extra.push("--excache-reclaim".into());
            }
            Backing::NoReclaim(f) => ex(addr, f),
            Backing::LocalStore(f) => ex("local", f),
        }
        GuestSpec {
            vnode: &self.env.vnode,
            kernel: &self.env.kernel,
            mem: self.guest_mem(),
            cmdline: format!(
                "test=mem bytes={} pattern={} seed={} writes={} passes={}",
                fmt_size(self.bytes),
                c.pattern,
                self.env.seed,
                self.args.writes,
                self.passes
            ),
            extra,
            env: vec![("VNODE_SECRET".into(), self.secret.clone())],
        }
    }

    fn run_one(&self, c: &Cell) -> Result<GuestRun> {
        let server = match (&c.backing, &self.memd, &self.args.mem_server) {
            (Backing::Remote(_) | Backing::NoReclaim(_), Some(bin), _) => Some(MemServer::start(
                bin,
                "4G",
                &self.secret,
                &self.env.out.join("vnode-memd.log"),
            )?),
            _ => None,
        };
        let addr = match (&server, &self.args.mem_server) {
            (Some(s), _) => s.addr.clone(),
            (None, Some(a)) => a.clone(),
            (None, None) => String::new(),
        };
        match (c.backing, &self.swap) {
            (Backing::LinuxSwap(f), Some(swap)) => {
                swap.run(&self.spec(c, &addr), self.cache_bytes(f) + SWAP_SLACK)
            }
            _ => self.spec(c, &addr).run(),
        }
    }

    fn run_all(&self, cells: &[Cell]) -> Result<Vec<Samples>> {
        let mut out: Vec<Samples> = cells.iter().map(|_| Samples::default()).collect();
        let total = self.env.runs * cells.len();
        let mut done = 0;
        let started = std::time::Instant::now();
        for _ in 0..self.env.runs {
            for (c, s) in cells.iter().zip(out.iter_mut()) {
                done += 1;
                eprint!(
                    "\r  run {done}/{total}: {} {}        ",
                    c.pattern,
                    c.backing.label()
                );
                match self.run_one(c) {
                    Ok(g) => s.runs.push(g),
                    Err(e) => {
                        eprintln!("\n  FAILED: {e:#}");
                        s.failures.push(format!("{e:#}"));
                    }
                }
            }
        }
        eprintln!();
        println!("  {total} runs in {:.0} s", started.elapsed().as_secs_f64());
        Ok(out)
    }
}

/// PATTERN@FRACTION points; others are reported and skipped.
fn points(specs: &[String]) -> Vec<(String, f64)> {
    specs
        .iter()
        .filter(|c| !c.is_empty())
        .filter_map(|c| {
            let parsed = c
                .split_once('@')
                .and_then(|(p, f)| Some((p.to_string(), f.parse::<f64>().ok()?)));
            if parsed.is_none() {
                eprintln!("  ignoring {c:?}: want PATTERN@FRACTION");
            }
            parsed
        })
        .collect()
}

/// The cells and their samples, side by side.
struct Results<'a> {
    cells: &'a [Cell],
    res: &'a [Samples],
}

impl Results<'_> {
    fn get(&self, p: &str, b: Backing) -> Option<&Samples> {
        self.cells
            .iter()
            .position(|c| c.pattern == p && c.backing == b)
            .map(|i| &self.res[i])
    }
}

/// Prints the tables and targets, writes the plot and raw results; returns the failed runs.
fn report(plan: &Plan, cells: &[Cell], res: &[Samples]) -> Result<usize> {
    let find = Results { cells, res };
    let mut targets = Vec::new();
    println!();
    print!("{}", fault_table(plan, &find, &mut targets));
    println!();
    print!("{}", workload_table(plan, &find));
    workload_targets(&find, &mut targets);
    println!();
    print!("{}", bounds_table(plan, &find));
    println!();
    print!("{}", time_table(plan, &find));
    println!("\ntargets (from the medians above; MISS is reported as measured):");
    for t in &targets {
        println!("  {t}");
    }
    let curves = plan
        .args
        .patterns
        .iter()
        .map(|p| {
            let pts = plan
                .args
                .fractions
                .iter()
                .filter_map(|&f| slowdown(&find, p, Backing::Remote(f)).map(|s| (f * 100.0, s)))
                .collect();
            (p.clone(), pts)
        })
        .collect::<Vec<_>>();
    let svg = plan.env.out.join("excache.svg");
    plot::slowdown_svg(&svg, &curves, &plot_title(plan))?;
    let raw = write_out(&plan.env.out, "excache.json", &raw_json(cells, res))?;
    let failed: usize = res.iter().map(|s| s.failures.len()).sum();
    check_residency(cells, res);
    println!(
        "\n  plot: {}\n  raw samples: {}",
        svg.display(),
        raw.display()
    );
    Ok(failed)
}

fn plot_title(plan: &Plan) -> String {
    format!(
        "ExCache: pass+verify time vs all-local, {} working set, writes={}%, {}",
        fmt_size(plan.bytes),
        plan.args.writes,
        plan.args.policy
    )
}

/// Median pass+verify cycles of a cell relative to the pattern's all-local median.
fn slowdown(find: &Results, p: &str, b: Backing) -> Option<f64> {
    let base = find.get(p, Backing::AllLocal)?.median(work_cycles)?;
    Some(find.get(p, b)?.median(work_cycles)? / base)
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "NO DATA",
    }
}

fn fault_table(plan: &Plan, find: &Results, targets: &mut Vec<String>) -> String {
    let (p, f) = (&plan.args.floor_pattern, plan.args.floor_fraction);
    let remote = find.get(p, Backing::Remote(f));
    let floor = find.get(p, Backing::LocalStore(f));
    let get = |s: Option<&Samples>, k: &str| s.and_then(|s| s.median(|g| g.excache(k)));
    let mut t = Table::new(&[
        "fault path",
        "faults",
        "faults: p50 us",
        "p99 us",
        "fetching faults: p50 us",
        "p99 us",
        "p50 vs floor",
        "p99 vs floor",
    ]);
    let div = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    for (name, s) in [
        ("remote: vnode-memd, loopback TCP", remote),
        ("floor: --mem-server local", floor),
    ] {
        t.row(vec![
            name.into(),
            num(get(s, "faults"), 0),
            num(get(s, "fault_p50_us"), 1),
            num(get(s, "fault_p99_us"), 1),
            num(get(s, "fetch_fault_p50_us"), 1),
            num(get(s, "fetch_fault_p99_us"), 1),
            ratio(div(
                get(s, "fetch_fault_p50_us"),
                get(floor, "fetch_fault_p50_us"),
            )),
            ratio(div(
                get(s, "fetch_fault_p99_us"),
                get(floor, "fetch_fault_p99_us"),
            )),
        ]);
    }
    let r = div(
        get(remote, "fetch_fault_p50_us"),
        get(floor, "fetch_fault_p50_us"),
    );
    targets.push(format!(
        "{}  remote fault p50 <= 1.3x local floor (faults that fetch their page): {}",
        verdict(r.map(|r| r <= 1.3)),
        ratio(r)
    ));
    format!(
        "per-fault latency (ExCache's own p50/p99 per run, medians over runs), {p} at {}% cache; \
         all faults include the fill's zero-fills, which never leave this process; fetching faults \
         are those whose page comes from the page store, and the targets compare those\n{}",
        f * 100.0,
        t.render()
    )
}

fn workload_targets(find: &Results, targets: &mut Vec<String>) {
    let z = slowdown(find, "zipf", Backing::Remote(0.5));
    targets.push(format!(
        "{}  zipf at 50% within 1.5x of all-local: {}",
        verdict(z.map(|z| z <= 1.5)),
        ratio(z)
    ));
    for p in ["seq", "random", "zipf"] {
        for f in [0.5, 0.25] {
            let (Some(ex), Some(sw)) = (
                slowdown(find, p, Backing::Remote(f)),
                slowdown(find, p, Backing::LinuxSwap(f)),
            ) else {
                continue;
            };
            targets.push(format!(
                "{}  {p} at {}% faster than Linux swap: {} of its time",
                verdict(Some(ex < sw)),
                f * 100.0,
                ratio(Some(ex / sw))
            ));
        }
    }
    let s = slowdown(find, "seq", Backing::Remote(0.25)).map(|s| 1.0 / s);
    targets.push(format!(
        "{}  seq at 25% >= 50% of all-local speed: {}",
        verdict(s.map(|s| s >= 0.5)),
        num(s.map(|s| s * 100.0), 0) + "%"
    ));
}

/// KVM's cost of mapping one page the host already holds, in guest TSC cycles: the
/// preallocated fill's cycles per page less all-local's warm cycles per access.
fn kvm_map_floor(find: &Results) -> Option<f64> {
    let per = |b: Backing, f: fn(&GuestRun) -> Option<f64>| find.get("seq", b)?.median(f);
    let fill = per(Backing::Prealloc, |g| {
        Some(g.field("fill_cycles").ok()? as f64 / g.field("pages").ok()? as f64)
    })?;
    let warm = per(Backing::AllLocal, |g| {
        let n = g.field("reads").ok()? + g.field("writes").ok()?;
        Some(g.field("pass_cycles").ok()? as f64 / n as f64)
    })?;
    Some((fill - warm).max(0.0))
}

/// The best ratio to all-local any ExCache could reach at each target's point on this host (see
/// the module docs), beside what the local store and the remote path measured.
fn bounds_table(plan: &Plan, find: &Results) -> String {
    let Some(floor) = kvm_map_floor(find) else {
        return "bounds: no --mem-prealloc run (this vnode lacks the flag), so no KVM floor\n"
            .into();
    };
    let pages = plan.bytes / 4096;
    let foot = (plan.footprint / 4096) as f64;
    let mut t = Table::new(&[
        "target",
        "OPT misses: passes",
        "verify",
        "LRU: passes",
        "verify",
        "fault floor us",
        "= Mcyc",
        "all-local Mcyc",
        "best possible",
        "with LRU",
        "local store",
        "remote",
        "target",
    ]);
    for (p, f, limit, is_speed) in [("seq", 0.25, 2.0, true), ("zipf", 0.5, 1.5, false)] {
        let (Some(base), Some(pat)) = (
            find.get(p, Backing::AllLocal)
                .and_then(|s| s.median(work_cycles)),
            opt::pattern(p),
        ) else {
            continue;
        };
        // C: the cell's ExCache limit less the guest's own pages below the working set.
        let c = find
            .get(p, Backing::Remote(f))
            .and_then(|s| s.median(|g| g.excache("limit_pages")))
            .map_or(pages as f64 * f, |l| (l - foot).max(0.0));
        let (seed, writes, passes, cap) =
            (plan.env.seed, plan.args.writes, plan.passes, c as usize);
        let (m, lru) = opt::misses(pages, pat, seed, writes, passes, cap);
        // A sequential miss can be prefetched: it costs at least KVM's mapping. A zipf miss in
        // the passes cannot be foreseen: it is a fault, at least the local floor's p50.
        let fault_us = find
            .get(p, Backing::LocalStore(f))
            .or_else(|| {
                find.get(
                    &plan.args.floor_pattern,
                    Backing::LocalStore(plan.args.floor_fraction),
                )
            })
            .and_then(|s| s.median(|g| g.excache("fault_p50_us")));
        let (fault_cyc, shown_us) = match (pat, fault_us) {
            (testguest::cmdline::Pattern::Seq, _) => (floor, "-".to_string()),
            (_, Some(us)) => (us * plan.env.tsc_hz / 1e6, format!("{us:.0}")),
            (_, None) => (floor, "-".to_string()),
        };
        let extra = m.passes as f64 * fault_cyc + m.verify as f64 * floor;
        let best = (base + extra) / base;
        let with_lru = (base + lru.passes as f64 * fault_cyc + lru.verify as f64 * floor) / base;
        let show = |r: Option<f64>| {
            if is_speed {
                num(r.map(|r| 100.0 / r), 0) + "% speed"
            } else {
                ratio(r)
            }
        };
        let goal = if is_speed {
            format!(">= {:.0}% speed", 100.0 / limit)
        } else {
            format!("<= {limit}x")
        };
        t.row(vec![
            format!("{p} at {}%", f * 100.0),
            m.passes.to_string(),
            m.verify.to_string(),
            lru.passes.to_string(),
            lru.verify.to_string(),
            shown_us,
            num(Some(extra / 1e6), 0),
            num(Some(base / 1e6), 0),
            show(Some(best)),
            show(Some(with_lru)),
            show(slowdown(find, p, Backing::LocalStore(f))),
            show(slowdown(find, p, Backing::Remote(f))),
            format!(
                "{goal}: {}",
                if best > limit {
                    "out of reach here"
                } else {
                    "within the bound"
                }
            ),
        ]);
    }
    format!(
        "bounds: Belady's OPT over the guest's own accesses (the fewest misses of any cache of C \
         pages); each miss costs at least KVM's mapping of a resident page ({floor:.0} cycles: \
         --mem-prealloc fill less a warm access, this run), and a zipf miss in the passes, which no \
         prefetcher can foresee, at least the local userfaultfd floor's p50 fault; best possible = \
         (all-local + OPT misses x cost) / all-local. LRU: what true LRU (no knowledge of the \
         future) misses on the same accesses\n{}",
        t.render()
    )
}

/// Where the fault thread's time went (the `time_us` stats), for the remote and local-store
/// cells, beside the guest's own pass+verify time.
fn time_table(plan: &Plan, find: &Results) -> String {
    const PHASES: [&str; 8] = [
        "serve",
        "reclaim",
        "fetch",
        "install",
        "wake",
        "protect",
        "writeback",
        "drop",
    ];
    let mut head = vec!["workload", "memory", "guest s"];
    head.extend(PHASES);
    let mut t = Table::new(&head);
    let mut rows = 0;
    for (c, s) in find.cells.iter().zip(find.res) {
        if !matches!(
            c.backing,
            Backing::Remote(_) | Backing::LocalStore(_) | Backing::NoReclaim(_)
        ) {
            continue;
        }
        let phase = |k: &'static str| {
            s.median(move |g| g.stats.as_ref()?["excache"]["time_us"][k].as_f64())
        };
        if phase("serve").is_none() {
            continue; // a vnode without the breakdown
        }
        let mut row = vec![
            c.pattern.clone(),
            c.backing.label(),
            num(s.median(work_cycles).map(|c| c / plan.env.tsc_hz), 2),
        ];
        row.extend(PHASES.iter().map(|k| num(phase(k).map(|us| us / 1e6), 2)));
        t.row(row);
        rows += 1;
    }
    if rows == 0 {
        return String::new();
    }
    format!(
        "the fault thread's time in seconds by phase (medians; whole runs, fill included); guest s = \
         the guest's pass+verify time; reclaim = the reclaimer between faults; wake = UFFDIO_WAKE \
         of the thread that faulted\n{}",
        t.render()
    )
}

fn workload_table(plan: &Plan, find: &Results) -> String {
    let (cells, res) = (find.cells, find.res);
    let mut t = Table::new(&[
        "workload",
        "memory",
        "ok runs",
        "pass+verify Mcyc",
        "p90",
        "min",
        "vs all-local",
        "min/min",
        "wall s",
        "vs all-local",
        "faults",
        "evictions",
        "writebacks",
        "fault p50 us",
        "traffic GB/s",
        "vs swap",
    ]);
    for (c, s) in cells.iter().zip(res) {
        let base = find.get(&c.pattern, Backing::AllLocal);
        let cyc = Summary::of(&s.values(work_cycles));
        let rel = |f: fn(&GuestRun) -> Option<f64>| Some(s.median(f)? / base?.median(f)?);
        let ex = |k: &str| num(s.median(|g| g.excache(k)), 0);
        t.row(vec![
            c.pattern.clone(),
            c.backing.label(),
            format!("{}/{}", s.runs.len(), s.runs.len() + s.failures.len()),
            num(cyc.map(|c| c.median / 1e6), 0),
            num(cyc.map(|c| c.p90 / 1e6), 0),
            num(cyc.map(|c| c.min / 1e6), 0),
            ratio(rel(work_cycles)),
            ratio(min_rel(s, base)),
            num(s.median(wall_s), 2),
            ratio(rel(wall_s)),
            ex("faults"),
            ex("evictions"),
            ex("writebacks"),
            num(s.median(|g| g.excache("fault_p50_us")), 1),
            num(s.median(|g| traffic(g, plan.env.tsc_hz)), 2),
            ratio(vs_swap(find, c)),
        ]);
    }
    format!(
        "workloads: medians of {} runs; Mcyc = 10^6 guest TSC cycles ({:.3} GHz) of the passes \
         and verify phases; vs all-local = ratio of medians (targets use it), min/min = ratio of \
         the fastest runs; memory = ExCache size as % of the {} working set; traffic = page bytes \
         in plus out per second of pass+verify time (fill included in the bytes); vs swap = ratio \
         of medians to the Linux-swap cell of the same size\n{}",
        plan.env.runs,
        plan.env.tsc_hz / 1e9,
        fmt_size(plan.bytes),
        t.render()
    )
}

/// Page bytes moved both ways per second of the guest's pass+verify time, in GB/s.
fn traffic(g: &GuestRun, tsc_hz: f64) -> Option<f64> {
    let bytes = g.excache("bytes_in")? + g.excache("bytes_out")?;
    Some(bytes / (work_cycles(g)? / tsc_hz) / 1e9)
}

/// A cell's median pass+verify time over the Linux-swap cell's of the same size.
fn vs_swap(find: &Results, c: &Cell) -> Option<f64> {
    let f = match c.backing {
        Backing::Remote(f) | Backing::NoReclaim(f) | Backing::LocalStore(f) => f,
        _ => return None,
    };
    let swap = find.get(&c.pattern, Backing::LinuxSwap(f))?;
    Some(find.get(&c.pattern, c.backing)?.median(work_cycles)? / swap.median(work_cycles)?)
}

/// Fastest run over the all-local baseline's fastest: load spikes only ever add time, so on a
/// shared machine this is a useful second view beside the ratio of medians.
fn min_rel(s: &Samples, base: Option<&Samples>) -> Option<f64> {
    let min = |s: &Samples| Summary::of(&s.values(work_cycles)).map(|v| v.min);
    Some(min(s)? / min(base?)?)
}

/// Says so when a run's resident set went over the ExCache's limit (it would flatter the cache).
fn check_residency(cells: &[Cell], res: &[Samples]) {
    for (c, s) in cells.iter().zip(res) {
        for g in &s.runs {
            if let (Some(r), Some(l)) = (g.excache("max_resident_pages"), g.excache("limit_pages"))
            {
                if r > l {
                    println!(
                        "  WARNING: {} {}: max_resident_pages {r} > limit_pages {l}",
                        c.pattern,
                        c.backing.label()
                    );
                }
            }
        }
    }
}

fn raw_json(cells: &[Cell], res: &[Samples]) -> String {
    let mut m = BTreeMap::new();
    for (c, s) in cells.iter().zip(res) {
        let runs: Vec<Value> = s
            .runs
            .iter()
            .map(|g| json!({"wall_s": g.wall.as_secs_f64(), "guest": g.summary, "stats": g.stats}))
            .collect();
        m.insert(
            format!("{} {}", c.pattern, c.backing.label()),
            json!({"runs": runs, "failures": s.failures}),
        );
    }
    format!("{:#}\n", json!(m))
}
