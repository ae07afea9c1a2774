//! One connection's life: the handshake, then requests served in order (see the state machine
//! in `protocol.rs`). Buffers are per connection and reused, so a steady stream of page reads
//! and writes allocates nothing.

use std::io::{self, IoSlice};

use super::metrics::Metrics;
use super::store::StoreError;
use super::Shared;
use crate::client::MemClient;
use crate::protocol::{self, ErrorCode, Header, Op, PageList, Request, HEADER_LEN, PAGE_SIZE};
use crate::transport::Conn;

/// Pages copied per frame when migrating a region.
const MIGRATE_CHUNK: usize = protocol::MAX_BATCH;
/// A connection must authenticate within this long, so silent peers cannot pin threads.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

struct ConnState<'a, C: Conn> {
    conn: C,
    shared: &'a Shared,
    vnode: Option<u64>,
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
        vnode: None,
        body: Vec::with_capacity(64 * 1024),
        out: Vec::with_capacity(HEADER_LEN + 64 * 1024),
    };
    tracing::debug!(%peer, "connection opened");
    if let Err(e) = st.conn.set_timeout(Some(HELLO_TIMEOUT)) {
        tracing::warn!(%peer, error = %e, "cannot set the handshake timeout");
        return;
    }
    match st.run() {
        Ok(()) => tracing::debug!(%peer, "connection closed"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!(%peer, "connection closed")
        }
        Err(e) => tracing::info!(%peer, error = %e, "connection ended"),
    }
}

/// Answers the first frame of a connection over the limit with an error, and closes it.
pub(super) fn refuse_busy<C: Conn>(mut conn: C, shared: &Shared) {
    if conn.set_timeout(Some(HELLO_TIMEOUT)).is_err() {
        return;
    }
    let mut hb = [0u8; HEADER_LEN];
    let tag = match conn.recv_exact(&mut hb) {
        Ok(()) => u64::from_le_bytes(hb[8..16].try_into().expect("8 bytes")),
        Err(_) => return,
    };
    Metrics::add(&shared.metrics.bad_frames, 1);
    if let Some(suppressed) = shared.refusal_log.allow() {
        tracing::warn!(
            peer = conn.peer(),
            limit = shared.cfg.max_connections,
            suppressed,
            "too many connections; refusing"
        );
    }
    let mut out = Vec::new();
    let msg = format!("server busy: {} connections", shared.cfg.max_connections);
    protocol::encode_error(&mut out, tag, ErrorCode::Busy, &msg);
    let _ = conn.send(&mut [IoSlice::new(&out)]);
}

impl<C: Conn> ConnState<'_, C> {
    fn run(&mut self) -> io::Result<()> {
        let mut hb = [0u8; HEADER_LEN];
        loop {
            self.conn.recv_exact(&mut hb)?;
            let tag = u64::from_le_bytes(hb[8..16].try_into().expect("8 bytes"));
            let h = match Header::decode(&hb) {
                Ok(h) if h.op.is_request() => h,
                Ok(h) => {
                    return self.refuse(
                        tag,
                        ErrorCode::Malformed,
                        &format!("{:?} is not a request", h.op),
                    )
                }
                Err(e) => return self.refuse(tag, e.code(), &e.to_string()),
            };
            if self.vnode.is_none() && h.op != Op::Hello {
                // Refused before its body is read: no unauthenticated peer makes us buffer a
                // megabyte.
                return self.refuse(tag, ErrorCode::Auth, "hello required first");
            }
            // Grow only: shrinking and regrowing would zero-fill a page batch every write.
            if self.body.len() < h.len {
                self.body.resize(h.len, 0);
            }
            self.conn.recv_exact(&mut self.body[..h.len])?;
            let body = std::mem::take(&mut self.body);
            let next = match Request::decode(&h, &body[..h.len]) {
                Ok(req) => self.handle(tag, req),
                Err(e) => self
                    .refuse(tag, e.code(), &e.to_string())
                    .map(|()| Next::Close),
            };
            self.body = body;
            match next? {
                Next::Continue => {}
                Next::Close => return Ok(()),
            }
        }
    }

    /// Sends an error and ends the connection (the stream can no longer be trusted).
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
        self.conn.send(&mut [IoSlice::new(&self.out)])
    }

    fn handle(&mut self, tag: u64, req: Request<'_>) -> io::Result<Next> {
        let vnode = match (self.vnode, req) {
            (None, Request::Hello { vnode_id, secret }) => {
                return self.hello(tag, vnode_id, secret)
            }
            (None, _) => {
                self.refuse(tag, ErrorCode::Auth, "hello required first")?;
                return Ok(Next::Close);
            }
            (Some(_), Request::Hello { .. }) => {
                self.refuse(tag, ErrorCode::Malformed, "second hello")?;
                return Ok(Next::Close);
            }
            (Some(v), _) => v,
        };
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
            Request::Hello { .. } => unreachable!("handled above"),
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

    fn hello(&mut self, tag: u64, vnode_id: u64, secret: &[u8]) -> io::Result<Next> {
        let ok = match &self.shared.cfg.secret {
            Some(expected) => secret_matches(expected, secret),
            None => true,
        };
        if !ok {
            self.refuse(tag, ErrorCode::Auth, "wrong credential")?;
            return Ok(Next::Close);
        }
        self.vnode = Some(vnode_id);
        // Authenticated clients may sit idle (a fault thread waits for faults).
        self.conn.set_timeout(None)?;
        tracing::debug!(peer = self.conn.peer(), vnode_id, "authenticated");
        let store = &self.shared.store;
        self.out.clear();
        protocol::encode_hello_ok(
            &mut self.out,
            tag,
            store.capacity_pages(),
            store.free_pages(),
        );
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
        let secret: &[u8] = self.shared.cfg.secret.as_deref().unwrap_or(b"insecure");
        tracing::info!(vnode, region, target, pages = r.pages, "migrating region");
        let copied = r.move_out(target, |mem| -> Result<(), crate::ClientError> {
            let mut c = MemClient::connect(target, vnode, secret)?;
            c.alloc_region(region, r.pages)?;
            let mut idx: Vec<u64> = Vec::with_capacity(MIGRATE_CHUNK);
            for (i, chunk) in mem.chunks(MIGRATE_CHUNK * PAGE_SIZE).enumerate() {
                idx.clear();
                let first = (i * MIGRATE_CHUNK) as u64;
                idx.extend(first..first + (chunk.len() / PAGE_SIZE) as u64);
                c.write_pages(region, &idx, chunk)?;
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

/// Compares in time independent of where the first difference is.
fn secret_matches(expected: &[u8], got: &[u8]) -> bool {
    if expected.len() != got.len() {
        return false;
    }
    expected
        .iter()
        .zip(got)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::secret_matches;

    #[test]
    fn secrets_compare_exactly() {
        assert!(secret_matches(b"abc", b"abc"));
        assert!(!secret_matches(b"abc", b"abd"));
        assert!(!secret_matches(b"abc", b"abcd"));
    }
}
