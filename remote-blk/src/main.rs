//! `vnode-blkd`: serves raw files as NBD exports.
//!
//! ```text
//! vnode-blkd --listen 127.0.0.1:10809 --export disk=/var/lib/vnode/disk.img:8G
//! vnode-blkd --socket /run/blk.sock --export a=a.img --export b=b.img:1G --public a \
//!            --secret-file /etc/vnode/cluster.key
//! ```
//! Secure by default: the cluster key comes from `--secret-file` or `$VNODE_SECRET`, and each
//! export needs its credential (`vnode-cred blk --export NAME`) proven by vNode's challenge-
//! response option, unless `--public NAME`. Without a key it refuses to start unless
//! `--insecure` (every export open to anyone, as plain NBD servers are).
//! Once listening it prints `listening on ADDR` on stdout (and writes ADDR to `--ready-file`),
//! so scripts and tests can bind port 0 and wait for that line instead of sleeping. Every option
//! is checked before any file is created or any port bound (the CLI contract: `vnode_common::cli`).

use std::collections::HashSet;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use remote_blk::backend::FileBackend;
use remote_blk::metrics::ExportFile;
use remote_blk::nbd::server::{Export, Listener, Server, ServerOptions, Threading};
use vnode_common::cli::{self, Exit, ExitTable, Failure, Program, ResultExt};
use vnode_common::{metrics, ready};

#[derive(Debug, Parser)]
#[command(
    name = "vnode-blkd",
    about = "NBD storage server for vNode",
    group = clap::ArgGroup::new("address").required(true).args(["listen", "socket"])
)]
struct Args {
    /// TCP address to listen on (port 0 picks a free one).
    #[arg(long, conflicts_with = "socket")]
    listen: Option<String>,
    /// Unix socket path to listen on.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// NAME=FILE[:SIZE]: export FILE as NAME, creating it with SIZE bytes (K/M/G/T suffixes)
    /// when it does not exist. The first export is also the default (empty name) export.
    #[arg(long = "export", required = true)]
    exports: Vec<String>,
    /// File holding the cluster key export credentials derive from (else $VNODE_SECRET).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Serve without a cluster key: every export open to any NBD client. For experiments.
    #[arg(long)]
    insecure: bool,
    /// NAME: export NAME needs no credential (qemu-img, nbdinfo and other plain NBD clients
    /// can use it). Repeatable.
    #[arg(long = "public")]
    public: Vec<String>,
    /// Most connections served at once (each is a thread); more are closed at accept.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Close a connection in transmission that sends nothing for this many seconds (0: never;
    /// NBD has no keep-alive, so an idle guest's disk would be cut).
    #[arg(long, default_value_t = 0)]
    idle_timeout: u64,
    /// Export every file read-only.
    #[arg(long)]
    read_only: bool,
    /// Open the files with O_DIRECT (requests must then be 512-byte aligned).
    #[arg(long)]
    direct: bool,
    /// Threading model: `inline` (a thread per connection does all its I/O) or `pool:N`.
    #[arg(long, default_value = "inline")]
    threads: String,
    /// Pin a loopback connection's thread to its client's CPU while the client waits for each
    /// reply before sending more (`on`/`off`).
    #[arg(long, default_value = "on")]
    follow_client_cpu: String,
    /// Send reads of at least this many bytes with sendfile (0 = never).
    #[arg(long, default_value = "256K")]
    sendfile_min: String,
    /// Send gathered replies once they reach this size even if more requests are waiting.
    #[arg(long, default_value = "1M")]
    reply_batch: String,
    /// Write the bound address here once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0 picks a free one; printed as
    /// `metrics on ADDR` before `listening on`).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

fn parse_size(s: &str) -> Option<u64> {
    parse_size::Config::new().with_binary().parse_size(s).ok()
}

fn parse_export(spec: &str) -> Result<(String, PathBuf, Option<u64>)> {
    let (name, rest) = spec
        .split_once('=')
        .with_context(|| format!("--export {spec:?}: expected NAME=FILE[:SIZE]"))?;
    let (file, size) = match rest.rsplit_once(':') {
        Some((f, sz)) => match parse_size(sz) {
            Some(n) => (f, Some(n)),
            None => bail!("--export {spec:?}: bad size {sz:?}"),
        },
        None => (rest, None),
    };
    Ok((name.to_owned(), PathBuf::from(file), size))
}

fn parse_threads(s: &str) -> Result<Threading> {
    if s == "inline" {
        return Ok(Threading::Inline);
    }
    match s.strip_prefix("pool:").map(str::parse::<usize>) {
        Some(Ok(n)) if n > 0 => Ok(Threading::Pool(n)),
        _ => bail!("--threads {s:?}: expected inline or pool:N"),
    }
}

/// Everything the command line asks for, checked before any side effect.
struct Plan {
    exports: Vec<(String, PathBuf, Option<u64>)>,
    public: HashSet<String>,
    opts: ServerOptions,
}

fn plan(args: &Args) -> Result<Plan> {
    let exports = args
        .exports
        .iter()
        .map(|spec| parse_export(spec))
        .collect::<Result<Vec<_>>>()?;
    let public: HashSet<String> = args.public.iter().cloned().collect();
    if let Some(name) = public.iter().find(|n| !exports.iter().any(|e| &e.0 == *n)) {
        bail!("--public for unknown export {name:?}");
    }
    let cluster_key =
        vnode_common::secret::load(args.secret_file.as_deref(), vnode_common::CLUSTER_KEY_ENV)?;
    let cluster_key = match (cluster_key, args.insecure) {
        (Some(k), false) => Some(k),
        (_, true) => {
            tracing::warn!("running --insecure: every export is open to any NBD client");
            None
        }
        (None, false) => bail!(
            "no secret: give --secret-file PATH or set {} (or --insecure to serve every export to anyone)",
            vnode_common::CLUSTER_KEY_ENV
        ),
    };
    let follow = match args.follow_client_cpu.as_str() {
        "on" => true,
        "off" => false,
        other => bail!("--follow-client-cpu {other:?}: expected on or off"),
    };
    let opts = ServerOptions {
        cluster_key,
        max_connections: args.max_connections,
        idle_timeout: (args.idle_timeout > 0)
            .then(|| std::time::Duration::from_secs(args.idle_timeout)),
        threading: parse_threads(&args.threads)?,
        follow_client_cpu: follow,
        sendfile_min: match parse_size(&args.sendfile_min) {
            Some(0) => None,
            Some(n) => Some(u32::try_from(n).context("--sendfile-min too large")?),
            None => bail!("--sendfile-min {:?}: expected a size", args.sendfile_min),
        },
        reply_batch: parse_size(&args.reply_batch)
            .and_then(|n| usize::try_from(n).ok())
            .with_context(|| format!("--reply-batch {:?}: expected a size", args.reply_batch))?,
        ..ServerOptions::default()
    };
    Ok(Plan {
        exports,
        public,
        opts,
    })
}

fn bind(args: &Args) -> Result<(Listener, String)> {
    match (&args.listen, &args.socket) {
        (Some(a), _) => {
            let l = TcpListener::bind(a).with_context(|| format!("listen on {a}"))?;
            let addr = l.local_addr()?.to_string();
            Ok((Listener::Tcp(l), addr))
        }
        (None, Some(p)) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).with_context(|| format!("listen on {}", p.display()))?;
            Ok((Listener::Unix(l), p.display().to_string()))
        }
        (None, None) => bail!("give --listen ADDR or --socket PATH"),
    }
}

fn run(args: Args) -> Result<Exit, Failure> {
    let Plan {
        exports: specs,
        public,
        opts,
    } = plan(&args).usage()?;
    // Bind before creating any export file: a port in use leaves nothing behind.
    let (listener, addr) = bind(&args)?;
    let mut exports = Vec::new();
    let mut files = Vec::new();
    for (name, path, size) in specs {
        let backend = FileBackend::open(&path, size, args.direct)
            .with_context(|| format!("export {name}"))?;
        tracing::info!(export = %name, path = %path.display(), size = backend.size(), "export");
        files.push(ExportFile {
            name: name.clone(),
            path,
        });
        exports.push(Export {
            public: public.contains(&name),
            name,
            backend,
            read_only: args.read_only,
        });
    }
    let server = Server::new(exports, opts);
    if let Some(m) = &args.metrics_listen {
        let registry = Arc::new(remote_blk::metrics::registry(&server, files));
        let srv = metrics::serve(m, registry)?;
        ready::announce_metrics(&srv.local_addr().to_string())?;
    }
    ready::announce(&addr, args.ready_file.as_deref())?;
    tracing::info!(%addr, threads = %args.threads, "serving");
    server.serve(&listener).runtime()?;
    Ok(Exit::Success)
}

fn main() -> ExitCode {
    let program = Program {
        default_log: "info",
        exits: ExitTable::Standard,
    };
    cli::main(program, run)
}
