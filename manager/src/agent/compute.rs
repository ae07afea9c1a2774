//! The compute side of the agent: runs the vNodes the manager assigns to this host, each as
//! `vnode run ... --api-socket DIR/api.sock` under a monitor ([`super::monitor`]), reads their
//! counters and stops them through that API socket (never by their stdin or stderr), and
//! reports how each ended. Each vNode has a directory `STATE/vnodes/ID/` holding its spec, its
//! credentials (0600), its socket, console, log, pid and exit status, so a restarted agent finds
//! its running vNodes again.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vnode_manager_client::types::{Assignment, VnodeReport, VnodeState};

use super::monitor::{self, Ended};

/// How long a stopped vNode has to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a new vNode may take to write its pid before it counts as failed.
const START_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Monitor(#[from] monitor::MonitorError),
}

struct Local {
    dir: PathBuf,
    seen: Instant,
    counters: Option<serde_json::Value>,
    stop_deadline: Option<Instant>,
}

/// This host's vNodes.
pub struct Compute {
    root: PathBuf,
    vnode_bin: PathBuf,
    vnodes: BTreeMap<u64, Local>,
}

impl Compute {
    /// Opens `state_dir/vnodes`, adopting every vNode found there that has not been reported
    /// as ended.
    pub fn open(state_dir: &Path, vnode_bin: PathBuf) -> Result<Compute, ComputeError> {
        let root = state_dir.join("vnodes");
        std::fs::create_dir_all(&root).map_err(|source| ComputeError::Prepare {
            path: root.clone(),
            source,
        })?;
        let mut vnodes = BTreeMap::new();
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let Some(id) = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            if e.path().join("reported").exists() {
                continue;
            }
            let alive = monitor::alive_pid(&e.path());
            tracing::info!(vnode = id, pid = ?alive, "found a vNode from before the restart");
            vnodes.insert(
                id,
                Local {
                    dir: e.path(),
                    seen: Instant::now(),
                    counters: None,
                    stop_deadline: None,
                },
            );
        }
        Ok(Compute {
            root,
            vnode_bin,
            vnodes,
        })
    }

    /// The vNodes this agent supervises now (running or not yet reported).
    pub fn ids(&self) -> Vec<u64> {
        self.vnodes.keys().copied().collect()
    }

    /// A report of every vNode: running ones with fresh counters read through their API, ended
    /// ones with how they ended.
    pub fn report(&mut self) -> Vec<VnodeReport> {
        let mut out = Vec::new();
        for (&id, l) in self.vnodes.iter_mut() {
            let console = Some(l.dir.join("console").display().to_string());
            let (state, exit_code, message) =
                match (monitor::ended(&l.dir), monitor::alive_pid(&l.dir)) {
                    (Some(e), _) => ended_state(&e, &l.dir),
                    (None, Some(pid)) => {
                        if let Some(c) = read_counters(&l.dir) {
                            l.counters = Some(c);
                        }
                        if let Some(deadline) = l.stop_deadline.filter(|d| Instant::now() > *d) {
                            tracing::warn!(
                                vnode = id,
                                pid,
                                ?deadline,
                                "did not stop in time; killing it"
                            );
                            // SAFETY: kill(2) has no memory effects; pid is the vnode we started.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        }
                        (VnodeState::Running, None, None)
                    }
                    (None, None) if l.seen.elapsed() < START_GRACE => {
                        (VnodeState::Pending, None, None)
                    }
                    (None, None) => (
                        VnodeState::Failed,
                        None,
                        Some(format!(
                            "its monitor is gone and left no exit status; log: {}",
                            last_line(&l.dir)
                        )),
                    ),
                };
            out.push(VnodeReport {
                id,
                state,
                exit_code,
                message,
                counters: l.counters.clone(),
                console,
            });
        }
        out
    }

    /// The manager has the reports: forget the vNodes that ended.
    pub fn acknowledge(&mut self, sent: &[VnodeReport]) {
        for r in sent.iter().filter(|r| !r.state.is_active()) {
            if let Some(l) = self.vnodes.remove(&r.id) {
                let _ = std::fs::write(l.dir.join("reported"), b"");
            }
        }
    }

    /// Starts what `run` lists and is not running here; stops what runs here and is not listed.
    pub fn apply(&mut self, run: &[Assignment]) {
        for a in run {
            // Ids are never reused: a directory means it ran here already (or still does).
            if self.vnodes.contains_key(&a.id) || self.root.join(a.id.to_string()).exists() {
                continue;
            }
            let dir = self.root.join(a.id.to_string());
            match self.launch(a, &dir) {
                Ok(()) => tracing::info!(vnode = a.id, "vnode started"),
                Err(e) => {
                    tracing::error!(vnode = a.id, error = %e, "cannot start vnode");
                    let ended = Ended {
                        code: None,
                        signal: None,
                    };
                    let _ = std::fs::write(dir.join("log"), format!("vnode-agent: {e}\n"));
                    let _ = monitor::write_atomic(
                        &dir.join("exit"),
                        &serde_json::to_vec(&ended).unwrap_or_default(),
                    );
                }
            }
            self.vnodes.insert(
                a.id,
                Local {
                    dir,
                    seen: Instant::now(),
                    counters: None,
                    stop_deadline: None,
                },
            );
        }
        for (&id, l) in self.vnodes.iter_mut() {
            let wanted = run.iter().any(|a| a.id == id);
            if wanted || l.stop_deadline.is_some() || monitor::ended(&l.dir).is_some() {
                continue;
            }
            tracing::info!(
                vnode = id,
                "no longer assigned here: stopping it through its API"
            );
            if let Err(e) = api(&l.dir).and_then(|c| c.stop().map(|_| ())) {
                tracing::warn!(vnode = id, error = %e, "stop through the API failed; it will be killed");
            }
            l.stop_deadline = Some(Instant::now() + STOP_GRACE);
        }
    }

    fn launch(&self, a: &Assignment, dir: &Path) -> Result<(), ComputeError> {
        let prep = |source| ComputeError::Prepare {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(prep)?;
        write_secret(&dir.join("mem.cred"), &a.mem_credential).map_err(prep)?;
        let spec = serde_json::to_vec_pretty(a).unwrap_or_default();
        // The spec holds credentials too: 0600 like them.
        write_secret(
            &dir.join("assignment.json"),
            &String::from_utf8_lossy(&spec),
        )
        .map_err(prep)?;
        let s = &a.spec;
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            s.kernel.clone(),
            "--cmdline".into(),
            s.cmdline.clone(),
            "--mem".into(),
            s.mem.0.to_string(),
            "--vcpus".into(),
            s.vcpus.to_string(),
            "--vnode-id".into(),
            a.id.to_string(),
            "--api-socket".into(),
            dir.join("api.sock").display().to_string(),
            "--serial".into(),
            dir.join("console").display().to_string(),
            "--mem-server".into(),
            a.mem_servers.join(","),
            "--local-mem".into(),
            s.local_mem.0.to_string(),
            "--mem-credential-file".into(),
            dir.join("mem.cred").display().to_string(),
        ];
        if let Some(d) = &a.disk {
            let mut spec = d.clone();
            if let Some(c) = &a.disk_credential {
                let f = dir.join("disk.cred");
                write_secret(&f, c).map_err(prep)?;
                spec = format!("{spec},credential-file={}", f.display());
            }
            args.push("--disk".into());
            args.push(spec);
        }
        monitor::start(dir, &self.vnode_bin, &args)?;
        Ok(())
    }
}

/// Writes a credential file readable by its owner only.
fn write_secret(path: &Path, body: &str) -> std::io::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(body.as_bytes())
}

fn api(dir: &Path) -> Result<vnode_api::client::Client, vnode_api::client::ClientError> {
    Ok(vnode_api::client::Client::new(dir.join("api.sock"))?.with_timeout(Duration::from_secs(2)))
}

fn read_counters(dir: &Path) -> Option<serde_json::Value> {
    let c = api(dir).ok()?.counters().ok()?;
    serde_json::to_value(c).ok()
}

fn ended_state(e: &Ended, dir: &Path) -> (VnodeState, Option<i32>, Option<String>) {
    match e.code {
        Some(c) => (
            VnodeState::Exited,
            Some(c),
            (c != 0).then(|| format!("{}; log: {}", e.describe(), last_line(dir))),
        ),
        None => (
            VnodeState::Failed,
            None,
            Some(format!("{}; log: {}", e.describe(), last_line(dir))),
        ),
    }
}

/// The last non-empty line of the vNode's log (vnode's one error line, when it failed).
fn last_line(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("log"))
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(empty)")
        .chars()
        .take(300)
        .collect()
}
