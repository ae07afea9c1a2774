//! `vnode-manager`: the vNode manager service.
//!
//! ```text
//! vnode-manager --listen 127.0.0.1:7700 --store sqlite:/var/lib/vnode/manager.db
//! vnode-manager --listen 10.0.0.1:7700 --store etcd:http://10.0.0.5:2379 --advertise http://10.0.0.1:7700
//! ```
//! Prints `listening on ADDR` on stdout once it serves (and writes ADDR to `--ready-file`).
//! The cluster key comes from `--cluster-key-file` or `$VNODE_CLUSTER_KEY`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use vnode_manager::api::{self, App};
use vnode_manager::credentials::Keys;
use vnode_manager::registry::Registry;

#[derive(Parser)]
#[command(
    name = "vnode-manager",
    version,
    about = "The vNode manager: registry, placement, REST API"
)]
struct Args {
    /// Address to serve the REST API on (port 0 picks a free one).
    #[arg(long, required_unless_present = "print_openapi", default_value = "")]
    listen: String,
    /// Where state is kept: sqlite:PATH (one manager), or etcd:URL[,URL]... (several managers
    /// electing a leader).
    #[arg(long, required_unless_present = "print_openapi", default_value = "")]
    store: String,
    /// This manager's URL as others reach it (told to clients by followers); default
    /// http://the bound address.
    #[arg(long)]
    advertise: Option<String>,
    /// The cluster key (else $VNODE_CLUSTER_KEY): the manager derives each vNode's own
    /// credentials from it and never hands it out.
    #[arg(long)]
    cluster_key_file: Option<PathBuf>,
    /// Heartbeat interval asked of hosts, in milliseconds; a host that misses three is down.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Write the bound address here once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Print the OpenAPI document and exit.
    #[arg(long, conflicts_with_all = ["listen", "store"])]
    print_openapi: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VNODE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.print_openapi {
        use utoipa::OpenApi;
        println!("{}", api::ApiDoc::openapi().to_pretty_json()?);
        return Ok(());
    }
    let key = vnode_common::secret::load(args.cluster_key_file.as_deref(), "VNODE_CLUSTER_KEY")?
        .context("no cluster key: give --cluster-key-file PATH or set VNODE_CLUSTER_KEY")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?.to_string();
    let me = args
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let store = vnode_manager::store::open(&args.store, &me)
        .await
        .with_context(|| format!("cannot open the store {}", args.store))?;
    let reg = Registry::new(
        Duration::from_millis(args.heartbeat_ms.max(50)),
        Keys::new(key),
    );
    let app = App::new(reg, store, me.clone());
    if let Some(p) = &args.ready_file {
        std::fs::write(p, &addr).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {addr}")?;
    out.flush()?;
    drop(out);
    tracing::info!(%addr, %me, store = %args.store, "vnode-manager serving");
    axum::serve(listener, api::router(app)).await?;
    Ok(())
}
