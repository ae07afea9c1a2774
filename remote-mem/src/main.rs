//! `vnode-memd`: a vNode memory server (mComponent).
//!
//! Serves guest pages to VMMs over the protocol in `remote_mem::protocol`. Prints
//! `listening on ADDR` on stdout once it accepts connections (and writes ADDR to
//! `--ready-file`), so `--listen 127.0.0.1:0` works for tests.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use remote_mem::server::{Server, ServerConfig};
use remote_mem::transport::rdma;
use remote_mem::PAGE_SIZE;

const SECRET_ENV: &str = "VNODE_SECRET";

/// vNode memory server: stores the pages of remote guest RAM.
///
/// Clients must present the shared secret, read from --secret-file PATH or else from the
/// environment variable VNODE_SECRET (a trailing newline is ignored). Without either the server
/// refuses to start, unless --insecure is given, in which case any credential is accepted.
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
    /// page: files up to twice the region, sparse) and survive a restart; recovery reports torn
    /// or corrupt records. A vNode reattaches its recovered region with the Open request (by
    /// its id and credential). Without it, pages live in memory only.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// File holding the shared secret (else env VNODE_SECRET).
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

fn load_secret(args: &Args) -> Result<Option<Vec<u8>>> {
    let raw = match (&args.secret_file, std::env::var_os(SECRET_ENV)) {
        (Some(p), _) => std::fs::read(p).with_context(|| format!("cannot read secret file {}", p.display()))?,
        (None, Some(v)) => v.into_encoded_bytes(),
        (None, None) if args.insecure => {
            tracing::warn!("running --insecure: any client credential is accepted");
            return Ok(None);
        }
        (None, None) => bail!(
            "no secret: give --secret-file PATH or set {SECRET_ENV} (or --insecure to accept any client)"
        ),
    };
    let mut s = raw.as_slice();
    while let Some(rest) = s.strip_suffix(b"\n").or_else(|| s.strip_suffix(b"\r")) {
        s = rest;
    }
    if s.is_empty() || s.len() > remote_mem::protocol::MAX_SECRET {
        bail!(
            "the secret must be 1 to {} bytes",
            remote_mem::protocol::MAX_SECRET
        );
    }
    Ok(Some(s.to_vec()))
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
    let cfg = ServerConfig {
        capacity_pages,
        data_dir: args.data_dir.clone(),
        secret,
        sync: args.sync,
        max_connections: args.max_connections,
    };
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
