//! `vnode-memd`: a vNode memory server (mComponent).
//!
//! Serves guest pages to VMMs over the protocol in `remote_mem::protocol`. Prints
//! `listening on ADDR` on stdout once it accepts connections (and writes ADDR to
//! `--ready-file`), so `--listen 127.0.0.1:0` works for tests. Every option is checked before
//! anything is created (the CLI contract: `vnode_common::cli`): `--capacity` against this host's
//! memory or the data directory's free space, `--data-dir` against a missing parent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use remote_mem::server::{Server, ServerConfig};
use remote_mem::transport::rdma;
use remote_mem::PAGE_SIZE;
use vnode_common::cli::{self, Exit, ExitTable, Failure, Program, ResultExt};
use vnode_common::secret::{self, Secret};
use vnode_common::size::{format_size, parse_size};
use vnode_common::{host, metrics, ready};

const SECRET_ENV: &str = vnode_common::CLUSTER_KEY_ENV;

/// vNode memory server: stores the pages of remote guest RAM.
///
/// The server holds the cluster key, read from --secret-file PATH or else from the environment
/// variable VNODE_SECRET (trailing line endings are ignored). Each vNode proves it holds its
/// own credential, derived from that key and its vNode id (`vnode-cred mem --vnode-id ID`),
/// and reaches only its own regions. Without a key the server refuses to start, unless
/// --insecure is given, in which case any client is accepted.
#[derive(Parser, Debug)]
#[command(name = "vnode-memd", version, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on, e.g. 0.0.0.0:7000 (port 0 picks a free port).
    #[arg(long, required = true)]
    listen: Option<String>,
    /// Total memory this server hands out: bytes, or with a K/M/G/T suffix (powers of 1024).
    #[arg(long, value_parser = parse_size, required = true)]
    capacity: Option<u64>,
    /// Most bytes a second one outgoing live migration sends (K/M/G suffixes; default: no cap).
    #[arg(long, value_parser = parse_size)]
    migrate_bandwidth: Option<u64>,
    /// Directory of the memory log: region contents are kept there (two checksummed slots per
    /// page: files twice the region, reserved up front) and survive a restart; recovery reports torn
    /// or corrupt records. A vNode reattaches its recovered region with the Open request (by
    /// its id and credential). Without it, pages live in memory only.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// File holding the cluster key (else env VNODE_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Run without a secret: accept any credential. For experiments only.
    #[arg(long)]
    insecure: bool,
    /// Write the bound address to this file once listening (written atomically).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Transport: tcp, or rdma (needs the `rdma` build feature and an RDMA device).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "rdma"])]
    transport: String,
    /// Most connections served at once (each is a thread); more are refused.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Close an authenticated connection silent for this many seconds (0: never). Clients
    /// that wait longer (the VMM's fault thread) send pings.
    #[arg(long, default_value_t = 900)]
    idle_timeout: u64,
    /// Regions one vNode may hold on this server.
    #[arg(long, default_value_t = 64)]
    max_regions_per_vnode: usize,
    /// Memory one vNode may hold on this server (default: all of --capacity).
    #[arg(long, value_parser = parse_size)]
    max_mem_per_vnode: Option<u64>,
    /// Log the server's counters as one line every this many seconds (0: never).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    stats_interval: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free one; printed as
    /// `metrics on ADDR` before `listening on`).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Make every write durable (fdatasync of the memory log, once per write batch) before
    /// acknowledging it. With --sync, an acknowledged write survives a host crash; its cost
    /// is a disk flush per batch (up to 256 pages): from well under a millisecond on a quiet
    /// SSD to tens of milliseconds on a busy disk. Without it (the default), an acknowledged
    /// write survives the server's own death (kill -9) but a host crash may lose the most
    /// recent writes (the kernel writes back within about 30 s). Either way every page has a
    /// checksummed record and keeps its previous version while the next is written: a torn
    /// page is reported at recovery and never served. Needs --data-dir.
    #[arg(long, requires = "data_dir")]
    sync: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Live-migrates a vNode's region from one memory server to another, as an operator
    /// holding the cluster key (--secret-file or VNODE_SECRET): the region keeps serving the
    /// VMM while it is copied, and the VMM follows it to the new server by itself. Returns once
    /// the new server owns the region and the old one has freed it.
    Migrate {
        /// The server that holds the region now (HOST:PORT).
        #[arg(long)]
        server: String,
        /// The region, as VNODE_ID:REGION (the vNode id in hex with 0x, or decimal).
        #[arg(long, value_parser = parse_region)]
        region: (u64, u64),
        /// The server to move it to (HOST:PORT).
        #[arg(long)]
        to: String,
        /// File holding the cluster key (else env VNODE_SECRET).
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("bad number {s:?}: {e}"))
}

fn parse_region(s: &str) -> Result<(u64, u64), String> {
    let (v, r) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not VNODE_ID:REGION"))?;
    Ok((parse_u64(v)?, parse_u64(r)?))
}

/// `vnode-memd migrate`: asks `server` to migrate the region, authenticated as a memory server
/// (role 1) with the servers' credential derived from the cluster key.
fn run_migrate(
    server: &str,
    region: (u64, u64),
    to: &str,
    secret_file: Option<&Path>,
) -> Result<()> {
    let Some(key) = secret::load(secret_file, SECRET_ENV)? else {
        bail!("no cluster key: give --secret-file PATH or set {SECRET_ENV}");
    };
    let (vnode, region) = region;
    let auth =
        remote_mem::ClientAuth::server(vnode, vnode_common::cred::mem_server_credential(&key));
    let mut c = remote_mem::MemClient::connect(server, &auth)
        .with_context(|| format!("cannot reach memory server {server}"))?;
    let t = std::time::Instant::now();
    c.migrate_region(region, to).with_context(|| {
        format!("migration of region {vnode:#x}:{region} from {server} to {to} failed")
    })?;
    println!(
        "region {vnode:#x}:{region} migrated from {server} to {to} in {:.3} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn load_secret(args: &Args) -> Result<Option<Secret>> {
    match secret::load(args.secret_file.as_deref(), SECRET_ENV)? {
        Some(s) => Ok(Some(s)),
        None if args.insecure => {
            tracing::warn!("running --insecure: any client is accepted, and clients cannot tell this server from an impostor");
            Ok(None)
        }
        None => bail!(
            "no secret: give --secret-file PATH or set {SECRET_ENV} (or --insecure to accept any client)"
        ),
    }
}

/// `--data-dir`: an existing directory, or a new one whose parent exists (only the last
/// component is ever created). Returns the directory whose file system will hold the log.
fn check_data_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("--data-dir {}: not a directory", dir.display());
        }
        return Ok(dir.to_path_buf());
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "--data-dir {}: its parent {} does not exist (only the last directory is created)",
            dir.display(),
            parent.display()
        );
    }
    Ok(parent.to_path_buf())
}

/// Bytes the memory log's region files already take in `dir` (they count as room).
fn log_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.blocks() * 512)
            .sum()
    })
}

/// `--capacity` must fit in what will hold it: the data directory's file system, else memory.
fn check_capacity(capacity: u64, data_dir: Option<&Path>) -> Result<u64> {
    let capacity_pages = capacity / PAGE_SIZE as u64;
    if capacity_pages == 0 {
        bail!("--capacity must be at least one page ({PAGE_SIZE} bytes)");
    }
    if usize::try_from(capacity).is_err() {
        bail!("--capacity exceeds the address space");
    }
    // The same room the store checks again when it opens (store.rs `check_room`), here before
    // anything is created: the memory log keeps two slots per page.
    match data_dir {
        Some(dir) => {
            let home = check_data_dir(dir)?;
            let free = host::fs_available_bytes(&home)?;
            let room = free.saturating_add(log_bytes(dir)) / 2;
            if capacity > room {
                bail!(
                    "--capacity {} is more than the data directory {} can hold ({} free there, two slots per page)",
                    format_size(capacity),
                    dir.display(),
                    format_size(free)
                );
            }
        }
        None => {
            let mem = host::mem_and_swap_bytes()?;
            if capacity > mem {
                bail!(
                    "--capacity {} is more than this host's RAM and swap ({}); give less, or a --data-dir",
                    format_size(capacity),
                    format_size(mem)
                );
            }
        }
    }
    Ok(capacity_pages)
}

/// Everything checked, nothing created yet.
fn plan(args: &Args, capacity: u64) -> Result<ServerConfig> {
    let secret = load_secret(args)?;
    let capacity_pages = check_capacity(capacity, args.data_dir.as_deref())?;
    let mut cfg = ServerConfig::new(capacity_pages, secret);
    cfg.data_dir = args.data_dir.clone();
    cfg.sync = args.sync;
    cfg.migrate_bandwidth = args.migrate_bandwidth;
    cfg.max_connections = args.max_connections;
    cfg.idle_timeout = (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout));
    cfg.max_regions_per_vnode = args.max_regions_per_vnode;
    if let Some(m) = args.max_mem_per_vnode {
        cfg.max_pages_per_vnode = m / PAGE_SIZE as u64;
    }
    Ok(cfg)
}

fn run(args: Args) -> Result<Exit, Failure> {
    if let Some(Command::Migrate {
        server,
        region,
        to,
        secret_file,
    }) = &args.command
    {
        run_migrate(server, *region, to, secret_file.as_deref()).runtime()?;
        return Ok(Exit::Success);
    }
    let (Some(listen), Some(capacity)) = (args.listen.clone(), args.capacity) else {
        return Err(Failure::usage("--listen and --capacity are required"));
    };
    if args.transport == "rdma" {
        rdma::check_available().context("cannot use the RDMA transport")?;
    }
    let cfg = plan(&args, capacity).usage()?;
    if let Some(dir) = args.data_dir.as_deref().filter(|d| !d.exists()) {
        std::fs::create_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let capacity_pages = cfg.capacity_pages;
    let server = Server::bind(&listen, cfg).context("cannot start the memory server")?;
    let addr = server
        .local_addr()
        .context("cannot read the bound address")?
        .to_string();
    tracing::info!(%addr, capacity_pages, data_dir = ?args.data_dir, "vnode-memd serving");
    if args.stats_interval > 0 {
        server.log_stats_every(Duration::from_secs(args.stats_interval))?;
    }
    if let Some(m) = &args.metrics_listen {
        let srv = metrics::serve(m, Arc::new(server.metrics_registry()))?;
        ready::announce_metrics(&srv.local_addr().to_string())?;
    }
    ready::announce(&addr, args.ready_file.as_deref())?;
    server.run().context("memory server stopped").runtime()?;
    Ok(Exit::Success)
}

fn main() -> ExitCode {
    let program = Program {
        default_log: "info",
        exits: ExitTable::Standard,
    };
    cli::main(program, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_checked_against_what_holds_it() {
        let e = check_capacity(100 << 40, None).unwrap_err().to_string();
        assert!(
            e.contains("100 TiB is more than this host's RAM and swap"),
            "{e}"
        );
        let tmp = std::env::temp_dir();
        let e = check_capacity(1 << 60, Some(&tmp)).unwrap_err().to_string();
        assert!(e.contains("can hold"), "{e}");
        assert_eq!(check_capacity(64 << 20, Some(&tmp)).unwrap(), 16384);
        assert!(check_capacity(100, None).is_err());
    }

    #[test]
    fn data_dir_needs_its_parent() {
        let e = check_data_dir(Path::new("/nonexistent/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("its parent /nonexistent does not exist"), "{e}");
        let tmp = std::env::temp_dir();
        assert_eq!(check_data_dir(&tmp.join("new-dir")).unwrap(), tmp);
    }
}
