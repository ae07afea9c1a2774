//! One connection's life: the handshake, then requests served in order (see the state machine
//! in `protocol.rs`). Buffers are per connection and reused, so a steady stream of page reads
//! and writes allocates nothing.

use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::metrics::Metrics;
use super::store::StoreError;
use super::Shared;
use crate::client::MemClient;
use crate::protocol::{
    self, ErrorCode, Header, Op, PageList, ProtocolError, Request, HEADER_LEN, PAGE_SIZE, VERSION,
};
use crate::transport::Conn;

/// Pages copied per frame when migrating a region.
const MIGRATE_CHUNK: usize = protocol::MAX_BATCH;
/// Longest a migration waits on the target for any one step.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(30);

struct ConnState<'a, C: Conn> {
    conn: C,
    shared: &'a Shared,
    body: Vec<u8>,
    out: Vec<u8>,
}

/// What to do after a reply is sent.
enum Next {
    Continue,
    Close,
}

pub(super) fn serve<C: Conn>(conn: C, shared: &Shared) {
    let peer = conn.peer().to_string();
    let mut st = ConnState {
        conn,
        shared,
        body: Vec::with_capacity(64 * 1024),
        out: Vec::with_capacity(HEADER_LEN + 64 * 1024),
    };
    tracing::debug!(%peer, "connection opened");
    let deadline = Instant::now() + shared.cfg.handshake_timeout;
    let r = st.handshake(deadline).and_then(|vnode| match vnode {
        Some(v) => st.run(v),
        None => Ok(()),
    });
    match r {
        Ok(()) => tracing::debug!(%peer, "connection closed"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!(%peer, "connection closed")
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Metrics::add(&shared.metrics.timeouts, 1);
            tracing::debug!(%peer, "connection timed out (handshake deadline or idle timeout)")
        }
        Err(e) => tracing::info!(%peer, error = %e, "connection ended"),
    }
}

/// Refuses a connection over the limit on the accept thread: one small `Error` frame (it fits
/// the socket buffer, so the write does not wait on the peer), then close.
pub(super) fn refuse_busy(stream: TcpStream, shared: &Shared) {
    use std::io::Write;
    Metrics::add(&shared.metrics.busy_refused, 1);
    if let Some(suppressed) = shared.refusal_log.allow() {
        tracing::warn!(
            peer = ?stream.peer_addr().ok(),
            limit = shared.cfg.max_connections,
            suppressed,
            "too many connections; refusing"
        );
    }
    let mut out = Vec::new();
    let msg = format!("server busy: {} connections", shared.cfg.max_connections);
    protocol::encode_error(&mut out, 0, ErrorCode::Busy, &msg);
    let mut stream = stream;
    let _ = stream.set_nonblocking(true);
    let _ = stream.write(&out);
}

impl<C: Conn> ConnState<'_, C> {
    /// Challenge, hello, hello-ok, all by `deadline`. Returns the authenticated vNode id, or
    /// `None` when the client was refused.
    fn handshake(&mut self, deadline: Instant) -> io::Result<Option<u64>> {
        let nonce = vnode_common::cred::nonce().map_err(io::Error::other)?;
        self.out.clear();
        protocol::encode_challenge(&mut self.out, &nonce);
        self.conn
            .set_timeout(Some(self.shared.cfg.handshake_timeout))?;
        self.conn.send(&mut [IoSlice::new(&self.out)])?;
        let mut hb = [0u8; HEADER_LEN];
        self.conn.recv_exact_by(&mut hb, deadline)?;
        let tag = u64::from_le_bytes(hb[8..16].try_into().expect("8 bytes"));
        let h = match Header::decode(&hb) {
            Ok(h) if h.op == Op::Hello => h,
            // Refused before its body is read: no unauthenticated peer makes us buffer a
            // megabyte.
            Ok(_) => return self.refuse(tag, ErrorCode::Auth, "hello required first"),
            Err(ProtocolError::BadVersion(v)) => {
                let msg = format!(
                    "protocol version {v} is not spoken here: this server speaks version \
                     {VERSION} (upgrade the client)"
                );
                return self.refuse(tag, ErrorCode::Version, &msg);
            }
            Err(e) => return self.refuse(tag, e.code(), &e.to_string()),
        };
        self.body.resize(h.len, 0);
        self.conn.recv_exact_by(&mut self.body[..h.len], deadline)?;
        let hello = match Request::decode(&h, &self.body[..h.len]) {
            Ok(Request::Hello(hello)) => hello,
            Ok(_) => unreachable!("a Hello header decodes to a Hello"),
            Err(e) => return self.refuse(tag, e.code(), &e.to_string()),
        };
        let Some(proof) = self.shared.keys.check(&nonce, &hello) else {
            let msg = format!(
                "wrong credential for vNode {:#x} ({:?} role)",
                hello.vnode_id, hello.role
            );
            return self.refuse(tag, ErrorCode::Auth, &msg);
        };
        tracing::debug!(peer = self.conn.peer(), vnode_id = hello.vnode_id, role = ?hello.role, "authenticated");
        let store = &self.shared.store;
        self.out.clear();
        protocol::encode_hello_ok(
            &mut self.out,
            tag,
            store.capacity_pages(),
            store.free_pages(),
            &proof,
        );
        self.conn.send(&mut [IoSlice::new(&self.out)])?;
        // From here the client may be quiet for long (a fault thread waits for faults); one
        // that is quiet longer than the idle timeout without a Ping is closed.
        self.conn.set_timeout(self.shared.cfg.idle_timeout)?;
        Ok(Some(hello.vnode_id))
    }

    fn run(&mut self, vnode: u64) -> io::Result<()> {
        let mut hb = [0u8; HEADER_LEN];
        loop {
            self.conn.recv_exact(&mut hb)?;
            let tag = u64::from_le_bytes(hb[8..16].try_into().expect("8 bytes"));
            let h = match Header::decode(&hb) {
                Ok(h) if h.op.is_request() && h.op != Op::Hello => h,
                Ok(h) => {
                    let msg = format!("{:?} is not a request here", h.op);
                    return self.refuse(tag, ErrorCode::Malformed, &msg).map(drop);
                }
                Err(e) => return self.refuse(tag, e.code(), &e.to_string()).map(drop),
            };
            // Grow only: shrinking and regrowing would zero-fill a page batch every write.
            if self.body.len() < h.len {
                self.body.resize(h.len, 0);
            }
            self.conn.recv_exact(&mut self.body[..h.len])?;
            let body = std::mem::take(&mut self.body);
            let next = match Request::decode(&h, &body[..h.len]) {
                Ok(req) => self.handle(tag, vnode, req),
                Err(e) => self
                    .refuse(tag, e.code(), &e.to_string())
                    .map(|_| Next::Close),
            };
            self.body = body;
            match next? {
                Next::Continue => {}
                Next::Close => return Ok(()),
            }
        }
    }

    /// Sends an error; the caller ends the connection (the stream can no longer be trusted).
    fn refuse(&mut self, tag: u64, code: ErrorCode, msg: &str) -> io::Result<Option<u64>> {
        let m = &self.shared.metrics;
        Metrics::add(
            if code == ErrorCode::Auth {
                &m.auth_failures
            } else {
                &m.bad_frames
            },
            1,
        );
        if let Some(suppressed) = self.shared.refusal_log.allow() {
            tracing::warn!(peer = self.conn.peer(), %code, msg, suppressed, "refusing connection");
        }
        self.out.clear();
        protocol::encode_error(&mut self.out, tag, code, msg);
        self.conn.send(&mut [IoSlice::new(&self.out)])?;
        Ok(None)
    }

    /// Serves one request of an authenticated connection. Every region it names belongs to
    /// `vnode`, the connection's authenticated id: no request carries a vNode id.
    fn handle(&mut self, tag: u64, vnode: u64, req: Request<'_>) -> io::Result<Next> {
        self.out.clear();
        let store = &self.shared.store;
        let result = match req {
            Request::Read { region, pages } => self.read(tag, vnode, region, pages),
            Request::Write {
                region,
                pages,
                data,
            } => store
                .region(vnode, region)
                .and_then(|r| r.write(pages, data, store.sync()))
                .map(|()| Metrics::add(&self.shared.metrics.pages_written, pages.len() as u64)),
            Request::Alloc { region, pages } => store.alloc(vnode, region, pages),
            Request::Free { region } => store.free(vnode, region),
            Request::Open { region, pages } => store
                .open_region(vnode, region, pages)
                .map(|size| protocol::encode_opened(&mut self.out, tag, size)),
            Request::Migrate { region, target } => self.migrate(vnode, region, target),
            Request::Ping => Ok(()),
            Request::Hello(_) => unreachable!("refused by run()"),
        };
        match result {
            Ok(()) if !self.out.is_empty() => {}
            Ok(()) => self
                .out
                .extend_from_slice(&Header::new(Op::Done, 0, tag).encode()),
            Err(e) => {
                Metrics::add(&self.shared.metrics.requests_refused, 1);
                tracing::debug!(peer = self.conn.peer(), vnode, error = %e, "request refused");
                self.out.clear();
                protocol::encode_error(&mut self.out, tag, e.code(), &e.to_string());
            }
        }
        self.conn.send(&mut [IoSlice::new(&self.out)])?;
        Ok(Next::Continue)
    }

    fn read(
        &mut self,
        tag: u64,
        vnode: u64,
        region: u64,
        pages: PageList<'_>,
    ) -> Result<(), StoreError> {
        let r = self.shared.store.region(vnode, region)?;
        self.out
            .extend_from_slice(&Header::new(Op::Data, pages.len() * PAGE_SIZE, tag).encode());
        r.read(pages, &mut self.out)?;
        Metrics::add(&self.shared.metrics.pages_read, pages.len() as u64);
        Ok(())
    }

    /// Copies the region to `target` with writers held off, then hands it over.
    fn migrate(&mut self, vnode: u64, region: u64, target: &str) -> Result<(), StoreError> {
        let store = &self.shared.store;
        let r = store.region(vnode, region)?;
        // The servers' own credential, proven by challenge-response: the target sees nonces
        // and proofs, never a key, and must prove it holds the cluster key before it gets a
        // single page.
        let auth = self.shared.keys.as_client(vnode);
        tracing::info!(vnode, region, target, pages = r.pages, "migrating region");
        let copied = r.move_out(target, |pages| -> Result<(), String> {
            let mut c = MemClient::connect(target, &auth).map_err(|e| e.to_string())?;
            c.set_timeout(Some(MIGRATE_TIMEOUT))
                .map_err(|e| e.to_string())?;
            c.alloc_region(region, r.pages).map_err(|e| e.to_string())?;
            let mut idx: Vec<u64> = Vec::with_capacity(MIGRATE_CHUNK);
            let mut buf = Vec::with_capacity(MIGRATE_CHUNK * PAGE_SIZE);
            for first in (0..pages.count).step_by(MIGRATE_CHUNK) {
                let n = (pages.count - first).min(MIGRATE_CHUNK as u64);
                idx.clear();
                idx.extend(first..first + n);
                buf.clear();
                pages.read(first, n, &mut buf).map_err(|e| e.to_string())?;
                c.write_pages(region, &idx, &buf)
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })?;
        if let Err(e) = copied {
            tracing::warn!(vnode, region, target, error = %e, "migration failed; region stays here");
            return Err(StoreError::Migrate {
                target: target.to_string(),
                reason: e.to_string(),
            });
        }
        store.mark_moved(vnode, region, target)?;
        Metrics::add(&self.shared.metrics.regions_migrated, 1);
        tracing::info!(vnode, region, target, "region migrated");
        Ok(())
    }
}
