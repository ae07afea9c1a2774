//! A blocking client for one vnode's API socket.
//!
//! HTTP/1.1 over the Unix socket with hyper (the same stack as the server, axum, so no second HTTP
//! implementation is linked), driven by a current-thread tokio runtime owned by the client: the
//! callers (the compute agent's supervision loop, `vnodectl`, tests) are plain threads. ureq was
//! the other candidate; its 2.x line has no Unix-socket transport and its 3.x one needs a
//! hand-written connector, which is more code than hyper's `client::conn` here.
//!
//! ```no_run
//! let vm = vnode_api::client::Client::new("/run/vnode/vm1.sock")?;
//! vm.pause()?;
//! println!("{}", vm.counters()?.excache.map_or(0, |e| e.faults));
//! vm.resume()?;
//! # Ok::<(), vnode_api::client::ClientError>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::{
    paths, Counters, ErrorBody, ExCacheResize, MemSpare, ShutdownRequest, SnapshotInfo,
    SnapshotRequest, VmInfo,
};

/// A call through the API failed. Each variant names the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot start the client's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot connect to vnode's API socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{socket}: {method} {path} failed")]
    Http {
        socket: PathBuf,
        method: Method,
        path: &'static str,
        #[source]
        source: hyper::Error,
    },
    #[error("{socket}: {method} {path} got no answer within {timeout:?}")]
    Timeout {
        socket: PathBuf,
        method: Method,
        path: &'static str,
        timeout: Duration,
    },
    /// vnode answered with an error status.
    #[error("{socket}: {method} {path}: HTTP {status}: {message}")]
    Status {
        socket: PathBuf,
        method: Method,
        path: &'static str,
        status: StatusCode,
        message: String,
    },
    #[error("{socket}: {method} {path}: unexpected answer")]
    Decode {
        socket: PathBuf,
        method: Method,
        path: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The HTTP status vnode answered with, if it answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The default time a call may take (a pause waits for every vCPU to leave KVM_RUN, a stop for
/// the VM to stop).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for one vnode's API socket. Each call opens a connection, so a client outlives
/// vnode restarts on the same path.
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// A client for the API socket at `path`. Connects on the first call, not here.
    pub fn new(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Self {
            socket: path.as_ref().to_owned(),
            timeout: DEFAULT_TIMEOUT,
            rt,
        })
    }

    /// Sets how long one call may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /vm`: state and configuration.
    pub fn info(&self) -> Result<VmInfo, ClientError> {
        self.json(Method::GET, paths::VM, None)
    }

    /// `GET /vm/counters`.
    pub fn counters(&self) -> Result<Counters, ClientError> {
        self.json(Method::GET, paths::COUNTERS, None)
    }

    /// `GET /metrics`: the Prometheus text exposition.
    pub fn metrics_text(&self) -> Result<String, ClientError> {
        let body = self.call(Method::GET, paths::METRICS, None)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// `PUT /vm/pause`: returns once every vCPU is out of KVM_RUN and devices are idle.
    pub fn pause(&self) -> Result<VmInfo, ClientError> {
        self.json(Method::PUT, paths::PAUSE, None)
    }

    /// `PUT /vm/resume`.
    pub fn resume(&self) -> Result<VmInfo, ClientError> {
        self.json(Method::PUT, paths::RESUME, None)
    }

    /// `PUT /vm/shutdown`: the ACPI power button, then a stop after `deadline` (vnode's default
    /// of 30 s if None). Returns at once; [`Client::wait_gone`] waits for vnode to exit.
    pub fn shutdown(&self, deadline: Option<Duration>) -> Result<VmInfo, ClientError> {
        let req = ShutdownRequest {
            deadline_secs: deadline.map(|d| d.as_secs_f64()),
        };
        let body = serde_json::to_vec(&req).expect("a ShutdownRequest always serializes");
        self.json(Method::PUT, paths::SHUTDOWN, Some(body))
    }

    /// `PUT /vm/stop`: returns once vCPUs and devices are stopped; vnode then exits.
    pub fn stop(&self) -> Result<VmInfo, ClientError> {
        self.json(Method::PUT, paths::STOP, None)
    }

    /// `PUT /vm/excache`: the ExCache's new capacity in bytes.
    pub fn resize_excache(&self, bytes: u64) -> Result<VmInfo, ClientError> {
        let req = ExCacheResize {
            local_mem: bytes.into(),
        };
        let body = serde_json::to_vec(&req).expect("an ExCacheResize always serializes");
        self.json(Method::PUT, paths::EXCACHE, Some(body))
    }

    /// `PUT /vm/mem/spare`: a memory server to re-make a lost replica of guest RAM on.
    pub fn add_mem_spare(&self, server: &str) -> Result<VmInfo, ClientError> {
        let req = MemSpare {
            server: server.to_string(),
        };
        let body = serde_json::to_vec(&req).expect("a MemSpare always serializes");
        self.json(Method::PUT, paths::MEM_SPARE, Some(body))
    }

    /// `PUT /vm/snapshot`: pauses the VM (if running), writes its snapshot to `path` on the
    /// vnode's host, and leaves it paused.
    pub fn snapshot(&self, path: &str) -> Result<SnapshotInfo, ClientError> {
        let req = SnapshotRequest {
            path: path.to_owned(),
        };
        let body = serde_json::to_vec(&req).expect("a SnapshotRequest always serializes");
        self.json(Method::PUT, paths::SNAPSHOT, Some(body))
    }

    /// Waits until nothing answers on the socket any more (vnode exited), up to `timeout`.
    /// True if it is gone.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Err(ClientError::Connect { .. }) = self.info() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let bytes = self.call(method.clone(), path, body)?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            socket: self.socket.clone(),
            method,
            path,
            source,
        })
    }

    /// One request on a fresh connection; an error status becomes [`ClientError::Status`].
    fn call(
        &self,
        method: Method,
        path: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let fut = self.exchange(method.clone(), path, body);
        let (status, bytes) = self
            .rt
            .block_on(async { tokio::time::timeout(self.timeout, fut).await })
            .map_err(|_| ClientError::Timeout {
                socket: self.socket.clone(),
                method: method.clone(),
                path,
                timeout: self.timeout,
            })??;
        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(ClientError::Status {
            socket: self.socket.clone(),
            method,
            path,
            status,
            message,
        })
    }

    async fn exchange(
        &self,
        method: Method,
        path: &'static str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let http = |source| ClientError::Http {
            socket: self.socket.clone(),
            method: method.clone(),
            path,
            source,
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // The connection task ends when the request is answered and the sender dropped.
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, "vnode");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a request from constant parts is valid");
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
        Ok((status, bytes))
    }
}
