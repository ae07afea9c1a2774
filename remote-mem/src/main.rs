//! `vnode-memd`: a vNode memory server (mComponent).
//!
//! Serves guest pages to VMMs over the protocol in `remote_mem::protocol`. Prints
//! `listening on ADDR` on stdout once it accepts connections (and writes ADDR to
//! `--ready-file`), so `--listen 127.0.0.1:0` works for tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use remote_mem::server::{Server, ServerConfig};
use remote_mem::transport::rdma;
use remote_mem::PAGE_SIZE;
use vnode_common::secret::{self, Secret};

const SECRET_ENV: &str = vnode_common::CLUSTER_KEY_ENV;

/// vNode memory server: stores the pages of remote guest RAM.
///
/// The server holds the cluster key, read from --secret-file PATH or else from the environment
/// variable VNODE_SECRET (trailing line endings are ignored). Each vNode proves it holds its
/// own credential, derived from that key and its vNode id (`vnode-cred mem --vnode-id ID`),
/// and reaches only its own regions. Without a key the server refuses to start, unless
/// --insecure is given, in which case any client is accepted.
#[derive(Parser, Debug)]
#[command(name = "vnode-memd", version)]
struct Args {
    /// Address to listen on, e.g. 0.0.0.0:7000 (port 0 picks a free port).
    #[arg(long)]
    listen: String,
    /// Total memory this server hands out: bytes, or with a K/M/G/T suffix (powers of 1024).
    #[arg(long, value_parser = parse_size)]
    capacity: u64,
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
    /// Log the server's counters every this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
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

fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| format!("bad size {s:?}: {e}"))
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

fn write_ready_file(path: &Path, addr: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.transport == "rdma" {
        rdma::check_available().context("cannot use the RDMA transport")?;
    }
    let secret = load_secret(&args)?;
    let capacity_pages = args.capacity / PAGE_SIZE as u64;
    if capacity_pages == 0 {
        bail!("--capacity must be at least one page ({PAGE_SIZE} bytes)");
    }
    if usize::try_from(args.capacity).is_err() {
        bail!("--capacity exceeds the address space");
    }
    let mut cfg = ServerConfig::new(capacity_pages, secret);
    cfg.data_dir = args.data_dir.clone();
    cfg.sync = args.sync;
    cfg.max_connections = args.max_connections;
    cfg.idle_timeout = (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout));
    cfg.max_regions_per_vnode = args.max_regions_per_vnode;
    if let Some(m) = args.max_mem_per_vnode {
        cfg.max_pages_per_vnode = m / PAGE_SIZE as u64;
    }
    let server = Server::bind(&args.listen, cfg).context("cannot start the memory server")?;
    let addr = server
        .local_addr()
        .context("cannot read the bound address")?
        .to_string();
    tracing::info!(%addr, capacity_pages, data_dir = ?args.data_dir, "vnode-memd serving");
    if let Some(p) = &args.ready_file {
        write_ready_file(p, &addr)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {addr}")?;
    out.flush()?;
    drop(out);
    server.run().context("memory server stopped")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("x").is_err());
    }
}
