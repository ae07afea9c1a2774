//! `vnode-agent`: the agent of a compute host (runs vNodes for the manager) or, with
//! `--role storage`, of a storage host (serves NBD exports for the manager).
//!
//! ```text
//! vnode-agent --manager http://10.0.0.1:7700 --host-id c1 --state-dir /var/lib/vnode/agent \
//!     --vcpus 8 --local-mem 16G [--vnode /usr/bin/vnode]
//! vnode-agent --role storage --manager http://10.0.0.1:7700 --host-id s1 --state-dir /srv/vnode \
//!     --addr 10.0.0.3 --disk 1T [--blkd /usr/bin/vnode-blkd]
//! ```
//! `vnode-agent monitor --dir D -- PROGRAM ARGS...` is what the agent starts per process.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use vnode_manager::agent::{self, compute::Compute, monitor, storage::Storage, Role};
use vnode_manager_client::heartbeat::Beater;
use vnode_manager_client::types::{Capacity, HostKind, RegisterHost, Size};
use vnode_manager_client::Client;

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Compute,
    Storage,
}

#[derive(Parser)]
#[command(
    name = "vnode-agent",
    version,
    about = "Runs vNodes (or NBD exports) for the vNode manager"
)]
struct Args {
    /// The manager's URL (several, comma-separated, for managers sharing etcd).
    #[arg(long)]
    manager: String,
    /// This host's name in the cluster.
    #[arg(long)]
    host_id: String,
    /// Where the agent keeps each vNode's (or export's) files; a restarted agent finds its
    /// running vNodes here.
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, value_enum, default_value = "compute")]
    role: Kind,
    /// This host's address as others reach it (storage hosts serve exports on it).
    #[arg(long, default_value = "127.0.0.1")]
    addr: String,
    /// vCPUs offered to vNodes (compute).
    #[arg(long, default_value_t = 0)]
    vcpus: u32,
    /// Local memory offered to ExCaches (compute), e.g. 4G.
    #[arg(long, value_parser = size, default_value = "0")]
    local_mem: u64,
    /// Disk space offered to exports (storage), e.g. 100G.
    #[arg(long, value_parser = size, default_value = "0")]
    disk: u64,
    /// The vnode binary (default: next to this one).
    #[arg(long)]
    vnode: Option<PathBuf>,
    /// The cluster key (storage): vnode-blkd derives each export's credential from it.
    #[arg(long)]
    cluster_key_file: Option<PathBuf>,
    /// The vnode-blkd binary (default: next to this one).
    #[arg(long)]
    blkd: Option<PathBuf>,
}

fn size(s: &str) -> Result<u64, String> {
    vnode_common::size::parse_size(s).map_err(|e| e.to_string())
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `vnode-agent monitor --dir D -- PROGRAM ARGS...`
fn monitor_main(args: &[String]) -> Result<()> {
    let (dir, rest) = match args {
        [flag, dir, sep, rest @ ..] if flag == "--dir" && sep == "--" && !rest.is_empty() => {
            (PathBuf::from(dir), rest)
        }
        _ => bail!("usage: vnode-agent monitor --dir DIR -- PROGRAM ARGS..."),
    };
    monitor::run(&dir, &PathBuf::from(&rest[0]), &rest[1..])?;
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VNODE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("monitor") {
        return monitor_main(&argv[2..]);
    }
    let a = Args::parse();
    std::fs::create_dir_all(&a.state_dir)
        .with_context(|| format!("cannot create {}", a.state_dir.display()))?;
    let (kind, capacity, role) = match a.role {
        Kind::Compute => {
            if a.vcpus == 0 || a.local_mem == 0 {
                bail!("a compute agent needs --vcpus and --local-mem");
            }
            let c = Compute::open(&a.state_dir, a.vnode.unwrap_or_else(|| sibling("vnode")))?;
            let cap = Capacity {
                vcpus: a.vcpus,
                local_mem: Size(a.local_mem),
                ..Default::default()
            };
            (HostKind::Compute, cap, Role::Compute(c))
        }
        Kind::Storage => {
            if a.disk == 0 {
                bail!("a storage agent needs --disk");
            }
            let blkd = a.blkd.unwrap_or_else(|| sibling("vnode-blkd"));
            let key = a
                .cluster_key_file
                .context("a storage agent needs --cluster-key-file (vnode-blkd checks each export's credential)")?;
            let s = Storage::open(&a.state_dir, blkd, key, a.addr.clone())?;
            let cap = Capacity {
                disk: Size(a.disk),
                ..Default::default()
            };
            (HostKind::Storage, cap, Role::Storage(s))
        }
    };
    let reg = RegisterHost {
        kind,
        addr: a.addr.clone(),
        capacity,
    };
    tracing::info!(host = %a.host_id, %kind, manager = %a.manager, "vnode-agent starting");
    println!("agent {} running", a.host_id);
    agent::run(Beater::new(Client::new(&a.manager), a.host_id, reg), role)
}
