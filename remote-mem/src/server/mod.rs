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
pub mod store;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use thiserror::Error;

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
    /// The shared secret clients must present; `None` accepts any (`--insecure`).
    pub secret: Option<Vec<u8>>,
    /// msync every write before acknowledging it.
    pub sync: bool,
    /// Connections served at once; more are refused (each costs a thread).
    pub max_connections: usize,
}

/// State every connection thread shares.
pub(crate) struct Shared {
    pub store: Store,
    pub cfg: ServerConfig,
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
        let store = Store::open(cfg.capacity_pages, cfg.data_dir.as_deref(), cfg.sync)
            .map_err(ServerError::Store)?;
        let listener = TcpListener::bind(addr).map_err(|source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                store,
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
                Err(e) => return Err(ServerError::Accept(e)),
            };
            let id = ids.fetch_add(1, Ordering::Relaxed);
            Metrics::add(&self.shared.metrics.connections, 1);
            let shared = Arc::clone(&self.shared);
            let spawned = thread::Builder::new()
                .name(format!("memd-conn-{id}"))
                .spawn(move || serve_stream(stream, &shared));
            if let Err(e) = spawned {
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
    let live = shared.live.fetch_add(1, Ordering::AcqRel) + 1;
    match TcpConn::from_stream(stream, peer.clone()) {
        Ok(c) if live > shared.cfg.max_connections => conn::refuse_busy(c, shared),
        Ok(c) => conn::serve(c, shared),
        Err(e) => tracing::warn!(%peer, error = %e, "cannot set up connection"),
    }
    shared.live.fetch_sub(1, Ordering::AcqRel);
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
