//! Runs `vnode run` with the test guest and collects what it reports: the guest's JSON lines
//! (stdout, COM1), the VMM's `--stats` line (stderr), the time from spawn to the first line and
//! to exit.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// One `vnode run` of the test guest.
pub struct GuestSpec<'a> {
    pub vnode: &'a Path,
    pub kernel: &'a Path,
    pub mem: String,
    pub cmdline: String,
    /// Extra `vnode run` arguments (the ExCache's, for instance).
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// What one run reported.
pub struct GuestRun {
    pub first_line: Duration,
    pub wall: Duration,
    /// The guest's summary line (`"test":"mem"`).
    pub summary: Value,
    /// Where the working set R starts (the fill line's `base`): the guest's image, page
    /// tables and metadata lie below it.
    pub base: Option<u64>,
    /// The VMM's `--stats` line, if it printed one.
    pub stats: Option<Value>,
}

impl GuestRun {
    /// A u64 field of the guest's summary line.
    pub fn field(&self, key: &str) -> Result<u64> {
        self.summary[key]
            .as_u64()
            .ok_or_else(|| anyhow!("guest summary has no {key}: {}", self.summary))
    }

    /// A number under the stats line's `excache` object.
    pub fn excache(&self, key: &str) -> Option<f64> {
        self.stats.as_ref()?["excache"][key].as_f64()
    }
}

impl GuestSpec<'_> {
    fn command(&self) -> Command {
        let mut c = Command::new(self.vnode);
        c.arg("run")
            .arg("--kernel")
            .arg(self.kernel)
            .args(["--mem", &self.mem, "--vcpus", "1", "--stats"])
            .arg("--cmdline")
            .arg(&self.cmdline)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// The command as a shell line, for error messages and the report.
    pub fn shell_line(&self) -> String {
        let mut s = format!(
            "{} run --kernel {} --mem {} --vcpus 1 --stats --cmdline '{}'",
            self.vnode.display(),
            self.kernel.display(),
            self.mem,
            self.cmdline
        );
        for a in &self.extra {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// Runs the guest to its end. Fails unless it exits 0 with `"done":true,"ok":true`.
    pub fn run(&self) -> Result<GuestRun> {
        let t0 = Instant::now();
        let mut child = self
            .command()
            .spawn()
            .with_context(|| format!("cannot start {}", self.vnode.display()))?;
        let mut err = child.stderr.take().context("stderr is piped")?;
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let out = child.stdout.take().context("stdout is piped")?;
        let mut first_line = None;
        let mut lines = Vec::new();
        for line in BufReader::new(out).lines() {
            let line = line.context("reading the guest's output")?;
            first_line.get_or_insert_with(|| t0.elapsed());
            lines.push(line);
        }
        let status = child.wait().context("waiting for vnode")?;
        let wall = t0.elapsed();
        let stderr = err_reader.join().unwrap_or_default();
        let fail = |why: &str| {
            anyhow!(
                "{why}: {}\n  exit: {status}\n  stdout tail: {}\n  stderr tail: {}",
                self.shell_line(),
                tail(&lines.join("\n")),
                tail(&stderr)
            )
        };
        let parsed: Vec<Value> = lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let done_ok = parsed.iter().any(|v| v["done"] == true && v["ok"] == true);
        if !status.success() || !done_ok {
            return Err(fail("guest run failed"));
        }
        let summary = parsed
            .iter()
            .find(|v| v["test"] == "mem")
            .cloned()
            .ok_or_else(|| fail("no summary line"))?;
        let stats = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v.get("vmm").is_some());
        Ok(GuestRun {
            first_line: first_line.ok_or_else(|| fail("no output"))?,
            wall,
            summary,
            base: parsed
                .iter()
                .find(|v| v["phase"] == "fill")
                .and_then(|v| v["base"].as_u64()),
            stats,
        })
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(6)..].join("\n    ")
}

/// Spawn-to-exit time of a trivial program: the floor under any process start.
pub fn spawn_floor(prog: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let status = Command::new(prog)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {prog}"))?;
    let d = t0.elapsed();
    if !status.success() {
        bail!("{prog} exited with {status}");
    }
    Ok(d)
}

/// Whether `vnode run --help` mentions `flag`.
pub fn vnode_has_flag(vnode: &Path, flag: &str) -> Result<bool> {
    let out = Command::new(vnode)
        .args(["run", "--help"])
        .output()
        .with_context(|| format!("cannot run {} run --help", vnode.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(flag))
}

/// A binary in `dir`, which must exist.
pub fn binary(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not found (build it: cargo build --release -p vmm -p remote-mem; \
             or pass --bin-dir)",
            p.display()
        );
    }
    Ok(p)
}
