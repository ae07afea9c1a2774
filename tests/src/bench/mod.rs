//! vnode-bench: the modes, their options, and what every report starts with.
//!
//! - `boot_mem`: guest fill bandwidth against the same loop run natively, and start time against
//!   spawning `/bin/true` (issue 3).
//! - `excache`: per-fault latency of the remote path against the in-process `local` page store,
//!   and the test guest's workloads at shrinking ExCache sizes against all-local memory (issue 4).
//! - `api`: `GET /vm/counters` latency under a running guest against a paused one, and the
//!   guest's slowdown when `/metrics` is scraped at 10 Hz against no API traffic (issue 11).
//! - `handshake`: connection set-up and 4 KiB read latency with challenge-response
//!   authentication against `--insecure` servers and the TCP floor (issue 10).
//!
//! Everything reported is a median over runs (with p90 where it helps), with its baseline and the
//! ratio beside it: the machines here are small and shared, so single runs mean little.

mod api;
mod boot_mem;
mod excache;
mod guestrun;
mod handshake;
mod host;
mod memd;
mod opt;
mod plot;
mod stats;
mod swap;
mod table;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use vnode_common::cli::{self, Exit, ExitTable, Program, ResultExt};

#[derive(Parser)]
#[command(
    name = "vnode-bench",
    about = "Benchmarks vNode with the test guest: tables with baselines, one run per mode"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

// Parsed once at start-up: the size difference between the modes' options costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Mode {
    /// Guest fill bandwidth (first touch, warm) against the native loop; start-to-first-line time.
    BootMem(boot_mem::BootMemArgs),
    /// ExCache: remote fault latency against the local floor; workloads at 100..12.5% cache.
    Excache(excache::ExcacheArgs),
    /// Control API: counters latency under a running guest; the guest's slowdown under scrapes.
    Api(api::ApiArgs),
    /// Authentication's cost: connection set-up and 4 KiB reads, challenge-response against
    /// --insecure and the TCP floor, on vnode-memd and vnode-blkd.
    Handshake(handshake::HandshakeArgs),
}

/// Options every mode takes.
#[derive(Args, Clone)]
pub struct Common {
    /// Runs per measurement (default: 11 for boot-mem, 3 for excache, 5 for api; 3, 1 and 1
    /// with --quick).
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
    /// A smoke version: small working sets, few runs.
    #[arg(long)]
    quick: bool,
    /// Where plots and raw results go.
    #[arg(long, value_name = "DIR", default_value = "target/vnode-bench")]
    out: PathBuf,
    /// Where `vnode` and `vnode-memd` are (default: this binary's own directory).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// The test guest (build it with `bash guest-images/build.sh testguest`).
    #[arg(long, value_name = "ELF", default_value = default_kernel())]
    kernel: PathBuf,
    /// The workloads' seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn default_kernel() -> &'static str {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../guest-images/out/testguest.elf"
    )
}

/// The resolved environment of one bench run.
pub struct Env {
    pub bin_dir: PathBuf,
    pub vnode: PathBuf,
    pub kernel: PathBuf,
    pub out: PathBuf,
    pub runs: usize,
    pub quick: bool,
    pub seed: u64,
    pub tsc_hz: f64,
}

impl Env {
    fn new(c: &Common, default_runs: usize, quick_runs: usize) -> Result<Env> {
        let bin_dir = match &c.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()
                .context("cannot find this binary's path")?
                .parent()
                .context("this binary has no directory")?
                .to_path_buf(),
        };
        let vnode = guestrun::binary(&bin_dir, "vnode")?;
        if !c.kernel.is_file() {
            anyhow::bail!(
                "test guest {} not found: bash guest-images/build.sh testguest",
                c.kernel.display()
            );
        }
        std::fs::create_dir_all(&c.out)
            .with_context(|| format!("cannot create {}", c.out.display()))?;
        let runs = c
            .runs
            .unwrap_or(if c.quick { quick_runs } else { default_runs })
            .max(1);
        Ok(Env {
            bin_dir,
            vnode,
            kernel: c.kernel.clone(),
            out: c.out.clone(),
            runs,
            quick: c.quick,
            seed: c.seed,
            tsc_hz: host::tsc_hz(),
        })
    }

    /// The lines every report starts with: what ran, where, and how loaded the machine was.
    fn header(&self, mode: &str) -> String {
        format!(
            "vnode-bench {mode}: {} runs per figure{}\n  date: {}\n  vnode: {}\n  \
             guest: {}\n  host TSC: {:.3} GHz (measured against CLOCK_MONOTONIC)\n  \
             at start: {}\n",
            self.runs,
            if self.quick { " (--quick)" } else { "" },
            utc_now(),
            self.vnode.display(),
            self.kernel.display(),
            self.tsc_hz / 1e9,
            host::load_line()
        )
    }
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Writes a report file under the output directory, saying where.
pub fn write_out(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    Ok(p)
}

pub fn main() -> ExitCode {
    let program = Program {
        default_log: "warn",
        exits: ExitTable::Standard,
    };
    cli::main(program, |cli: Cli| {
        match cli.mode {
            Mode::BootMem(a) => {
                let env = Env::new(&a.common, 11, 3)?;
                print!("{}", env.header("boot-mem"));
                boot_mem::run(&env, &a).runtime()?;
            }
            Mode::Excache(a) => {
                let env = Env::new(&a.common, 3, 1)?;
                print!("{}", env.header("excache"));
                excache::run(&env, &a).runtime()?;
            }
            Mode::Api(a) => {
                let env = Env::new(&a.common, 5, 1)?;
                print!("{}", env.header("api"));
                api::run(&env, &a).runtime()?;
            }
            Mode::Handshake(a) => {
                let env = Env::new(&a.common, 5, 1)?;
                print!("{}", env.header("handshake"));
                handshake::run(&env, &a).runtime()?;
            }
        }
        println!("  at end: {}", host::load_line());
        Ok(Exit::Success)
    })
}

/// A size with an optional K/M/G suffix (powers of 1024), as `vnode` and the guest take them.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|_| format!("bad size {s:?} (e.g. 512M)"))
}

/// A size for a command line: the largest unit that divides it.
pub fn fmt_size(b: u64) -> String {
    match b {
        _ if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{}G", b >> 30),
        _ if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{}M", b >> 20),
        _ if b.is_multiple_of(1 << 10) => format!("{}K", b >> 10),
        _ => b.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_trip() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert_eq!(fmt_size(512 << 20), "512M");
        assert_eq!(fmt_size(1 << 30), "1G");
        assert_eq!(fmt_size(64 << 20), "64M");
        assert_eq!(fmt_size(3 << 10), "3K");
    }
}
