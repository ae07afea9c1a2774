//! One connection's life: the handshake, then requests served in order (see the state machine
//! in `protocol.rs`). Buffers are per connection and reused, so a steady stream of page reads
//! and writes allocates nothing.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use super::metrics::Metrics;
use super::store::{Region, StoreError};
use super::Shared;
use crate::protocol::{
    self, AuthRole, ErrorCode, Header, Op, PageList, ProtocolError, Request, HEADER_LEN, PAGE_SIZE,
    VERSION,
};
use crate::transport::Conn;

struct ConnState<'a, C: Conn> {
    conn: C,
    shared: &'a Shared,
    body: Vec<u8>,
    out: Vec<u8>,
    /// The authenticated vNode, once the handshake is done.
    vnode: Option<u64>,
    /// Regions migrating in over this (role 1) connection, not yet committed: dropped when the
    /// connection ends, so a source that dies or gives up leaves nothing behind.
    incoming: HashMap<u64, Arc<Region>>,
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
        vnode: None,
        incoming: HashMap::new(),
    };
    tracing::debug!(%peer, "connection opened");
    let deadline = Instant::now() + shared.cfg.handshake_timeout;
    let r = st.handshake(deadline).and_then(|who| match who {
        Some((v, role)) => st.run(v, role),
        None => Ok(()),
    });
    if let Some(vnode) = st.vnode {
        for (region, r) in st.incoming.drain() {
            tracing::warn!(%peer, vnode, region, "migration into this server ended before its commit; incoming copy dropped");
            shared.store.abort_incoming(vnode, r);
        }
    }
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
    /// Challenge, hello, hello-ok, all by `deadline`. Returns the authenticated vNode id and
    /// role, or `None` when the client was refused.
    fn handshake(&mut self, deadline: Instant) -> io::Result<Option<(u64, AuthRole)>> {
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
            Ok(_) => {
                return self
                    .refuse(tag, ErrorCode::Auth, "hello required first")
                    .map(|_| None)
            }
            Err(ProtocolError::BadVersion(v)) => {
                let msg = format!(
                    "protocol version {v} is not spoken here: this server speaks version \
                     {VERSION} (upgrade the client)"
                );
                return self.refuse(tag, ErrorCode::Version, &msg).map(|_| None);
            }
            Err(e) => return self.refuse(tag, e.code(), &e.to_string()).map(|_| None),
        };
        self.body.resize(h.len, 0);
        self.conn.recv_exact_by(&mut self.body[..h.len], deadline)?;
        let hello = match Request::decode(&h, &self.body[..h.len]) {
            Ok(Request::Hello(hello)) => hello,
            Ok(_) => unreachable!("a Hello header decodes to a Hello"),
            Err(e) => return self.refuse(tag, e.code(), &e.to_string()).map(|_| None),
        };
        let Some(proof) = self.shared.keys.check(&nonce, &hello) else {
            let msg = format!(
                "wrong credential for vNode {:#x} ({:?} role)",
                hello.vnode_id, hello.role
            );
            return self.refuse(tag, ErrorCode::Auth, &msg).map(|_| None);
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
        self.vnode = Some(hello.vnode_id);
        Ok(Some((hello.vnode_id, hello.role)))
    }

    fn run(&mut self, vnode: u64, role: AuthRole) -> io::Result<()> {
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
                Ok(req) => self.handle(tag, vnode, role, req),
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
    fn refuse(&mut self, tag: u64, code: ErrorCode, msg: &str) -> io::Result<()> {
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
        Ok(())
    }

    /// Serves one request of an authenticated connection. Every region it names belongs to
    /// `vnode`, the connection's authenticated id: no request carries a vNode id.
    fn handle(
        &mut self,
        tag: u64,
        vnode: u64,
        role: AuthRole,
        req: Request<'_>,
    ) -> io::Result<Next> {
        self.out.clear();
        self.execute(tag, vnode, role, req)
    }

    /// Serves an authenticated request and sends its reply; its service time is recorded
    /// before the reply goes out, so a client that got its reply finds it in the metrics.
    fn execute(
        &mut self,
        tag: u64,
        vnode: u64,
        role: AuthRole,
        req: Request<'_>,
    ) -> io::Result<Next> {
        let started = Instant::now();
        let lat = &self.shared.metrics.latency;
        let hist = match &req {
            Request::Read { .. } => Some(&lat.read),
            Request::Write { .. } => Some(&lat.write),
            Request::Alloc { .. } => Some(&lat.alloc),
            Request::Open { .. } => Some(&lat.open),
            Request::Free { .. } => Some(&lat.free),
            Request::Migrate { .. } | Request::MigrateIn { .. } | Request::Commit { .. } => {
                Some(&lat.migrate)
            }
            _ => None,
        };
        let store = &self.shared.store;
        let result = match req {
            Request::Read { region, pages } => self.read(tag, vnode, region, pages),
            Request::Write {
                region,
                pages,
                data,
            } => match self.incoming.get(&region) {
                // Only a role-1 connection has incoming regions.
                Some(r) => Ok(Arc::clone(r)),
                None => store.region(vnode, region),
            }
            .and_then(|r| r.write(pages, data, store.sync()))
            .map(|()| Metrics::add(&self.shared.metrics.pages_written, pages.len() as u64)),
            Request::Alloc { region, pages } => store.alloc(vnode, region, pages),
            Request::Free { region } => store.free(vnode, region),
            Request::Open { region, pages } => store
                .open_region(vnode, region, pages)
                .map(|size| protocol::encode_opened(&mut self.out, tag, size)),
            Request::Migrate { region, target } => {
                super::migrate::migrate_out(self.shared, vnode, region, target)
            }
            Request::MigrateIn { region, pages } => self.migrate_in(vnode, role, region, pages),
            Request::Commit { region } => self.commit(vnode, role, region),
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
        if let Some(h) = hist {
            h.record(started.elapsed());
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

    /// The target side of a migration: an incoming region owned by this connection.
    fn migrate_in(
        &mut self,
        vnode: u64,
        role: AuthRole,
        region: u64,
        pages: u64,
    ) -> Result<(), StoreError> {
        if role != AuthRole::Server {
            return Err(StoreError::ServerOnly { what: "MigrateIn" });
        }
        if self.incoming.contains_key(&region) {
            return Err(StoreError::Migrating { region });
        }
        let r = self.shared.store.alloc_incoming(vnode, region, pages)?;
        tracing::info!(
            peer = self.conn.peer(),
            vnode,
            region,
            pages,
            "region migrating in"
        );
        self.incoming.insert(region, r);
        Ok(())
    }

    /// The target's commit point: the incoming region becomes this server's.
    fn commit(&mut self, vnode: u64, role: AuthRole, region: u64) -> Result<(), StoreError> {
        if role != AuthRole::Server {
            return Err(StoreError::ServerOnly { what: "Commit" });
        }
        let r = self
            .incoming
            .remove(&region)
            .ok_or(StoreError::NoIncoming { region })?;
        let store = &self.shared.store;
        if let Err(e) = store.commit_incoming(vnode, Arc::clone(&r)) {
            store.abort_incoming(vnode, r);
            return Err(e);
        }
        tracing::info!(
            peer = self.conn.peer(),
            vnode,
            region,
            "migrated region committed here"
        );
        Ok(())
    }
}
