//! The Linux-swap peer of the ExCache: what a user would reach for instead. A plain all-local
//! `vnode` runs in a cgroup v1 memory cgroup whose `memory.limit_in_bytes` is the ExCache's size
//! (plus the process's own memory beside guest RAM), with swap on a swap file this bench creates
//! and removes. Needs root and the v1 memory controller at /sys/fs/cgroup/memory (both here).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::guestrun::{GuestRun, GuestSpec};

const MEMCG: &str = "/sys/fs/cgroup/memory";

/// A swap file switched on and a memory cgroup, both removed on drop.
pub struct SwapPeer {
    file: PathBuf,
    cgroup: PathBuf,
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl SwapPeer {
    /// Creates a swap file of `bytes` in `dir`, switches it on and makes a memory cgroup.
    pub fn start(dir: &Path, bytes: u64) -> Result<SwapPeer> {
        if !Path::new(MEMCG).join("memory.limit_in_bytes").exists() {
            bail!("no cgroup v1 memory controller at {MEMCG}");
        }
        let file = dir.join(format!("vnode-bench-{}.swap", std::process::id()));
        let cgroup = Path::new(MEMCG).join(format!("vnode-bench-{}", std::process::id()));
        let peer = SwapPeer {
            file: file.clone(),
            cgroup: cgroup.clone(),
        };
        // Written, not sparse: swapon refuses files with holes.
        let mut f = std::fs::File::create(&file)
            .with_context(|| format!("cannot create {}", file.display()))?;
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..bytes.div_ceil(1 << 20) {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let path = file.to_string_lossy().into_owned();
        run("mkswap", &[&path])?;
        run("swapon", &[&path])?;
        std::fs::create_dir(&cgroup)
            .with_context(|| format!("cannot create {}", cgroup.display()))?;
        Ok(peer)
    }

    /// Runs `spec` (an all-local vnode) with its memory limited to `limit` bytes: this process
    /// joins the cgroup while it spawns the run, so the child is born inside it.
    pub fn run(&self, spec: &GuestSpec<'_>, limit: u64) -> Result<GuestRun> {
        std::fs::write(self.cgroup.join("memory.limit_in_bytes"), limit.to_string())
            .context("cannot set memory.limit_in_bytes")?;
        let me = std::process::id().to_string();
        std::fs::write(self.cgroup.join("cgroup.procs"), &me).context("cannot join the cgroup")?;
        let r = spec.run();
        std::fs::write(Path::new(MEMCG).join("cgroup.procs"), &me)
            .context("cannot leave the cgroup")?;
        r
    }
}

impl Drop for SwapPeer {
    fn drop(&mut self) {
        let path = self.file.to_string_lossy().into_owned();
        if let Err(e) = run("swapoff", &[&path]) {
            eprintln!("  cannot switch off {path}: {e:#}");
        }
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}
