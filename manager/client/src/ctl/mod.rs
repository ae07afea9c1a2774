//! `vnodectl`'s cluster verbs: `up`, `down` ([`up`]), and `create`, `list`, `show`, `stats`,
//! `delete`, `hosts` over the manager's REST API. Tables for people (comfy-table), `-o json` for
//! scripts. The `vnodectl` binary (in `vmm/`) flattens [`ClusterCmd`] into its subcommands.

pub mod table;
pub mod up;

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::types::{ClusterStats, CreateVnode, HostView, Size, VnodeView};
use crate::{Client, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error(transparent)]
    Manager(#[from] ClientError),
    #[error("no manager given: use --manager URL, VNODE_MANAGER, or --dir of a cluster started by `vnodectl up`")]
    NoManager,
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Up(#[from] up::UpError),
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Tables for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

/// Where the manager is: common to every cluster verb.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The manager's URL (several, comma-separated, for managers sharing etcd).
    #[arg(long, env = "VNODE_MANAGER", global = true)]
    pub manager: Option<String>,
    /// A cluster directory from `vnodectl up --dir` (its manager's URL is read from there).
    #[arg(long, global = true)]
    pub dir: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

impl Target {
    pub fn client(&self) -> Result<Client, CtlError> {
        if let Some(m) = &self.manager {
            return Ok(Client::new(m));
        }
        let dir = self.dir.as_ref().ok_or(CtlError::NoManager)?;
        let url =
            std::fs::read_to_string(dir.join("manager.url")).map_err(|_| CtlError::NoManager)?;
        Ok(Client::new(url.trim()))
    }
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Start a whole cluster on this machine: a manager, a compute agent, two memory servers
    /// and two storage servers, data under --dir (with --hosts N, each host in its own network
    /// namespace on a bridge).
    Up(up::UpArgs),
    /// Stop the cluster started by `vnodectl up --dir DIR`: every process, its namespaces.
    Down(up::DownArgs),
    /// Create a vNode: the manager places it and a compute agent starts it.
    Create(CreateArgs),
    /// List the vNodes with their placement.
    List(Target),
    /// Show one vNode (by id or name).
    Show(ShowArgs),
    /// Every vNode's ExCache figures and every server's usage.
    Stats(Target),
    /// Delete a vNode: it is stopped, its memory regions and disk freed.
    Delete(ShowArgs),
    /// The hosts: capacity, allocation, usage, up or down.
    Hosts(Target),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    pub target: Target,
    /// A unique name (default vnode-ID).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest RAM (on memory servers), e.g. 512M.
    #[arg(long, default_value = "512M")]
    pub mem: String,
    /// ExCache: guest RAM resident on the compute host (default: all of --mem).
    #[arg(long)]
    pub local_mem: Option<String>,
    /// A disk of this size on a storage server (none by default).
    #[arg(long)]
    pub disk_size: Option<String>,
    /// The guest kernel (a path on the compute host).
    #[arg(long)]
    pub kernel: PathBuf,
    #[arg(long, default_value = "")]
    pub cmdline: String,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    pub target: Target,
    /// vNode id or name.
    pub vnode: String,
}

fn size(s: &str, what: &str) -> Result<Size, CtlError> {
    vnode_common::size::parse_size(s)
        .map(Size)
        .map_err(|e| CtlError::Bad(format!("--{what}: {e}")))
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("API types serialize")
    );
}

/// Runs one cluster verb.
pub fn run(cmd: ClusterCmd) -> Result<(), CtlError> {
    match cmd {
        ClusterCmd::Up(a) => up::up(&a).map_err(Into::into),
        ClusterCmd::Down(a) => up::down(&a).map_err(Into::into),
        ClusterCmd::Create(a) => create(a),
        ClusterCmd::List(t) => {
            let v: Vec<VnodeView> = t.client()?.get("/vnodes")?;
            match t.output {
                Output::Json => print_json(&v),
                Output::Table => println!("{}", table::vnodes(&v)),
            }
            Ok(())
        }
        ClusterCmd::Show(a) => {
            let v: VnodeView = a.target.client()?.get(&format!("/vnodes/{}", a.vnode))?;
            match a.target.output {
                Output::Json => print_json(&v),
                Output::Table => println!("{}", table::vnode(&v)),
            }
            Ok(())
        }
        ClusterCmd::Stats(t) => {
            let s: ClusterStats = t.client()?.get("/stats")?;
            match t.output {
                Output::Json => print_json(&s),
                Output::Table => println!(
                    "{}\n\n{}",
                    table::excache(&s.vnodes),
                    table::hosts(&s.hosts)
                ),
            }
            Ok(())
        }
        ClusterCmd::Delete(a) => {
            let v: VnodeView = a.target.client()?.delete(&format!("/vnodes/{}", a.vnode))?;
            match a.target.output {
                Output::Json => print_json(&v),
                Output::Table => println!("deleted vNode {} ({})", v.id, v.name),
            }
            Ok(())
        }
        ClusterCmd::Hosts(t) => {
            let h: Vec<HostView> = t.client()?.get("/hosts")?;
            match t.output {
                Output::Json => print_json(&h),
                Output::Table => println!("{}", table::hosts(&h)),
            }
            Ok(())
        }
    }
}

fn create(a: CreateArgs) -> Result<(), CtlError> {
    let mem = size(&a.mem, "mem")?;
    let spec = CreateVnode {
        name: a.name,
        vcpus: a.vcpus,
        mem,
        local_mem: match &a.local_mem {
            Some(s) => size(s, "local-mem")?,
            None => mem,
        },
        disk_size: match &a.disk_size {
            Some(s) => size(s, "disk-size")?,
            None => Size(0),
        },
        kernel: std::path::absolute(&a.kernel)
            .unwrap_or(a.kernel)
            .display()
            .to_string(),
        cmdline: a.cmdline,
    };
    let v: VnodeView = a.target.client()?.post("/vnodes", &spec)?;
    match a.target.output {
        Output::Json => print_json(&v),
        Output::Table => println!("{}", table::vnode(&v)),
    }
    Ok(())
}
