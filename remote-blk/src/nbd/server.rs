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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use thiserror::Error;
use vnode_common::metrics::LatencyHistogram;

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

/// One export: a name, its file and an optional secret.
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub backend: FileBackend,
    pub secret: Option<Vec<u8>>,
    pub read_only: bool,
}

/// How a connection's requests are served (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threading {
    Inline,
    Pool(usize),
}

/// How the server runs its connections.
#[derive(Debug, Clone, Copy)]
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
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            threading: Threading::Inline,
            follow_client_cpu: true,
            sendfile_min: Some(256 << 10),
            reply_batch: 1 << 20,
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
            self.stats.open_connections.fetch_add(1, Ordering::Relaxed);
            let server = Arc::clone(self);
            let spawned = thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    if let Err(e) = server.handle(stream) {
                        tracing::debug!(conn = id, error = %e, "connection ended");
                    }
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
                return Err(e.into());
            }
        }
    }

    fn handle(&self, stream: Stream) -> Result<(), ServerError> {
        stream.set_nodelay()?;
        let mut rd = BufReader::with_capacity(256 << 10, stream.try_clone()?);
        let mut wr = stream;
        let Some(session) = self.handshake(&mut rd, &mut wr)? else {
            return Ok(());
        };
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

    pub fn export(tag: &str, secret: Option<&[u8]>, read_only: bool) -> Export {
        let p = std::env::temp_dir().join(format!("vnode-blk-srv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let backend = FileBackend::open(&p, Some(1 << 20), false).expect("backend");
        std::fs::remove_file(&p).expect("unlink; the fd stays open");
        Export {
            name: tag.into(),
            backend,
            secret: secret.map(<[u8]>::to_vec),
            read_only,
        }
    }
}
