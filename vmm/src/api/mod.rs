//! The control API of a running vnode: HTTP/1.1 + JSON on a Unix socket (`--api-socket PATH`),
//! served by axum on its own thread (`vnode-api`, a current-thread tokio runtime; calls that
//! block, like a pause waiting for the vCPUs, run on tokio's blocking pool). The types and a
//! client are in the `vnode-api` crate; the OpenAPI document is generated from `routes.rs`.
//!
//! The socket: a file left by a dead vnode is replaced; a live one (something answers a connect)
//! is refused with an error; the file is removed when the server stops.

mod metrics;
mod routes;

pub use routes::openapi_json;

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::vm::RunningVm;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {0} is in use by a running process")]
    InUse(PathBuf),
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot listen on API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    BindTcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread")]
    Spawn(#[source] std::io::Error),
}

/// Where the API listens.
enum Listener {
    Unix(UnixListener),
    Tcp(std::net::TcpListener),
}

/// The API server's thread; [`ApiServer::stop`] ends it and removes the socket.
pub struct ApiServer {
    thread: Option<JoinHandle<()>>,
    shutdown: Option<oneshot::Sender<()>>,
    socket: Option<PathBuf>,
}

/// Binds `path`, replacing a stale socket file (nothing listening) and refusing a live one.
fn bind_socket(path: &Path) -> Result<UnixListener, ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(ApiError::NotASocket(path.to_owned())),
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_owned()));
            }
            tracing::info!(socket = %path.display(), "replacing a stale API socket");
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_owned(),
        source,
    })
}

impl ApiServer {
    /// Serves `vm`'s API on the Unix socket `path`, and also on `tcp` (an address such as
    /// `127.0.0.1:0`, for API fuzzers that speak only TCP; tests only) if given. Returns once
    /// listening.
    pub fn start(
        path: Option<&Path>,
        tcp: Option<&str>,
        vm: Arc<RunningVm>,
    ) -> Result<Self, ApiError> {
        let mut listeners = Vec::new();
        if let Some(path) = path {
            listeners.push(Listener::Unix(bind_socket(path)?));
        }
        if let Some(addr) = tcp {
            let l = std::net::TcpListener::bind(addr).map_err(|source| ApiError::BindTcp {
                addr: addr.to_owned(),
                source,
            })?;
            if let Ok(a) = l.local_addr() {
                tracing::warn!("API also listening on tcp {a} (for tests only: no access control)");
                eprintln!("vnode: API listening on tcp {a}");
            }
            listeners.push(Listener::Tcp(l));
        }
        let (tx, rx) = oneshot::channel();
        let app = routes::router(vm);
        let thread = std::thread::Builder::new()
            .name("vnode-api".into())
            .spawn(move || serve(listeners, app, rx))
            .map_err(ApiError::Spawn)?;
        Ok(Self {
            thread: Some(thread),
            shutdown: Some(tx),
            socket: path.map(Path::to_owned),
        })
    }

    /// Stops serving (requests under way get up to `grace` to finish) and removes the socket.
    pub fn stop(mut self, grace: Duration) {
        self.stop_inner(grace);
    }

    fn stop_inner(&mut self, grace: Duration) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + grace;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        if let Some(p) = self.socket.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_inner(Duration::from_millis(500));
    }
}

fn serve(listeners: Vec<Listener>, app: axum::Router, stop: oneshot::Receiver<()>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("vnode-api-blocking")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the API runtime: {e}");
            return;
        }
    };
    // Once its runtime is built (which opens a socketpair for tokio's signal driver): tokio's
    // blocking-pool threads, started from this one later, inherit its filter.
    crate::sandbox::enter_thread(crate::sandbox::ThreadKind::Api);
    rt.block_on(async move {
        let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        let mut tasks = Vec::new();
        for l in listeners {
            let app = app.clone();
            let mut stop_rx = stop_tx.subscribe();
            let shutdown = async move {
                let _ = stop_rx.recv().await;
            };
            tasks.push(tokio::spawn(async move {
                let r = match l {
                    Listener::Unix(l) => match to_tokio_unix(l) {
                        Ok(l) => axum::serve(l, app).with_graceful_shutdown(shutdown).await,
                        Err(e) => Err(e),
                    },
                    Listener::Tcp(l) => match to_tokio_tcp(l) {
                        Ok(l) => axum::serve(l, app).with_graceful_shutdown(shutdown).await,
                        Err(e) => Err(e),
                    },
                };
                if let Err(e) = r {
                    tracing::error!("API server: {e}");
                }
            }));
        }
        let _ = stop.await;
        let _ = stop_tx.send(());
        for t in tasks {
            let _ = t.await;
        }
    });
}

fn to_tokio_unix(l: UnixListener) -> std::io::Result<tokio::net::UnixListener> {
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

fn to_tokio_tcp(l: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}
