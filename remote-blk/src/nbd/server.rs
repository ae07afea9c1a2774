//! The `vnode-blkd` NBD server over raw-file exports: the accept loop and shared types here,
//! `handshake.rs` (options, access control), `transmission.rs` (requests and replies),
//! `affinity.rs` (following the client's CPU).
//!
//! # Threading
//!
//! One thread per connection owns its socket. In the default [`Threading::Inline`] model that
//! thread reads a request, does the `pread`/`pwrite` itself and appends the reply to an output
//! buffer, which it sends only when no further request is already buffered: a client with 32
//! requests in flight gets them handled with one `read` and answered with one `write`, and no
//! request ever crosses to another thread. On this 2-core host a cross-core wake-up costs ~40 us,
//! several times a 4 KiB page-cache read, so the inline model wins (see `bench/RESULTS.md`).
//! [`Threading::Pool`] (a reader per connection handing requests to N workers that write their
//! own replies, nbdkit's model) is kept for measurement and for slow backends where overlapping
//! I/O matters more than wake-ups (O_DIRECT on a real disk).

use std::io::{self, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;
use vnode_common::metrics::LatencyHistogram;
use vnode_common::secret::Secret;

use super::protocol::*;
use super::Stream;
use crate::backend::FileBackend;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("socket i/o")]
    Io(#[from] io::Error),
    #[error("malformed message from client")]
    Protocol(#[from] ProtocolError),
    #[error("client sent unsupported flags {0:#x}")]
    ClientFlags(u32),
    #[error("option of {0} bytes is too large")]
    OptionTooLarge(u32),
}

/// One export: a name and its file. On a server with a cluster key, clients must prove the
/// export's credential to use it, unless it is `public`.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub backend: FileBackend,
    pub public: bool,
    pub read_only: bool,
}

/// How a connection's requests are served (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threading {
    Inline,
    Pool(usize),
}

/// How the server runs its connections.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub threading: Threading,
    /// Pin an inline connection thread to its client's CPU while the client is latency-bound
    /// (see `affinity.rs`).
    pub follow_client_cpu: bool,
    /// Inline mode: reads of at least this many bytes are sent with sendfile, saving the
    /// server's copy through a user buffer (+15% at 1 MiB QD8 when the thread is not pinned to
    /// the client's core, bench/RESULTS.md).
    pub sendfile_min: Option<u32>,
    /// Inline mode: send the replies gathered so far once they reach this many bytes, even if
    /// more requests are already buffered (the client can start on them sooner).
    pub reply_batch: usize,
    /// The cluster key export credentials derive from; `None` serves every export to anyone
    /// (`--insecure`).
    pub cluster_key: Option<Secret>,
    /// Connections served at once; more are closed at accept, before a thread is started.
    pub max_connections: usize,
    /// The whole option haggling must be done within this long.
    pub handshake_timeout: Duration,
    /// A connection in transmission that sends nothing for this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            threading: Threading::Inline,
            follow_client_cpu: true,
            sendfile_min: Some(256 << 10),
            reply_batch: 1 << 20,
            cluster_key: None,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
        }
    }
}

/// Server-wide counters of what clients did; logged (debug) when a connection ends and exposed
/// by `--metrics-listen` (`crate::metrics`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted, and those open now.
    pub connections: AtomicU64,
    pub open_connections: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Failed `OPT_VNODE_AUTH` proofs.
    pub auth_failures: AtomicU64,
    /// Connections closed at accept because `max_connections` were open.
    pub busy_refused: AtomicU64,
    /// Service time of each request by command, from its decoding to its reply being queued
    /// (a sendfile read: sent).
    pub latency: OpLatency,
}

/// A latency histogram per NBD command.
#[derive(Debug, Default)]
pub struct OpLatency {
    pub read: LatencyHistogram,
    pub write: LatencyHistogram,
    pub flush: LatencyHistogram,
    pub trim: LatencyHistogram,
    pub write_zeroes: LatencyHistogram,
    pub other: LatencyHistogram,
}

impl OpLatency {
    pub fn of(&self, kind: u16) -> &LatencyHistogram {
        match kind {
            CMD_READ => &self.read,
            CMD_WRITE => &self.write,
            CMD_FLUSH => &self.flush,
            CMD_TRIM => &self.trim,
            CMD_WRITE_ZEROES => &self.write_zeroes,
            _ => &self.other,
        }
    }
}

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

/// The exports and policy shared by all connections.
#[derive(Debug)]
pub struct Server {
    exports: Vec<Export>,
    threading: Threading,
    follow_client: bool,
    sendfile_min: Option<u32>,
    reply_batch: usize,
    cluster_key: Option<Secret>,
    max_connections: usize,
    handshake_timeout: Duration,
    idle_timeout: Option<Duration>,
    /// Connections being served now.
    live: AtomicUsize,
    stats: Stats,
}

impl Server {
    pub fn new(exports: Vec<Export>, opts: ServerOptions) -> Arc<Self> {
        Arc::new(Self {
            exports,
            threading: opts.threading,
            follow_client: opts.follow_client_cpu,
            sendfile_min: opts.sendfile_min,
            reply_batch: opts.reply_batch,
            cluster_key: opts.cluster_key,
            max_connections: opts.max_connections,
            handshake_timeout: opts.handshake_timeout,
            idle_timeout: opts.idle_timeout,
            live: AtomicUsize::new(0),
            stats: Stats::default(),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Accepts connections forever, one named thread each.
    pub fn serve(self: &Arc<Self>, listener: &Listener) -> Result<(), ServerError> {
        let mut accept_failures = 0u64;
        loop {
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
                    Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS)
                    | Some(libc::ENOMEM) => {
                        // Out of resources: keep serving the connections we have, back off a
                        // little instead of spinning, and log once per 1000 failures.
                        if accept_failures.is_multiple_of(1000) {
                            tracing::warn!(error = %e, failures = accept_failures + 1, "accept failed");
                        }
                        accept_failures += 1;
                        thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                    _ => return Err(e.into()),
                },
            };
            let id = self.stats.connections.fetch_add(1, Ordering::Relaxed);
            // Counted before any thread exists, so the limit bounds threads.
            if self.live.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
                self.live.fetch_sub(1, Ordering::AcqRel);
                let n = self.stats.busy_refused.fetch_add(1, Ordering::Relaxed);
                if n.is_multiple_of(1000) {
                    tracing::warn!(
                        limit = self.max_connections,
                        refused = n + 1,
                        "too many connections; closing new ones"
                    );
                }
                continue;
            }
            self.stats.open_connections.fetch_add(1, Ordering::Relaxed);
            let server = Arc::clone(self);
            let spawned = thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    if let Err(e) = server.handle(stream) {
                        tracing::debug!(conn = id, error = %e, "connection ended");
                    }
                    server.live.fetch_sub(1, Ordering::AcqRel);
                    let st = &server.stats;
                    st.open_connections.fetch_sub(1, Ordering::Relaxed);
                    tracing::debug!(
                        conn = id,
                        requests = st.requests.load(Ordering::Relaxed),
                        errors = st.errors.load(Ordering::Relaxed),
                        bytes_read = st.bytes_read.load(Ordering::Relaxed),
                        bytes_written = st.bytes_written.load(Ordering::Relaxed),
                        "connection closed; server totals"
                    );
                });
            if let Err(e) = spawned {
                self.stats.open_connections.fetch_sub(1, Ordering::Relaxed);
                self.live.fetch_sub(1, Ordering::AcqRel);
                return Err(e.into());
            }
        }
    }

    fn handle(&self, stream: Stream) -> Result<(), ServerError> {
        stream.set_nodelay()?;
        let timer = stream.try_clone()?;
        let mut rd = BufReader::with_capacity(256 << 10, stream.try_clone()?);
        let mut wr = stream;
        timer.set_write_timeout(Some(self.handshake_timeout))?;
        let mut drd = DeadlineReader {
            inner: &mut rd,
            timer: &timer,
            deadline: Instant::now() + self.handshake_timeout,
        };
        let Some(session) = self.handshake(&mut drd, &mut wr)? else {
            return Ok(());
        };
        timer.set_read_timeout(self.idle_timeout)?;
        timer.set_write_timeout(None)?;
        tracing::debug!(export = %session.export.name, structured = session.structured, "transmission");
        match self.threading {
            Threading::Inline => self.serve_inline(&session, rd, wr),
            Threading::Pool(n) => self.serve_pool(&session, rd, wr, n),
        }
    }

    /// Runs the handshake over arbitrary streams, returning the export chosen for
    /// transmission (`None` when the client aborted). The fuzz target drives this.
    pub fn negotiate(
        &self,
        rd: &mut impl Read,
        wr: &mut impl Write,
    ) -> Result<Option<&str>, ServerError> {
        Ok(self.handshake(rd, wr)?.map(|s| s.export.name.as_str()))
    }

    fn find(&self, name: &[u8]) -> Option<&Export> {
        // The default export (empty name) is the first one.
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name.as_bytes() == name)
    }
}

/// Reads with one deadline over all reads, however slowly the peer drips its bytes (a
/// per-read timeout would let one byte every few seconds hold a thread forever).
struct DeadlineReader<'a, R> {
    inner: &'a mut R,
    timer: &'a Stream,
    deadline: Instant,
}

impl<R: Read> Read for DeadlineReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        self.timer.set_read_timeout(Some(left))?;
        self.inner.read(buf)
    }
}

/// What the handshake settled.
struct Session<'a> {
    export: &'a Export,
    structured: bool,
}

mod affinity;
mod handshake;
mod transmission;

#[cfg(test)]
pub(super) mod test_util {
    use super::Export;
    use crate::backend::FileBackend;

    pub fn export(tag: &str, public: bool, read_only: bool) -> Export {
        let p = std::env::temp_dir().join(format!("vnode-blk-srv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let backend = FileBackend::open(&p, Some(1 << 20), false).expect("backend");
        std::fs::remove_file(&p).expect("unlink; the fd stays open");
        Export {
            name: tag.into(),
            backend,
            public,
            read_only,
        }
    }
}
