//! The memory server: accepts connections, authenticates them, and serves each on its own
//! thread against the shared [`store::Store`].
//!
//! Why a thread per connection rather than an async runtime: the VMM keeps one connection per
//! fault-serving thread, so connections are few and long-lived, and every request is a short
//! memcpy; a blocking thread that owns its socket answers with no hand-off between threads,
//! where a runtime adds a wake-up of a worker (about 40 us across cores on these machines,
//! more than the network round trip). `vnode-mem-bench` measures the two echo servers side
//! by side.

mod conn;
mod exposition;
pub mod log;
pub mod mapping;
pub mod metrics;
mod migrate;
pub mod pagefile;
pub mod store;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use thiserror::Error;
use vnode_common::secret::Secret;

use crate::auth::ServerKeys;
use crate::transport::tcp::TcpConn;
use metrics::{Metrics, RateLimit};
use store::{Store, StoreError};

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the page store")]
    Store(#[source] StoreError),
    #[error("accept failed")]
    Accept(#[source] std::io::Error),
    #[error("cannot start a thread")]
    Spawn(#[source] std::io::Error),
}

/// What a server needs to know.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Pages the server may hand out in total.
    pub capacity_pages: u64,
    /// The memory log's directory; `None` keeps pages in memory only.
    pub data_dir: Option<PathBuf>,
    /// The cluster key every client's credential derives from; `None` accepts any client
    /// (`--insecure`).
    pub cluster_key: Option<Secret>,
    /// msync every write before acknowledging it.
    pub sync: bool,
    /// Connections served at once; more are refused before a thread is started.
    pub max_connections: usize,
    /// The whole handshake must be done within this long.
    pub handshake_timeout: Duration,
    /// An authenticated connection that sends nothing for this long is closed (clients that
    /// wait longer send `Ping`s); `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Regions one vNode may hold on this server.
    pub max_regions_per_vnode: usize,
    /// Pages one vNode may hold on this server, over all its regions.
    pub max_pages_per_vnode: u64,
    /// Most bytes a second one outgoing migration sends (`None`: as fast as it goes).
    pub migrate_bandwidth: Option<u64>,
}

impl ServerConfig {
    /// A configuration with the defaults `vnode-memd` uses: in memory, secure with
    /// `cluster_key`, 1024 connections, a 10 s handshake, 15 min idle timeout, 64 regions and
    /// the whole capacity per vNode.
    pub fn new(capacity_pages: u64, cluster_key: Option<Secret>) -> Self {
        ServerConfig {
            capacity_pages,
            data_dir: None,
            cluster_key,
            sync: false,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(15 * 60)),
            max_regions_per_vnode: 64,
            max_pages_per_vnode: capacity_pages,
            migrate_bandwidth: None,
        }
    }
}

/// State every connection thread shares.
pub(crate) struct Shared {
    pub store: Store,
    pub cfg: ServerConfig,
    pub keys: ServerKeys,
    pub metrics: Metrics,
    /// Connections being served now.
    pub live: std::sync::atomic::AtomicUsize,
    /// Peers can make the server refuse them at will: their log lines are rate-limited.
    pub refusal_log: RateLimit,
}

/// A bound server, not yet accepting.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Opens the store (replaying the memory log) and binds `addr`.
    pub fn bind(addr: &str, cfg: ServerConfig) -> Result<Server, ServerError> {
        let limits = store::Limits {
            regions_per_vnode: cfg.max_regions_per_vnode,
            pages_per_vnode: cfg.max_pages_per_vnode,
        };
        let store = Store::open(
            cfg.capacity_pages,
            cfg.data_dir.as_deref(),
            cfg.sync,
            limits,
        )
        .map_err(ServerError::Store)?;
        let listener = TcpListener::bind(addr).map_err(|source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                store,
                keys: ServerKeys::new(cfg.cluster_key.clone()),
                cfg,
                metrics: Metrics::default(),
                live: std::sync::atomic::AtomicUsize::new(0),
                refusal_log: RateLimit::new(10),
            }),
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves one connection on the calling thread, from the handshake to its end, as the
    /// accept loop would serve a TCP one. For fuzz targets that play a client's bytes
    /// ([`crate::transport::Scripted`]) against the whole server state machine.
    pub fn serve_conn<C: crate::transport::Conn>(&self, conn: C) {
        conn::serve(conn, &self.shared);
    }

    /// A handle on the page store for the manager's registration (usage, reclamation), usable
    /// from another thread while the server runs.
    pub fn admin(&self) -> Admin {
        Admin(Arc::clone(&self.shared))
    }

    /// Logs the counters every `every` on a background thread, for the life of the process.
    pub fn log_stats_every(&self, every: std::time::Duration) -> Result<(), ServerError> {
        let shared = Arc::clone(&self.shared);
        thread::Builder::new()
            .name("memd-stats".into())
            .spawn(move || loop {
                thread::sleep(every);
                tracing::info!(
                    free_pages = shared.store.free_pages(),
                    "stats: {}",
                    shared.metrics.summary()
                );
            })
            .map_err(ServerError::Spawn)?;
        Ok(())
    }

    /// Accepts connections until stopped, each served on its own named thread.
    pub fn run(self) -> Result<(), ServerError> {
        let ids = AtomicU64::new(0);
        for stream in self.listener.incoming() {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let stream = match stream {
                Ok(s) => s,
                // The client went away between SYN and accept: nothing to serve.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
                // Out of descriptors or memory (a flood of sockets): keep serving the
                // connections we have and back off instead of dying or spinning.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    if let Some(suppressed) = self.shared.refusal_log.allow() {
                        tracing::warn!(error = %e, suppressed, "accept failed; backing off");
                    }
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(ServerError::Accept(e)),
            };
            let id = ids.fetch_add(1, Ordering::Relaxed);
            Metrics::add(&self.shared.metrics.connections, 1);
            // Counted here, before any thread exists: the limit bounds threads, not just
            // sessions. The connection thread gives the slot back when it ends.
            let live = self.shared.live.fetch_add(1, Ordering::AcqRel) + 1;
            if live > self.shared.cfg.max_connections {
                conn::refuse_busy(stream, &self.shared);
                self.shared.live.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let shared = Arc::clone(&self.shared);
            let spawned = thread::Builder::new()
                .name(format!("memd-conn-{id}"))
                .spawn(move || {
                    serve_stream(stream, &shared);
                    shared.live.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                self.shared.live.fetch_sub(1, Ordering::AcqRel);
                tracing::error!(error = %e, "cannot start a connection thread; dropping the connection");
            }
        }
        Ok(())
    }

    /// Runs the accept loop on a background thread (for benchmarks and tests in-process).
    pub fn spawn(self) -> Result<ServerHandle, ServerError> {
        let addr = self.local_addr().map_err(ServerError::Accept)?;
        let stop = Arc::clone(&self.stop);
        let thread = thread::Builder::new()
            .name("memd-accept".into())
            .spawn(move || self.run())
            .map_err(ServerError::Spawn)?;
        Ok(ServerHandle {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

fn serve_stream(stream: TcpStream, shared: &Shared) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| String::from("?"));
    match TcpConn::from_stream(stream, peer.clone()) {
        Ok(c) => conn::serve(c, shared),
        Err(e) => tracing::warn!(%peer, error = %e, "cannot set up connection"),
    }
}

/// What the manager's heartbeat needs of a running server: its usage, the vNodes holding
/// regions, and freeing the regions of vNodes that no longer exist.
#[derive(Clone)]
pub struct Admin(Arc<Shared>);

impl Admin {
    pub fn capacity_pages(&self) -> u64 {
        self.0.store.capacity_pages()
    }

    pub fn used_pages(&self) -> u64 {
        self.0.store.used_pages()
    }

    pub fn vnodes(&self) -> Vec<u64> {
        self.0.store.vnodes()
    }

    pub fn free_vnode(&self, vnode: u64) -> u64 {
        self.0.store.free_vnode(vnode)
    }
}

/// An in-process server; stops accepting when dropped (open connections run until closed).
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Result<(), ServerError>>>,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
