//! `vnodectl vm --api-socket PATH ACTION`: one running vnode through its control API (the
//! `vnode_api` client), as `ch-remote` is for Cloud Hypervisor. A human table by default, JSON
//! with `-o json`. Each action is one arm of [`run`]: a new one (snapshot, restore) is one more
//! variant of [`VmAction`] and one more arm.

use std::path::PathBuf;
use std::time::Duration;

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use serde::Serialize;
use vnode_api::client::{Client, ClientError};
use vnode_api::{Counters, VmInfo};

/// What to do with the VM.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum VmAction {
    /// State and configuration.
    Info,
    /// Every counter (the VMM's and the ExCache's).
    Counters,
    /// The Prometheus text exposition, as served.
    Metrics,
    /// Pause every vCPU and device (returns once all are parked).
    Pause,
    /// Resume a paused VM.
    Resume,
    /// ACPI power button, then a stop after the deadline.
    Shutdown {
        /// Seconds the guest gets to power off (vnode's default: 30).
        #[arg(long, value_name = "S")]
        deadline: Option<f64>,
    },
    /// Stop the VM now (vnode frees guest RAM on the servers and exits).
    Stop,
    /// Replica states of guest RAM and of each replicated disk (healthy, re-replicating or
    /// resyncing, degraded), one row per replica.
    Replicas,
    /// Give replicated guest RAM a spare memory server: a lost replica is re-made there.
    AddMemSpare {
        #[arg(value_name = "HOST:PORT")]
        server: String,
    },
    /// Grow or shrink the ExCache to SIZE (e.g. 64M, 1G).
    ResizeExcache {
        #[arg(value_name = "SIZE")]
        size: String,
    },
    /// Pause the VM and write its snapshot to FILE (on the vnode's host); it stays paused. A
    /// `stop` then keeps guest RAM on the memory servers for `restore`.
    Snapshot {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Start a new vnode from snapshot FILE, serving its API on --api-socket, and return once
    /// it answers (`vnode restore --snapshot FILE`, next to this vnodectl).
    Restore {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The restored guest's serial console (default: vnode's stdout).
        #[arg(long, value_name = "PATH")]
        serial: Option<PathBuf>,
    },
}

/// Output format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct VmArgs {
    /// vnode's API socket (`vnode run --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Output: a table for people, or JSON for scripts.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub action: VmAction,
}

#[derive(Debug, thiserror::Error)]
pub enum VmCmdError {
    #[error(transparent)]
    Api(#[from] ClientError),
    #[error(transparent)]
    Size(#[from] vnode_common::size::SizeError),
    #[error("--deadline {0}: not a number of seconds")]
    Deadline(f64),
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("the restoring vnode exited ({0}) before its API answered")]
    RestoreFailed(std::process::ExitStatus),
    #[error("the restoring vnode's API did not answer within {0:?}")]
    RestoreTimeout(Duration),
}

/// Runs one action and returns what to print.
pub fn run(args: &VmArgs) -> Result<String, VmCmdError> {
    let c = Client::new(&args.api_socket)?;
    let json = args.output == Output::Json;
    Ok(match &args.action {
        VmAction::Info => show_info(&c.info()?, json),
        VmAction::Counters => show_counters(&c.counters()?, json),
        VmAction::Metrics => c.metrics_text()?,
        VmAction::Pause => show_info(&c.pause()?, json),
        VmAction::Resume => show_info(&c.resume()?, json),
        VmAction::Shutdown { deadline } => {
            let d = deadline
                .map(|s| Duration::try_from_secs_f64(s).map_err(|_| VmCmdError::Deadline(s)))
                .transpose()?;
            show_info(&c.shutdown(d)?, json)
        }
        VmAction::Stop => show_info(&c.stop()?, json),
        VmAction::Replicas => show_replicas(&c.counters()?, json),
        VmAction::AddMemSpare { server } => show_info(&c.add_mem_spare(server)?, json),
        VmAction::ResizeExcache { size } => {
            let bytes = vnode_common::size::parse_size(size)?;
            show_info(&c.resize_excache(bytes)?, json)
        }
        VmAction::Snapshot { file } => {
            // The path is vnode's to open: make a relative one mean the same to it.
            let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
            show_snapshot(&c.snapshot(&file.display().to_string())?, json)
        }
        VmAction::Restore { file, serial } => show_info(
            &restore(&args.api_socket, file, serial.as_deref(), &c)?,
            json,
        ),
    })
}

/// How long `restore` waits for the new vnode's API.
const RESTORE_WAIT: Duration = Duration::from_secs(60);

/// Starts `vnode restore` in the background and waits for its API to answer.
fn restore(
    socket: &std::path::Path,
    file: &std::path::Path,
    serial: Option<&std::path::Path>,
    c: &Client,
) -> Result<VmInfo, VmCmdError> {
    let vnode = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("vnode")))
        .unwrap_or_else(|| PathBuf::from("vnode"));
    let mut cmd = std::process::Command::new(&vnode);
    cmd.args(["restore", "--snapshot"])
        .arg(file)
        .arg("--api-socket")
        .arg(socket)
        .stdin(std::process::Stdio::null());
    if let Some(s) = serial {
        cmd.arg("--serial").arg(s);
    }
    let mut child = cmd.spawn().map_err(|e| VmCmdError::Spawn(vnode, e))?;
    let deadline = std::time::Instant::now() + RESTORE_WAIT;
    loop {
        if let Ok(info) = c.info() {
            return Ok(info);
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(VmCmdError::RestoreFailed(st));
        }
        if std::time::Instant::now() >= deadline {
            return Err(VmCmdError::RestoreTimeout(RESTORE_WAIT));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn show_snapshot(s: &vnode_api::SnapshotInfo, json: bool) -> String {
    if json {
        return to_json(s);
    }
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.add_row(vec!["snapshot".to_owned(), s.path.clone()]);
    t.add_row(vec!["bytes".to_owned(), s.bytes.to_string()]);
    t.add_row(vec!["guest RAM".to_owned(), s.ram.clone()]);
    t.add_row(vec![
        "flushed pages".to_owned(),
        s.flushed_pages.to_string(),
    ]);
    t.add_row(vec!["took".to_owned(), format!("{} ms", s.took_ms)]);
    t.to_string()
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string_pretty(v).expect("API types always serialize")
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

fn show_info(i: &VmInfo, json: bool) -> String {
    if json {
        return to_json(i);
    }
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.add_row(vec!["id".to_owned(), i.id.to_string()]);
    t.add_row(vec!["state".to_owned(), i.state.to_string()]);
    t.add_row(vec!["vcpus".to_owned(), i.config.vcpus.to_string()]);
    t.add_row(vec!["memory".to_owned(), mib(i.config.mem_size)]);
    if let Some(e) = &i.config.excache {
        t.add_row(vec![
            "excache".to_owned(),
            format!(
                "{} ({}) on {}",
                mib(e.local_mem),
                e.policy,
                e.servers.join(",")
            ),
        ]);
    }
    for (n, d) in i.config.disks.iter().enumerate() {
        let ro = if d.read_only { " (read-only)" } else { "" };
        t.add_row(vec![format!("disk {n}"), format!("{}{ro}", d.source)]);
    }
    for (n, d) in i.config.nets.iter().enumerate() {
        t.add_row(vec![format!("net {n}"), format!("{} {}", d.tap, d.mac)]);
    }
    t.add_row(vec!["pid".to_owned(), i.pid.to_string()]);
    t.add_row(vec!["version".to_owned(), i.version.clone()]);
    t.to_string()
}

fn show_replicas(c: &Counters, json: bool) -> String {
    let mem = c.excache.as_ref().and_then(|e| e.replication.as_ref());
    if json {
        return to_json(&serde_json::json!({
            "memory": mem,
            "disks": c.replicated_disks,
        }));
    }
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(vec![
        "what",
        "state",
        "replica",
        "server",
        "replica state",
        "detail",
    ]);
    if let Some(m) = mem {
        let detail = format!(
            "failovers {}, re-replications {}, copied {} pages, degraded {} ms{}",
            m.failovers,
            m.rereplications,
            m.copied_pages,
            m.degraded_ms,
            if m.stale_copies.is_empty() {
                String::new()
            } else {
                format!(", stale copies on {}", m.stale_copies.join(","))
            }
        );
        for (n, r) in m.replicas.iter().enumerate() {
            let d = r.failure.clone().unwrap_or_default();
            let first = if n == 0 {
                detail.clone()
            } else {
                String::new()
            };
            let d = [first, d]
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect::<Vec<_>>();
            t.add_row(vec![
                format!("guest RAM (region {})", m.region),
                m.state.clone(),
                r.role.clone(),
                r.server.clone(),
                r.state.clone(),
                d.join("; "),
            ]);
        }
    }
    for d in &c.replicated_disks {
        for (n, r) in d.replicas.iter().enumerate() {
            t.add_row(vec![
                format!("disk {}", d.disk),
                d.state.clone(),
                n.to_string(),
                r.uri.clone(),
                r.state.clone(),
                format!(
                    "dirty {} bytes, failovers {}, resyncs {}{}",
                    r.dirty_bytes,
                    d.failovers,
                    d.resyncs,
                    r.failure
                        .as_deref()
                        .map(|f| format!("; {f}"))
                        .unwrap_or_default()
                ),
            ]);
        }
    }
    if mem.is_none() && c.replicated_disks.is_empty() {
        return "nothing is replicated".to_owned();
    }
    t.to_string()
}

fn show_counters(c: &Counters, json: bool) -> String {
    if json {
        return to_json(c);
    }
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(vec!["counter", "value"]);
    let v = serde_json::to_value(c).expect("API types always serialize");
    for group in ["vmm", "excache"] {
        let Some(map) = v[group].as_object() else {
            continue;
        };
        for (k, x) in map {
            match x {
                serde_json::Value::Object(inner) => {
                    for (k2, y) in inner {
                        t.add_row(vec![format!("{group}.{k}.{k2}"), y.to_string()]);
                    }
                }
                _ => {
                    t.add_row(vec![format!("{group}.{k}"), x.to_string()]);
                }
            }
        }
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_state_and_nested_counters() {
        let c = Counters {
            excache: Some(vnode_api::ExCacheCounters {
                faults: 42,
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = show_counters(&c, false);
        assert!(t.contains("excache.faults") && t.contains("42"), "{t}");
        assert!(t.contains("excache.time_us.serve"), "{t}");
        let j: Counters = serde_json::from_str(&show_counters(&c, true)).unwrap();
        assert_eq!(j, c);
    }

    #[test]
    fn replicas_table_shows_each_replica_and_the_repair() {
        let mut c = Counters::default();
        assert_eq!(show_replicas(&c, false), "nothing is replicated");
        let replica = |role: &str, server: &str, state: &str| vnode_api::MemReplica {
            role: role.into(),
            server: server.into(),
            state: state.into(),
            failure: None,
        };
        c.excache = Some(vnode_api::ExCacheCounters {
            replication: Some(vnode_api::MemReplication {
                state: "re-replicating".into(),
                replicas: vec![
                    replica("primary", "10.0.0.1:7000", "healthy"),
                    replica("backup", "10.0.0.3:7000", "copying"),
                ],
                failovers: 1,
                copied_pages: 77,
                stale_copies: vec!["10.0.0.2:7000".into()],
                ..Default::default()
            }),
            ..Default::default()
        });
        let t = show_replicas(&c, false);
        for want in [
            "re-replicating",
            "10.0.0.3:7000",
            "copying",
            "copied 77 pages",
            "stale copies on 10.0.0.2:7000",
        ] {
            assert!(t.contains(want), "{want}: {t}");
        }
        let j: serde_json::Value = serde_json::from_str(&show_replicas(&c, true)).unwrap();
        assert_eq!(j["memory"]["state"], "re-replicating");
    }
}
