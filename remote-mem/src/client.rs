//! The client library the VMM's fault-serving threads use: [`MemClient`], one authenticated
//! connection to one memory server. (A region on two servers: [`crate::ReplicatedRegion`].)
//!
//! Calls are synchronous; use one `MemClient` per thread. Inside, requests are pipelined (the
//! split-phase `submit_*`/`complete_*` calls let a prefetcher overlap a batch of reads with
//! other work) and batched (up to [`MAX_BATCH`] pages per frame; longer lists are split and
//! pipelined). The hot path reuses its buffers: a page read costs one `writev` and, usually,
//! one `recv`, and allocates nothing.
//!
//! Every wait on the server has a deadline set from the measured round trip
//! ([`vnode_common::deadline`]): the handshake seeds an EWMA of request times, and a reply
//! that makes no progress within `max(500 ms, 16 x rtt, size allowance)` (at most 8 s) fails
//! the call with [`ClientError::Timeout`], so a server that stops answering (`kill -STOP`, a
//! partition) is declared failed instead of hanging the guest.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::time::{Duration, Instant};

use vnode_common::deadline::{self, Rtt};

use crate::auth::ClientAuth;
use crate::error::ClientError;
use crate::protocol::{self, ErrorCode, Header, Op, HEADER_LEN, MAX_BATCH, NONCE_LEN, PAGE_SIZE};
use crate::transport::tcp::TcpConn;
use crate::transport::Conn;

/// Most requests in flight before the oldest reply is drained. Keeps the bytes of unread
/// requests well under the socket buffers, so a pipelining client cannot deadlock with a
/// server blocked on sending it replies.
const MAX_PENDING: usize = 32;
/// A request body larger than this is sent only after outstanding page replies are drained,
/// for the same reason.
const LARGE_REQUEST: usize = 16 * 1024;

/// A batch of reads sent with [`MemClient::submit_read`], to collect with
/// [`MemClient::complete_read`]. Every ticket must be completed.
#[derive(Debug)]
#[must_use = "a submitted read must be completed"]
pub struct ReadTicket {
    tag: u64,
    pages: usize,
}

impl ReadTicket {
    /// Bytes `complete_read` will fill.
    pub fn len_bytes(&self) -> usize {
        self.pages * PAGE_SIZE
    }
}

/// A batch of writes sent with [`MemClient::submit_write`], to confirm with
/// [`MemClient::complete_write`].
#[derive(Debug)]
#[must_use = "a submitted write must be completed"]
pub struct WriteTicket {
    tag: u64,
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Done,
    Data(usize),
    /// An `Opened` reply: the region's size, 8 bytes.
    Opened,
}

#[derive(Debug)]
struct Pending {
    tag: u64,
    expect: Expect,
    /// When the request was sent, and the bytes it moves both ways (for its deadline).
    sent: Instant,
    bytes: usize,
}

/// A reply read ahead of its turn (out-of-order completion, or drained to bound the pipeline).
struct Stashed {
    tag: u64,
    result: Result<Vec<u8>, (ErrorCode, String)>,
}

/// One authenticated connection to one memory server.
pub struct MemClient {
    conn: Box<dyn Conn>,
    addr: String,
    vnode_id: u64,
    next_tag: u64,
    /// Outgoing frame bytes other than page data.
    scratch: Vec<u8>,
    /// Incoming bodies that are not page data (errors, handshake frames).
    body: Vec<u8>,
    pending: VecDeque<Pending>,
    stash: Vec<Stashed>,
    broken: bool,
    capacity_pages: u64,
    free_pages: u64,
    /// Kept to open the same session elsewhere (following a migrated region).
    auth: ClientAuth,
    /// A fixed timeout set with `set_timeout`, instead of the adaptive deadline.
    fixed: Option<Option<Duration>>,
    /// The timeout now set on the socket.
    armed: Option<Duration>,
    rtt: Rtt,
    /// The deadline's floor: [`deadline::FLOOR`], or [`deadline::SOLE_COPY_FLOOR`] for a server
    /// holding the only copy.
    floor: Duration,
    /// The last reply received: a pipelined request's time is counted from here or its
    /// sending, whichever is later.
    last_reply: Instant,
}

impl std::fmt::Debug for MemClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemClient")
            .field("addr", &self.addr)
            .field("vnode_id", &self.vnode_id)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl MemClient {
    /// Connects over TCP and authenticates (mutually) as `auth` says.
    /// The connection and the handshake must succeed within [`deadline::HANDSHAKE`] each.
    pub fn connect(addr: &str, auth: &ClientAuth) -> Result<Self, ClientError> {
        let conn = TcpConn::connect(addr).map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        Self::with_conn(Box::new(conn), auth)
    }

    /// Authenticates over an already established connection of any transport.
    pub fn with_conn(conn: Box<dyn Conn>, auth: &ClientAuth) -> Result<Self, ClientError> {
        let addr = conn.peer().to_string();
        let mut c = MemClient {
            conn,
            addr,
            vnode_id: auth.vnode_id(),
            next_tag: 1,
            scratch: Vec::with_capacity(HEADER_LEN + protocol::BATCH_FIXED + 8 * MAX_BATCH),
            body: Vec::with_capacity(HEADER_LEN + protocol::MAX_ERROR_MSG),
            pending: VecDeque::with_capacity(MAX_PENDING + 1),
            stash: Vec::new(),
            broken: false,
            capacity_pages: 0,
            free_pages: 0,
            auth: auth.clone(),
            fixed: None,
            armed: None,
            rtt: Rtt::new(deadline::FLOOR),
            floor: deadline::FLOOR,
            last_reply: Instant::now(),
        };
        // A server that never sends its challenge (an older vnode-memd waits for the client to
        // speak first) fails the handshake at this deadline.
        c.set_socket_timeout(Some(deadline::HANDSHAKE))?;
        let start = Instant::now();
        c.handshake()?;
        // Two round trips: the challenge arrives with the connection, the reply one trip later.
        c.rtt = Rtt::new(start.elapsed());
        Ok(c)
    }

    /// Challenge, hello, hello-ok: see "Authentication" in `protocol.rs`.
    fn handshake(&mut self) -> Result<(), ClientError> {
        self.recv_handshake_frame(Op::Challenge, 0)?;
        let mut server_nonce = [0u8; NONCE_LEN];
        server_nonce.copy_from_slice(&self.body);
        let hello = self
            .auth
            .hello(&server_nonce)
            .map_err(|e| ClientError::Auth {
                addr: self.addr.clone(),
                what: e.to_string(),
            })?;
        let tag = self.take_tag();
        self.scratch.clear();
        hello.encode(&mut self.scratch, tag);
        if let Err(e) = self.conn.send(&mut [IoSlice::new(&self.scratch)]) {
            return Err(self.io_failed(e));
        }
        self.recv_handshake_frame(Op::HelloOk, tag)?;
        let (cap, free, proof) =
            protocol::decode_hello_ok(&self.body).map_err(|e| self.protocol_failed(e))?;
        if !self.auth.server_proved(&server_nonce, &hello, &proof) {
            self.broken = true;
            return Err(ClientError::Auth {
                addr: self.addr.clone(),
                what: "the server did not prove it holds the cluster key (an impostor, or a \
                       server started --insecure)"
                    .into(),
            });
        }
        self.capacity_pages = cap;
        self.free_pages = free;
        Ok(())
    }

    /// Reads one handshake frame of kind `want` (its body into `self.body`), or the server's
    /// `Error`.
    fn recv_handshake_frame(&mut self, want: Op, tag: u64) -> Result<(), ClientError> {
        let mut hb = [0u8; HEADER_LEN];
        if let Err(e) = self.conn.recv_exact(&mut hb) {
            return Err(self.io_failed(e));
        }
        let h = Header::decode(&hb).map_err(|e| self.protocol_failed(e))?;
        if h.op == Op::Error {
            return self.recv_small_reply(&h);
        }
        if h.op != want || h.tag != tag || h.len != want.max_body() {
            self.broken = true;
            return Err(self.unexpected(format!(
                "{:?} of {} bytes during the handshake, expected {want:?}",
                h.op, h.len
            )));
        }
        self.body.resize(h.len, 0);
        if let Err(e) = self.conn.recv_exact(&mut self.body) {
            return Err(self.io_failed(e));
        }
        Ok(())
    }

    /// The round-trip estimate (handshake, then an EWMA of request times).
    pub fn rtt(&self) -> Duration {
        self.rtt.get()
    }

    /// Sets the adaptive deadline's floor: [`deadline::SOLE_COPY_FLOOR`] when this server holds
    /// the only copy (nothing to fail over to: better slow than falsely dead).
    pub fn set_deadline_floor(&mut self, floor: Duration) {
        self.floor = floor;
    }

    fn set_socket_timeout(&mut self, t: Option<Duration>) -> Result<(), ClientError> {
        if self.armed == t {
            return Ok(());
        }
        self.conn.set_timeout(t).map_err(|source| ClientError::Io {
            addr: self.addr.clone(),
            source,
        })?;
        self.armed = t;
        Ok(())
    }

    /// Sets the socket's timeout for a wait on a request moving `bytes`: the fixed one if set,
    /// else the adaptive deadline (the syscall is skipped while it changes by under 1/8).
    fn arm(&mut self, bytes: usize) -> Result<(), ClientError> {
        let want = match self.fixed {
            Some(t) => t,
            None => Some(self.rtt.deadline_with(self.floor, bytes)),
        };
        let close = match (self.armed, want) {
            (Some(a), Some(w)) if self.fixed.is_none() => a.abs_diff(w) <= a / 8,
            _ => false,
        };
        if close {
            return Ok(());
        }
        self.set_socket_timeout(want)
    }

    /// Region operations (alloc, open, free) create, preallocate, truncate and, with `--sync`,
    /// fsync files on the server: on a loaded host that takes far longer than a page request
    /// (an alloc was seen past the 500 ms floor), so they wait up to the ceiling. A silent
    /// server is still failed, only later; the data path keeps its floor.
    fn arm_region_op(&mut self) -> Result<(), ClientError> {
        match self.fixed {
            Some(_) => Ok(()),
            None => self.set_socket_timeout(Some(deadline::CEILING)),
        }
    }

    /// Replaces the adaptive deadline with a fixed bound on how long any call may wait on the
    /// server (`None`: wait forever). A server that stops answering then fails the call with a
    /// transport error (and a [`crate::ReplicatedRegion`] fails over).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.fixed = Some(timeout);
        self.set_socket_timeout(timeout)
    }

    /// Busy-polls up to `spin` for each reply before sleeping (default: never). Trades a
    /// core's cycles for the cross-core wake-up of the calling thread (tens of microseconds on
    /// these machines); for fault-serving threads that have a core to themselves.
    pub fn set_spin(&mut self, spin: Option<std::time::Duration>) {
        self.conn.set_spin(spin);
    }

    /// Opens a new connection to `addr` (TCP) as the same vNode, with the same credential and
    /// timeout: how a client follows a region that moved.
    pub fn connect_like(&self, addr: &str) -> Result<MemClient, ClientError> {
        let mut c = MemClient::connect(addr, &self.auth)?;
        if let Some(t) = self.fixed {
            c.set_timeout(t)?;
        }
        Ok(c)
    }

    /// The server's address, as given to `connect`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn vnode_id(&self) -> u64 {
        self.vnode_id
    }

    /// Capacity and free pages the server reported at the handshake.
    pub fn server_pages(&self) -> (u64, u64) {
        (self.capacity_pages, self.free_pages)
    }

    /// Allocates `region` with `pages` zero-filled pages.
    pub fn alloc_region(&mut self, region: u64, pages: u64) -> Result<(), ClientError> {
        let tag = self.begin(16)?;
        protocol::encode_alloc(&mut self.scratch, tag, region, pages);
        self.send_scratch(&[], Expect::Done, tag)?;
        self.arm_region_op()?;
        self.wait(tag, &mut [])
    }

    /// Migration, as a memory server (role 1): creates `region` here as an incoming copy that
    /// only this connection writes and nobody else sees, dropped if the connection ends before
    /// [`MemClient::commit_region`].
    pub fn migrate_in(&mut self, region: u64, pages: u64) -> Result<(), ClientError> {
        let tag = self.begin(16)?;
        protocol::encode_region_pages(&mut self.scratch, Op::MigrateIn, tag, region, pages);
        self.send_scratch(&[], Expect::Done, tag)?;
        self.wait(tag, &mut [])
    }

    /// Migration, as a memory server: makes the incoming `region` the server's own.
    pub fn commit_region(&mut self, region: u64) -> Result<(), ClientError> {
        let tag = self.begin(8)?;
        protocol::encode_region(&mut self.scratch, Op::Commit, tag, region);
        self.send_scratch(&[], Expect::Done, tag)?;
        self.wait(tag, &mut [])
    }

    /// Attaches to `region`, which must exist (allocated by an earlier connection of this
    /// vNode, e.g. the VMM this one restores) and have `pages` pages (0: any). Returns its size.
    pub fn open_region(&mut self, region: u64, pages: u64) -> Result<u64, ClientError> {
        let tag = self.begin(16)?;
        protocol::encode_open(&mut self.scratch, tag, region, pages);
        self.send_scratch(&[], Expect::Opened, tag)?;
        self.arm_region_op()?;
        let mut size = [0u8; 8];
        self.wait(tag, &mut size)?;
        Ok(u64::from_le_bytes(size))
    }

    /// Keeps an idle connection open (servers close connections idle past their
    /// `--idle-timeout`): one round trip, answered `Done`.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        let tag = self.begin(0)?;
        protocol::encode_ping(&mut self.scratch, tag);
        self.send_scratch(&[], Expect::Done, tag)?;
        self.wait(tag, &mut [])
    }

    /// Frees `region` and its pages.
    pub fn free_region(&mut self, region: u64) -> Result<(), ClientError> {
        let tag = self.begin(8)?;
        protocol::encode_free(&mut self.scratch, tag, region);
        self.send_scratch(&[], Expect::Done, tag)?;
        self.arm_region_op()?;
        self.wait(tag, &mut [])
    }

    /// Asks the server to copy `region` to the server at `target` and hand it over. Once this
    /// returns, the region lives on `target` (same vNode id and region number) and the old
    /// server refuses it with [`ErrorCode::Moved`]; connect to `target` to go on. The reply
    /// comes after the whole copy: this call waits without a deadline.
    pub fn migrate_region(&mut self, region: u64, target: &str) -> Result<(), ClientError> {
        if target.is_empty() || target.len() > protocol::MAX_ADDR {
            return Err(self.bad("target address must be 1..=256 bytes"));
        }
        let tag = self.begin(10 + target.len())?;
        protocol::encode_migrate(&mut self.scratch, tag, region, target);
        self.send_scratch(&[], Expect::Done, tag)?;
        let fixed = self.fixed.replace(None);
        let r = self.wait(tag, &mut []);
        self.fixed = fixed;
        r
    }

    /// Reads `pages` of `region` into `out` (`out.len() == 4096 * pages.len()`, in order).
    pub fn read_pages(
        &mut self,
        region: u64,
        pages: &[u64],
        out: &mut [u8],
    ) -> Result<(), ClientError> {
        if out.len() != pages.len() * PAGE_SIZE {
            return Err(self.bad("out.len() must be 4096 * pages.len()"));
        }
        if pages.is_empty() {
            return Ok(());
        }
        if pages.len() <= MAX_BATCH {
            let t = self.submit_read(region, pages)?;
            return self.complete_read(t, out);
        }
        // Longer than one frame: pipeline the chunks, then collect them in order (all of
        // them, even after a refusal, so no reply is left behind).
        let first = self.next_tag;
        for chunk in pages.chunks(MAX_BATCH) {
            let t = self.submit_read(region, chunk)?;
            let _in_flight = t; // completed below by tag
        }
        let mut result = Ok(());
        for (i, chunk) in out.chunks_mut(MAX_BATCH * PAGE_SIZE).enumerate() {
            let t = ReadTicket {
                tag: first + i as u64,
                pages: chunk.len() / PAGE_SIZE,
            };
            match self.complete_read(t, chunk) {
                Err(e) if e.is_transport() => return Err(e),
                Err(e) if result.is_ok() => result = Err(e),
                _ => {}
            }
        }
        result
    }

    /// Writes `data` (`4096 * pages.len()` bytes, in order) to `pages` of `region`.
    pub fn write_pages(
        &mut self,
        region: u64,
        pages: &[u64],
        data: &[u8],
    ) -> Result<(), ClientError> {
        if data.len() != pages.len() * PAGE_SIZE {
            return Err(self.bad("data.len() must be 4096 * pages.len()"));
        }
        let first = self.next_tag;
        let mut n = 0u64;
        for (chunk, d) in pages
            .chunks(MAX_BATCH)
            .zip(data.chunks(MAX_BATCH * PAGE_SIZE))
        {
            let t = self.submit_write(region, chunk, d)?;
            let _in_flight = t; // completed below by tag
            n += 1;
        }
        let mut result = Ok(());
        for i in 0..n {
            match self.complete_write(WriteTicket { tag: first + i }) {
                Err(e) if e.is_transport() => return Err(e),
                Err(e) if result.is_ok() => result = Err(e),
                _ => {}
            }
        }
        result
    }

    /// Sends a read of up to [`MAX_BATCH`] pages and returns at once.
    pub fn submit_read(&mut self, region: u64, pages: &[u64]) -> Result<ReadTicket, ClientError> {
        if pages.is_empty() || pages.len() > MAX_BATCH {
            return Err(self.bad("a batch is 1..=256 pages"));
        }
        let tag = self.begin(8 * pages.len())?;
        protocol::encode_batch(&mut self.scratch, Op::Read, tag, region, pages);
        self.send_scratch(&[], Expect::Data(pages.len()), tag)?;
        Ok(ReadTicket {
            tag,
            pages: pages.len(),
        })
    }

    /// Waits for a submitted read and copies its pages into `out` (`ticket.len_bytes()`).
    pub fn complete_read(&mut self, ticket: ReadTicket, out: &mut [u8]) -> Result<(), ClientError> {
        if out.len() != ticket.len_bytes() {
            return Err(self.bad("out.len() must match the ticket"));
        }
        self.wait(ticket.tag, out)
    }

    /// Sends a write of up to [`MAX_BATCH`] pages and returns at once.
    pub fn submit_write(
        &mut self,
        region: u64,
        pages: &[u64],
        data: &[u8],
    ) -> Result<WriteTicket, ClientError> {
        if pages.is_empty() || pages.len() > MAX_BATCH {
            return Err(self.bad("a batch is 1..=256 pages"));
        }
        if data.len() != pages.len() * PAGE_SIZE {
            return Err(self.bad("data.len() must be 4096 * pages.len()"));
        }
        let tag = self.begin((8 + PAGE_SIZE) * pages.len())?;
        protocol::encode_batch(&mut self.scratch, Op::Write, tag, region, pages);
        self.send_scratch(data, Expect::Done, tag)?;
        Ok(WriteTicket { tag })
    }

    /// Waits for a submitted write to be acknowledged.
    pub fn complete_write(&mut self, ticket: WriteTicket) -> Result<(), ClientError> {
        self.wait(ticket.tag, &mut [])
    }

    fn bad(&self, what: &'static str) -> ClientError {
        ClientError::BadArgument {
            addr: self.addr.clone(),
            what,
        }
    }

    fn take_tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        t
    }

    /// Readies a new request: bounds the pipeline, clears the scratch buffer, picks a tag.
    fn begin(&mut self, body_len: usize) -> Result<u64, ClientError> {
        if self.broken {
            return Err(ClientError::Poisoned {
                addr: self.addr.clone(),
            });
        }
        while self.pending.len() >= MAX_PENDING
            || (body_len > LARGE_REQUEST
                && self
                    .pending
                    .iter()
                    .any(|p| matches!(p.expect, Expect::Data(_))))
        {
            self.drain_oldest()?;
        }
        self.scratch.clear();
        Ok(self.take_tag())
    }

    fn send_scratch(&mut self, data: &[u8], expect: Expect, tag: u64) -> Result<(), ClientError> {
        let reply = match expect {
            Expect::Data(n) => n * PAGE_SIZE,
            _ => 0,
        };
        let bytes = self.scratch.len() + data.len() + reply;
        self.arm(bytes)?;
        let r = if data.is_empty() {
            self.conn.send(&mut [IoSlice::new(&self.scratch)])
        } else {
            self.conn
                .send(&mut [IoSlice::new(&self.scratch), IoSlice::new(data)])
        };
        if let Err(e) = r {
            return Err(self.io_failed(e));
        }
        self.pending.push_back(Pending {
            tag,
            expect,
            sent: Instant::now(),
            bytes,
        });
        Ok(())
    }

    fn io_failed(&mut self, e: io::Error) -> ClientError {
        self.broken = true;
        let addr = self.addr.clone();
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe => ClientError::Closed { addr },
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
                addr,
                after_ms: self.armed.map_or(0, |d| d.as_millis() as u64),
            },
            _ => ClientError::Io { addr, source: e },
        }
    }

    /// Reads the oldest outstanding reply into the stash.
    fn drain_oldest(&mut self) -> Result<(), ClientError> {
        let Some(p) = self.pending.pop_front() else {
            return Ok(());
        };
        let mut buf = match p.expect {
            Expect::Data(n) => vec![0u8; n * PAGE_SIZE],
            Expect::Opened => vec![0u8; 8],
            _ => Vec::new(),
        };
        let result = match self.recv_reply(&p, &mut buf) {
            Ok(()) => Ok(buf),
            Err(ClientError::Refused { code, msg, .. }) => Err((code, msg)),
            Err(e) => return Err(e),
        };
        self.stash.push(Stashed { tag: p.tag, result });
        Ok(())
    }

    /// Waits for the reply to `tag`, reading earlier replies into the stash.
    fn wait(&mut self, tag: u64, out: &mut [u8]) -> Result<(), ClientError> {
        if let Some(i) = self.stash.iter().position(|s| s.tag == tag) {
            let s = self.stash.swap_remove(i);
            return match s.result {
                Ok(v) => {
                    out.copy_from_slice(&v);
                    Ok(())
                }
                Err((code, msg)) => Err(ClientError::Refused {
                    addr: self.addr.clone(),
                    code,
                    msg,
                }),
            };
        }
        if !self.pending.iter().any(|p| p.tag == tag) {
            return Err(self.bad("ticket not outstanding on this connection"));
        }
        while let Some(front) = self.pending.front() {
            if front.tag == tag {
                let p = self.pending.pop_front().expect("front exists");
                return self.recv_reply(&p, out);
            }
            self.drain_oldest()?;
        }
        Err(self.bad("ticket not outstanding on this connection"))
    }

    /// Reads one reply, the one for `p`, into `out` (page data) or `self.body`.
    fn recv_reply(&mut self, p: &Pending, out: &mut [u8]) -> Result<(), ClientError> {
        if self.broken {
            return Err(ClientError::Poisoned {
                addr: self.addr.clone(),
            });
        }
        self.arm(p.bytes)?;
        let mut hb = [0u8; HEADER_LEN];
        if let Err(e) = self.conn.recv_exact(&mut hb) {
            return Err(self.io_failed(e));
        }
        let now = Instant::now();
        self.rtt.observe(now - p.sent.max(self.last_reply));
        self.last_reply = now;
        let h = Header::decode(&hb).map_err(|e| self.protocol_failed(e))?;
        if h.tag != p.tag {
            self.broken = true;
            return Err(self.unexpected(format!("tag {} for request {}", h.tag, p.tag)));
        }
        match (h.op, p.expect) {
            (Op::Data, Expect::Data(n)) if h.len == n * PAGE_SIZE && out.len() == h.len => {
                if let Err(e) = self.conn.recv_exact(out) {
                    return Err(self.io_failed(e));
                }
                Ok(())
            }
            (Op::Done, Expect::Done) if h.len == 0 => Ok(()),
            (Op::Opened, Expect::Opened) if h.len == 8 && out.len() == 8 => {
                if let Err(e) = self.conn.recv_exact(out) {
                    return Err(self.io_failed(e));
                }
                Ok(())
            }
            (Op::Error, _) => self.recv_small_reply(&h),
            (op, expect) => {
                self.broken = true;
                Err(self.unexpected(format!("{op:?} of {} bytes, expected {expect:?}", h.len)))
            }
        }
    }

    /// Reads an `Error` body (bounded by the header check) and returns it as the error.
    fn recv_small_reply(&mut self, h: &Header) -> Result<(), ClientError> {
        self.body.resize(h.len, 0);
        let mut body = std::mem::take(&mut self.body);
        let r = self.conn.recv_exact(&mut body);
        let parsed = r.map(|()| protocol::decode_error(&body));
        self.body = body;
        match parsed {
            Err(e) => Err(self.io_failed(e)),
            Ok(Err(source)) => Err(self.protocol_failed(source)),
            Ok(Ok((code, msg))) => Err(ClientError::Refused {
                addr: self.addr.clone(),
                code,
                msg,
            }),
        }
    }

    fn protocol_failed(&mut self, source: protocol::ProtocolError) -> ClientError {
        self.broken = true;
        ClientError::Protocol {
            addr: self.addr.clone(),
            source,
        }
    }

    fn unexpected(&self, what: String) -> ClientError {
        ClientError::UnexpectedReply {
            addr: self.addr.clone(),
            what,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(replies: Vec<u8>) -> Result<MemClient, ClientError> {
        let conn = crate::transport::Scripted::after_insecure_handshake(&replies, "mock:1");
        MemClient::with_conn(Box::new(conn), &ClientAuth::insecure(7))
    }

    fn data_reply(tag: u64, pages: usize, byte: u8) -> Vec<u8> {
        let mut v = Header::new(Op::Data, pages * PAGE_SIZE, tag)
            .encode()
            .to_vec();
        v.extend(std::iter::repeat_n(byte, pages * PAGE_SIZE));
        v
    }

    #[test]
    fn hello_reports_server_pages() {
        let c = client(Vec::new()).expect("hello");
        assert_eq!(c.server_pages(), (100, 50));
    }

    #[test]
    fn replies_complete_out_of_order_through_the_stash() {
        let mut r = data_reply(2, 1, 0xaa);
        r.extend(data_reply(3, 2, 0xbb));
        let mut c = client(r).expect("hello");
        let t1 = c.submit_read(0, &[1]).expect("submit");
        let t2 = c.submit_read(0, &[2, 3]).expect("submit");
        let mut o2 = vec![0u8; t2.len_bytes()];
        c.complete_read(t2, &mut o2).expect("second first");
        assert!(o2.iter().all(|&b| b == 0xbb));
        let mut o1 = vec![0u8; PAGE_SIZE];
        c.complete_read(t1, &mut o1).expect("then the stashed one");
        assert!(o1.iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn server_error_is_refused_naming_the_server_and_connection_goes_on() {
        let mut r = Vec::new();
        protocol::encode_error(&mut r, 2, ErrorCode::NoRegion, "vnode 7 has no region 0");
        r.extend(data_reply(3, 1, 1));
        let mut c = client(r).expect("hello");
        let mut out = vec![0u8; PAGE_SIZE];
        let e = c.read_pages(0, &[0], &mut out).expect_err("refused");
        assert_eq!(e.code(), Some(ErrorCode::NoRegion));
        assert!(!e.is_transport());
        assert!(e.to_string().contains("mock:1"), "{e}");
        c.read_pages(0, &[0], &mut out).expect("next request works");
    }

    #[test]
    fn bad_replies_poison_the_connection() {
        // Wrong tag.
        let mut c = client(data_reply(9, 1, 0)).expect("hello");
        let mut out = vec![0u8; PAGE_SIZE];
        let e = c.read_pages(0, &[0], &mut out).expect_err("wrong tag");
        assert!(e.is_transport(), "{e}");
        assert!(matches!(
            c.read_pages(0, &[0], &mut out),
            Err(ClientError::Poisoned { .. })
        ));
        // Wrong length for the pages asked.
        let mut c = client(data_reply(2, 2, 0)).expect("hello");
        let e = c.read_pages(0, &[0], &mut out).expect_err("wrong length");
        assert!(matches!(e, ClientError::UnexpectedReply { .. }), "{e}");
        // Server closes mid-reply.
        let mut r = data_reply(2, 1, 0);
        r.truncate(100);
        let mut c = client(r).expect("hello");
        let e = c.read_pages(0, &[0], &mut out).expect_err("eof");
        assert!(matches!(e, ClientError::Closed { .. }), "{e}");
    }

    #[test]
    fn empty_lists_are_no_ops_and_refused_chunks_leave_nothing_behind() {
        let mut r = Vec::new();
        protocol::encode_error(&mut r, 2, ErrorCode::OutOfRange, "page 300 beyond the end");
        r.extend(data_reply(3, 44, 9));
        r.extend(data_reply(4, 1, 5));
        let mut c = client(r).expect("hello");
        c.read_pages(0, &[], &mut []).expect("nothing to read");
        let pages: Vec<u64> = (0..300).collect();
        let mut out = vec![0u8; 300 * PAGE_SIZE];
        let e = c
            .read_pages(0, &pages, &mut out)
            .expect_err("first chunk refused");
        assert_eq!(e.code(), Some(ErrorCode::OutOfRange));
        assert!(c.pending.is_empty() && c.stash.is_empty());
        let mut one = vec![0u8; PAGE_SIZE];
        c.read_pages(0, &[1], &mut one).expect("in step afterwards");
        assert!(one.iter().all(|&b| b == 5));
    }

    #[test]
    fn pipeline_depth_is_bounded() {
        let mut r = Vec::new();
        for tag in 2..2 + 40 {
            r.extend(data_reply(tag, 1, tag as u8));
        }
        let mut c = client(r).expect("hello");
        let tickets: Vec<ReadTicket> = (0..40)
            .map(|_| c.submit_read(0, &[0]).expect("submit"))
            .collect();
        assert!(c.pending.len() <= MAX_PENDING);
        for (i, t) in tickets.into_iter().enumerate() {
            let mut out = vec![0u8; PAGE_SIZE];
            c.complete_read(t, &mut out).expect("complete");
            assert!(out.iter().all(|&b| b == (i + 2) as u8));
        }
    }
}
