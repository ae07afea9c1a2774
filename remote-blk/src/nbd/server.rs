//! The `vnode-blkd` NBD server: handshake and transmission over raw-file exports.
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
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use thiserror::Error;

use super::protocol::*;
use super::Stream;
use crate::backend::{AlignedBuf, FileBackend, DIRECT_BLOCK};

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
    /// Pin each inline connection thread to its client's CPU (see [`CpuFollower`]).
    pub follow_client_cpu: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            threading: Threading::Inline,
            follow_client_cpu: true,
        }
    }
}

/// Server-wide counters of what clients did; logged (debug) when a connection ends.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
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
    stats: Stats,
}

impl Server {
    pub fn new(exports: Vec<Export>, opts: ServerOptions) -> Arc<Self> {
        Arc::new(Self {
            exports,
            threading: opts.threading,
            follow_client: opts.follow_client_cpu,
            stats: Stats::default(),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Accepts connections forever, one named thread each.
    pub fn serve(self: &Arc<Self>, listener: &Listener) -> Result<(), ServerError> {
        loop {
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let id = self.stats.connections.fetch_add(1, Ordering::Relaxed);
            let server = Arc::clone(self);
            thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    if let Err(e) = server.handle(stream) {
                        tracing::debug!(conn = id, error = %e, "connection ended");
                    }
                    let st = &server.stats;
                    tracing::debug!(
                        conn = id,
                        requests = st.requests.load(Ordering::Relaxed),
                        errors = st.errors.load(Ordering::Relaxed),
                        bytes_read = st.bytes_read.load(Ordering::Relaxed),
                        bytes_written = st.bytes_written.load(Ordering::Relaxed),
                        "connection closed; server totals"
                    );
                })?;
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

/// Handshake-phase state of one connection.
#[derive(Default)]
struct OptState {
    structured: bool,
    secret: Option<Vec<u8>>,
    no_zeroes: bool,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn export_flags(e: &Export) -> u16 {
    let mut f = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN;
    if e.read_only {
        f |= TF_READ_ONLY;
    }
    f
}

impl Server {
    fn handshake<'a>(
        &'a self,
        rd: &mut impl Read,
        wr: &mut impl Write,
    ) -> Result<Option<Session<'a>>, ServerError> {
        let mut greet = Vec::with_capacity(18);
        greet.extend_from_slice(&NBDMAGIC.to_be_bytes());
        greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greet.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        wr.write_all(&greet)?;
        let mut cf = [0u8; 4];
        rd.read_exact(&mut cf)?;
        let cflags = u32::from_be_bytes(cf);
        if cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
            || cflags & CLIENT_FIXED_NEWSTYLE == 0
        {
            return Err(ServerError::ClientFlags(cflags));
        }
        let mut st = OptState {
            no_zeroes: cflags & CLIENT_NO_ZEROES != 0,
            ..Default::default()
        };
        loop {
            let mut hdr = [0u8; OPTION_HEADER_LEN];
            rd.read_exact(&mut hdr)?;
            let h = OptionHeader::decode(&hdr)?;
            if h.len > MAX_OPTION_LEN {
                if h.option == OPT_EXPORT_NAME || h.len > 16 * MAX_OPTION_LEN {
                    return Err(ServerError::OptionTooLarge(h.len));
                }
                io::copy(&mut rd.take(u64::from(h.len)), &mut io::sink())?;
                reply(wr, h.option, REP_ERR_TOO_BIG, b"option too large")?;
                continue;
            }
            let mut data = vec![0u8; h.len as usize];
            rd.read_exact(&mut data)?;
            match self.option(wr, &mut st, h.option, &data)? {
                OptOutcome::Continue => {}
                OptOutcome::Close => return Ok(None),
                OptOutcome::Transmit(export) => {
                    return Ok(Some(Session {
                        export,
                        structured: st.structured,
                    }))
                }
            }
        }
    }

    fn option<'a>(
        &'a self,
        wr: &mut impl Write,
        st: &mut OptState,
        opt: u32,
        data: &[u8],
    ) -> Result<OptOutcome<'a>, ServerError> {
        match opt {
            OPT_EXPORT_NAME => {
                let Some(e) = self.find(data).filter(|e| self.allowed(e, st)) else {
                    tracing::info!("EXPORT_NAME for unknown or protected export: closing");
                    return Ok(OptOutcome::Close);
                };
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&e.backend.size().to_be_bytes());
                b.extend_from_slice(&export_flags(e).to_be_bytes());
                if !st.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&b)?;
                Ok(OptOutcome::Transmit(e))
            }
            OPT_ABORT => {
                // The client may already have closed; a failed ACK changes nothing.
                let _ = reply(wr, opt, REP_ACK, &[]);
                Ok(OptOutcome::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(wr, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    return Ok(OptOutcome::Continue);
                }
                for e in &self.exports {
                    reply(wr, opt, REP_SERVER, &encode_rep_server(e.name.as_bytes()))?;
                }
                reply(wr, opt, REP_ACK, &[])?;
                Ok(OptOutcome::Continue)
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    st.structured = true;
                    reply(wr, opt, REP_ACK, &[])?;
                } else {
                    reply(wr, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                }
                Ok(OptOutcome::Continue)
            }
            OPT_VNODE_SECRET => {
                if data.len() > MAX_NAME_LEN {
                    reply(wr, opt, REP_ERR_INVALID, b"secret too long")?;
                } else {
                    st.secret = Some(data.to_vec());
                    reply(wr, opt, REP_ACK, &[])?;
                }
                Ok(OptOutcome::Continue)
            }
            OPT_INFO | OPT_GO => self.info_or_go(wr, st, opt, data),
            _ => {
                reply(wr, opt, REP_ERR_UNSUP, b"option not supported")?;
                Ok(OptOutcome::Continue)
            }
        }
    }

    /// Whether the client may use `e`: no secret needed, or the right one was sent.
    fn allowed(&self, e: &Export, st: &OptState) -> bool {
        match (&e.secret, &st.secret) {
            (None, _) => true,
            (Some(want), Some(got)) => constant_time_eq(want, got),
            (Some(_), None) => false,
        }
    }

    fn info_or_go<'a>(
        &'a self,
        wr: &mut impl Write,
        st: &OptState,
        opt: u32,
        data: &[u8],
    ) -> Result<OptOutcome<'a>, ServerError> {
        let req = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                reply(wr, opt, REP_ERR_INVALID, e.to_string().as_bytes())?;
                return Ok(OptOutcome::Continue);
            }
        };
        let Some(e) = self.find(&req.name) else {
            reply(wr, opt, REP_ERR_UNKNOWN, b"no such export")?;
            return Ok(OptOutcome::Continue);
        };
        if !self.allowed(e, st) {
            tracing::info!(export = %e.name, "client without the export's secret refused");
            reply(wr, opt, REP_ERR_POLICY, b"export requires a valid secret")?;
            return Ok(OptOutcome::Continue);
        }
        let size = e.backend.size();
        reply(
            wr,
            opt,
            REP_INFO,
            &encode_info_export(size, export_flags(e)),
        )?;
        for r in &req.requests {
            match *r {
                INFO_BLOCK_SIZE => {
                    let min = if e.backend.direct() {
                        DIRECT_BLOCK as u32
                    } else {
                        1
                    };
                    let b = encode_info_block_size(min, 4096, MAX_PAYLOAD);
                    reply(wr, opt, REP_INFO, &b)?;
                }
                INFO_NAME => {
                    let mut b = INFO_NAME.to_be_bytes().to_vec();
                    b.extend_from_slice(e.name.as_bytes());
                    reply(wr, opt, REP_INFO, &b)?;
                }
                _ => {}
            }
        }
        reply(wr, opt, REP_ACK, &[])?;
        if opt == OPT_GO {
            Ok(OptOutcome::Transmit(e))
        } else {
            Ok(OptOutcome::Continue)
        }
    }
}

enum OptOutcome<'a> {
    Continue,
    Close,
    Transmit(&'a Export),
}

fn reply(wr: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    wr.write_all(&OptionReply::encode_with(opt, kind, data))
}

/// Maps a backend I/O error to the NBD error a client sees.
fn nbd_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => EPERM,
        Some(libc::ENOMEM) => ENOMEM,
        _ => EIO,
    }
}

/// Per-thread buffers for executing requests.
struct Worker {
    out: Vec<u8>,
    /// Aligned bounce buffer for O_DIRECT reads.
    scratch: AlignedBuf,
}

impl Worker {
    fn new() -> Self {
        Self {
            out: Vec::with_capacity(1 << 20),
            scratch: AlignedBuf::new(4096),
        }
    }

    fn scratch(&mut self, len: usize) -> &mut [u8] {
        if self.scratch.len() < len {
            self.scratch = AlignedBuf::new(len);
        }
        &mut self.scratch.as_mut_slice()[..len]
    }
}

/// Checks a request against the export before any I/O; `Err` carries the NBD error.
fn validate(e: &Export, r: &Request) -> Result<(), u32> {
    let end = r.offset.checked_add(u64::from(r.len));
    let past_end = end.is_none_or(|end| end > e.backend.size());
    let writes = matches!(r.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    match r.kind {
        CMD_READ | CMD_WRITE if r.len > MAX_PAYLOAD => return Err(EINVAL),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_FLUSH => {}
        _ => return Err(EINVAL),
    }
    if writes && e.read_only {
        return Err(EPERM);
    }
    if r.kind != CMD_FLUSH && past_end {
        // The spec asks for ENOSPC on writes past the end, EINVAL for everything else.
        let grows = matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES);
        return Err(if grows { ENOSPC } else { EINVAL });
    }
    if e.backend.direct()
        && matches!(r.kind, CMD_READ | CMD_WRITE)
        && (!r.offset.is_multiple_of(DIRECT_BLOCK)
            || !u64::from(r.len).is_multiple_of(DIRECT_BLOCK))
    {
        return Err(EINVAL);
    }
    Ok(())
}

impl Server {
    /// Executes `r` (whose WRITE payload is `payload`) and appends its reply to `w.out`.
    fn execute(&self, s: &Session<'_>, r: &Request, payload: &[u8], w: &mut Worker) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let e = s.export;
        let result = validate(e, r).and_then(|()| {
            match r.kind {
                CMD_READ => return self.read(s, r, w),
                CMD_WRITE => e
                    .backend
                    .write_at(payload, r.offset, r.flags & CMD_FLAG_FUA != 0)
                    .map(|()| {
                        let n = payload.len() as u64;
                        self.stats.bytes_written.fetch_add(n, Ordering::Relaxed);
                    }),
                CMD_FLUSH => e.backend.flush(),
                CMD_TRIM => e.backend.trim(r.offset, u64::from(r.len)),
                CMD_WRITE_ZEROES => e.backend.write_zeroes(
                    r.offset,
                    u64::from(r.len),
                    r.flags & CMD_FLAG_NO_HOLE == 0,
                    r.flags & CMD_FLAG_FUA != 0,
                ),
                _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            }
            .map_err(|err| {
                tracing::debug!(kind = r.kind, offset = r.offset, error = %err, "request failed");
                nbd_errno(&err)
            })
        });
        match result {
            Ok(()) if r.kind == CMD_READ => {}
            Ok(()) => put_done(&mut w.out, s.structured, r.cookie),
            Err(code) => self.put_error(&mut w.out, s.structured, r.cookie, code),
        }
    }

    /// Appends a successful READ reply with its data, reading straight into the output buffer.
    fn read(&self, s: &Session<'_>, r: &Request, w: &mut Worker) -> Result<(), u32> {
        let len = r.len as usize;
        let start = w.out.len();
        if s.structured {
            put_structured_reply(
                &mut w.out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                r.cookie,
                8 + r.len,
            );
            w.out.extend_from_slice(&r.offset.to_be_bytes());
        } else {
            put_simple_reply(&mut w.out, 0, r.cookie);
        }
        let data_at = w.out.len();
        let res = if s.export.backend.direct() {
            let res = s.export.backend.read_at(w.scratch(len), r.offset);
            if res.is_ok() {
                w.out.extend_from_slice(&w.scratch.as_slice()[..len]);
            }
            res
        } else {
            w.out.resize(data_at + len, 0);
            s.export.backend.read_at(&mut w.out[data_at..], r.offset)
        };
        match res {
            Ok(()) => {
                self.stats
                    .bytes_read
                    .fetch_add(len as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(err) => {
                w.out.truncate(start);
                tracing::debug!(offset = r.offset, error = %err, "read failed");
                Err(nbd_errno(&err))
            }
        }
    }

    fn put_error(&self, out: &mut Vec<u8>, structured: bool, cookie: u64, code: u32) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if structured {
            let msg = errno_name(code).as_bytes();
            put_structured_reply(
                out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                6 + msg.len() as u32,
            );
            out.extend_from_slice(&code.to_be_bytes());
            out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            out.extend_from_slice(msg);
        } else {
            put_simple_reply(out, code, cookie);
        }
    }
}

fn put_done(out: &mut Vec<u8>, structured: bool, cookie: u64) {
    if structured {
        put_structured_reply(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    } else {
        put_simple_reply(out, 0, cookie);
    }
}

/// What the reader got for one request.
enum Incoming {
    Request(Request),
    /// The client disconnected (DISC, or EOF between requests).
    Disconnect,
}

fn read_request(rd: &mut impl Read) -> Result<Incoming, ServerError> {
    let mut hdr = [0u8; REQUEST_LEN];
    if let Err(e) = rd.read_exact(&mut hdr) {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return Ok(Incoming::Disconnect);
        }
        return Err(e.into());
    }
    let r = Request::decode(&hdr)?;
    Ok(if r.kind == CMD_DISC {
        Incoming::Disconnect
    } else {
        Incoming::Request(r)
    })
}

/// Reads a WRITE payload into `buf`, or skips an oversized one (the reply will be EINVAL).
fn read_payload(rd: &mut impl Read, r: &Request, buf: &mut [u8]) -> io::Result<()> {
    if r.len > MAX_PAYLOAD {
        io::copy(&mut rd.take(u64::from(r.len)), &mut io::sink())?;
        return Ok(());
    }
    rd.read_exact(buf)
}

fn payload_len(r: &Request) -> usize {
    if r.kind == CMD_WRITE && r.len <= MAX_PAYLOAD {
        r.len as usize
    } else {
        0
    }
}

impl Server {
    fn serve_inline(
        &self,
        s: &Session<'_>,
        mut rd: BufReader<Stream>,
        mut wr: Stream,
    ) -> Result<(), ServerError> {
        let mut w = Worker::new();
        let mut payload = AlignedBuf::new(64 << 10);
        let mut follow = self.follow_client.then(|| CpuFollower::new(&wr));
        loop {
            // Answer everything handled so far once no request is waiting in our buffer.
            if rd.buffer().is_empty() {
                if !w.out.is_empty() {
                    wr.write_all(&w.out)?;
                    w.out.clear();
                }
                if let Some(f) = follow.as_mut() {
                    f.follow();
                }
            }
            let r = match read_request(&mut rd)? {
                Incoming::Request(r) => r,
                Incoming::Disconnect => break,
            };
            let plen = payload_len(&r);
            if payload.len() < plen {
                payload = AlignedBuf::new(plen);
            }
            if r.kind == CMD_WRITE {
                read_payload(&mut rd, &r, &mut payload.as_mut_slice()[..plen])?;
            }
            self.execute(s, &r, &payload.as_slice()[..plen], &mut w);
            if w.out.len() >= 1 << 20 {
                wr.write_all(&w.out)?;
                w.out.clear();
            }
        }
        if !w.out.is_empty() {
            wr.write_all(&w.out)?;
        }
        Ok(())
    }

    fn serve_pool(
        &self,
        s: &Session<'_>,
        mut rd: BufReader<Stream>,
        wr: Stream,
        workers: usize,
    ) -> Result<(), ServerError> {
        let wr = Mutex::new(wr);
        let (tx, rx) = mpsc::sync_channel::<(Request, AlignedBuf)>(256);
        let rx = Mutex::new(rx);
        thread::scope(|scope| -> Result<(), ServerError> {
            for i in 0..workers.max(1) {
                let (rx, wr) = (&rx, &wr);
                thread::Builder::new()
                    .name(format!("nbd-worker-{i}"))
                    .spawn_scoped(scope, move || self.pool_worker(s, rx, wr))?;
            }
            while let Incoming::Request(r) = read_request(&mut rd)? {
                let plen = payload_len(&r);
                let mut payload = AlignedBuf::new(plen);
                if r.kind == CMD_WRITE {
                    read_payload(&mut rd, &r, &mut payload.as_mut_slice()[..plen])?;
                }
                if tx.send((r, payload)).is_err() {
                    break;
                }
            }
            drop(tx);
            Ok(())
        })
    }

    fn pool_worker(
        &self,
        s: &Session<'_>,
        rx: &Mutex<mpsc::Receiver<(Request, AlignedBuf)>>,
        wr: &Mutex<Stream>,
    ) {
        let mut w = Worker::new();
        loop {
            let job = match rx.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => return,
            };
            let Ok((r, payload)) = job else { return };
            let plen = payload_len(&r);
            self.execute(s, &r, &payload.as_slice()[..plen], &mut w);
            let Ok(mut wr) = wr.lock() else { return };
            if wr.write_all(&w.out).is_err() {
                // The reader sees the dead socket too and ends the connection.
                return;
            }
            w.out.clear();
        }
    }
}

/// Keeps a connection thread on the CPU where its client's packets are processed
/// (`SO_INCOMING_CPU`; on loopback that is the client's own CPU, on a NIC the CPU of its
/// receive queue, as RFS would choose). Here a wake-up on the other core costs ~40 us, several
/// times a 4 KiB request, so sharing the client's core turns every request/reply hand-off into
/// a cheap same-core switch. Checked once per batch, re-pinned only when it changes.
struct CpuFollower {
    fd: std::os::unix::io::RawFd,
    pinned: Option<i32>,
}

impl CpuFollower {
    fn new(s: &Stream) -> Self {
        use std::os::unix::io::AsRawFd;
        let fd = match s {
            Stream::Tcp(t) => t.as_raw_fd(),
            Stream::Unix(u) => u.as_raw_fd(),
        };
        Self { fd, pinned: None }
    }

    fn follow(&mut self) {
        let mut cpu: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: cpu and len are valid for writes of the sizes passed; the fd is the
        // connection's socket, open while the connection is served.
        let rc = unsafe {
            libc::getsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_INCOMING_CPU,
                (&mut cpu as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0
            || cpu < 0
            || self.pinned == Some(cpu)
            || cpu as usize >= libc::CPU_SETSIZE as usize
        {
            return;
        }
        // SAFETY: cpu_set_t is plain data for which all-zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: cpu < CPU_SETSIZE was checked above; set is a valid cpu_set_t.
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
        // SAFETY: set is a valid cpu_set_t of the size passed; pid 0 is this thread.
        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
        if rc == 0 {
            self.pinned = Some(cpu);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn export(tag: &str, secret: Option<&[u8]>, read_only: bool) -> Export {
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

    fn req(kind: u16, offset: u64, len: u32) -> Request {
        Request {
            flags: 0,
            kind,
            cookie: 1,
            offset,
            len,
        }
    }

    #[test]
    fn validate_bounds_and_kinds() {
        let e = export("v", None, false);
        assert_eq!(validate(&e, &req(CMD_READ, 0, 4096)), Ok(()));
        assert_eq!(validate(&e, &req(CMD_READ, (1 << 20) - 1, 2)), Err(EINVAL));
        assert_eq!(validate(&e, &req(CMD_READ, u64::MAX, 2)), Err(EINVAL));
        assert_eq!(validate(&e, &req(CMD_WRITE, 1 << 20, 1)), Err(ENOSPC));
        assert_eq!(
            validate(&e, &req(CMD_WRITE_ZEROES, 1 << 20, 1)),
            Err(ENOSPC)
        );
        assert_eq!(validate(&e, &req(CMD_TRIM, 1 << 20, 1)), Err(EINVAL));
        assert_eq!(
            validate(&e, &req(CMD_READ, 0, MAX_PAYLOAD + 1)),
            Err(EINVAL)
        );
        assert_eq!(validate(&e, &req(CMD_FLUSH, 0, 0)), Ok(()));
        assert_eq!(validate(&e, &req(CMD_CACHE, 0, 1)), Err(EINVAL));
        assert_eq!(validate(&e, &req(99, 0, 0)), Err(EINVAL));
        let ro = export("ro", None, true);
        assert_eq!(validate(&ro, &req(CMD_WRITE, 0, 1)), Err(EPERM));
        assert_eq!(validate(&ro, &req(CMD_READ, 0, 1)), Ok(()));
    }

    /// Client bytes: flags, then the given options.
    fn client(opts: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        for (o, d) in opts {
            let h = OptionHeader {
                option: *o,
                len: d.len() as u32,
            };
            b.extend_from_slice(&h.encode());
            b.extend_from_slice(d);
        }
        b
    }

    /// Option reply kinds in the server's output, after the 18-byte greeting.
    fn reply_kinds(out: &[u8]) -> Vec<u32> {
        let mut kinds = Vec::new();
        let mut at = 18;
        while let Ok(r) = OptionReply::decode(&out[at..]) {
            kinds.push(r.kind);
            at += OPTION_REPLY_HEADER_LEN + r.len as usize;
        }
        kinds
    }

    fn go(name: &str) -> (u32, Vec<u8>) {
        let r = InfoRequest {
            name: name.as_bytes().to_vec(),
            requests: vec![],
        };
        (OPT_GO, r.encode())
    }

    #[test]
    fn protected_export_needs_the_secret() {
        let s = Server::new(
            vec![export("locked", Some(b"k"), false)],
            ServerOptions::default(),
        );
        let mut out = Vec::new();
        let input = client(&[go("locked"), (OPT_ABORT, vec![])]);
        let r = s.negotiate(&mut Cursor::new(input), &mut out).expect("ok");
        assert_eq!(r, None);
        assert_eq!(reply_kinds(&out), [REP_ERR_POLICY, REP_ACK]);

        let mut out = Vec::new();
        let input = client(&[(OPT_VNODE_SECRET, b"bad".to_vec()), go("locked")]);
        let mut rd = Cursor::new(input);
        assert!(
            s.negotiate(&mut rd, &mut out).is_err(),
            "input ends after POLICY"
        );
        assert_eq!(reply_kinds(&out), [REP_ACK, REP_ERR_POLICY]);

        let mut out = Vec::new();
        let input = client(&[(OPT_VNODE_SECRET, b"k".to_vec()), go("locked")]);
        let r = s.negotiate(&mut Cursor::new(input), &mut out).expect("ok");
        assert_eq!(r, Some("locked"));
        assert_eq!(reply_kinds(&out), [REP_ACK, REP_INFO, REP_ACK]);
    }

    #[test]
    fn list_and_unknown_options() {
        let s = Server::new(
            vec![export("a", None, false), export("b", None, false)],
            ServerOptions::default(),
        );
        let mut out = Vec::new();
        let input = client(&[
            (OPT_LIST, vec![]),
            (OPT_STARTTLS, vec![]),
            (OPT_SET_META_CONTEXT, vec![0; 8]),
            go("nope"),
            go(""),
        ]);
        let r = s.negotiate(&mut Cursor::new(input), &mut out).expect("ok");
        assert_eq!(r, Some("a"), "the empty name is the first export");
        assert_eq!(
            reply_kinds(&out),
            [
                REP_SERVER,
                REP_SERVER,
                REP_ACK,
                REP_ERR_UNSUP,
                REP_ERR_UNSUP,
                REP_ERR_UNKNOWN,
                REP_INFO,
                REP_ACK
            ]
        );
    }
}
