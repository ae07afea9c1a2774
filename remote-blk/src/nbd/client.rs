//! A pipelined NBD client: what the VMM's virtio-blk backend uses to reach `vnode-blkd`,
//! `qemu-nbd` or `nbdkit`.
//!
//! [`NbdClient::connect`] takes a standard NBD URI (`nbd://HOST[:PORT]/EXPORT`,
//! `nbd+unix:///EXPORT?socket=PATH`), does the fixed-newstyle handshake with `NBD_OPT_GO`
//! (proving the export's credential with vNode's `OPT_VNODE_AUTH` first when one is given)
//! and then keeps one connection with
//! many requests in flight: [`NbdClient::submit`] sends a request and returns at once; a reader
//! thread (`nbd-client-rx`) matches replies by cookie and runs each request's completion.
//! The blocking calls (`read_at`, `write_at`, ...) are built on `submit`.
//!
//! Only simple replies are negotiated: the client needs nothing that structured replies add.
//!
//! Deadlines ([`vnode_common::deadline`]): the handshake must finish within 2 s and its round
//! trip seeds an EWMA of request times. While requests are outstanding, a server that sends
//! nothing for `max(floor, 16 x rtt, size allowance)` (the floor is 2 s, 8 s for a flush or a
//! FUA write, which wait for an fsync; at most 8 s in all; counted from the later of
//! the request's sending and the last byte received, so a large reply that keeps arriving is
//! never cut off) is declared failed: the connection is shut down and every outstanding
//! request completes with [`ClientError::Timeout`]. The reader wakes every [`TICK`] to check.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vnode_common::cred::Credential;
use vnode_common::deadline::{self, Rtt};

use thiserror::Error;

use super::auth::{self, AuthStep};
use super::protocol::*;
use super::Stream;

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ClientError {
    #[error("bad NBD URI {0:?}")]
    BadUri(String),
    #[error("connect to {addr}: {msg}")]
    Connect { addr: String, msg: String },
    #[error("socket i/o: {0}")]
    Io(String),
    #[error("malformed message from server: {0}")]
    Protocol(String),
    #[error("server is not fixed-newstyle NBD")]
    NotFixedNewstyle,
    #[error("no export named {0:?}")]
    NoSuchExport(String),
    #[error("server refused access: {0}")]
    Denied(String),
    #[error("server refused option {option} with {code:#x}: {msg}")]
    Refused { option: u32, code: u32, msg: String },
    #[error("export is read-only")]
    ReadOnly,
    #[error("request out of range or too large")]
    InvalidRequest,
    #[error("server error {} ({errno})", errno_name(*errno))]
    Remote { errno: u32 },
    #[error("connection closed")]
    Disconnected,
    #[error(
        "server {peer} sent nothing for {after_ms} ms with requests outstanding: declared failed"
    )]
    Timeout { peer: String, after_ms: u64 },
}

/// How often the reader thread wakes to check the outstanding requests' deadlines.
pub const TICK: Duration = Duration::from_millis(100);

/// A request in flight.
struct InFlight {
    /// Bytes of read data expected.
    expect: u32,
    done: Completion,
    sent: Instant,
    /// Bytes moved both ways, for the size allowance of its deadline.
    bytes: usize,
    /// The deadline's floor: longer for requests that wait for an fsync.
    floor: Duration,
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e.to_string())
    }
}

impl From<ProtocolError> for ClientError {
    fn from(e: ProtocolError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

/// Where to connect, from an NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp { host: String, port: u16 },
    Unix { path: String },
}

fn percent_decode(s: &str) -> Result<String, ClientError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ClientError::BadUri(s.to_owned()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ClientError::BadUri(s.to_owned()))
}

/// Parses `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///[EXPORT]?socket=PATH`.
pub fn parse_uri(uri: &str) -> Result<(Target, String), ClientError> {
    let bad = || ClientError::BadUri(uri.to_owned());
    let (scheme, rest) = uri.split_once("://").ok_or_else(bad)?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let export = percent_decode(path)?;
    match scheme {
        "nbd" => {
            let (host, port) = if let Some(h) = authority.strip_prefix('[') {
                // [v6]:port
                let (h, p) = h.split_once(']').ok_or_else(bad)?;
                (h, p.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                }
            };
            let port = match port {
                Some(p) => p.parse().map_err(|_| bad())?,
                None => DEFAULT_PORT,
            };
            if host.is_empty() {
                return Err(bad());
            }
            Ok((
                Target::Tcp {
                    host: host.to_owned(),
                    port,
                },
                export,
            ))
        }
        "nbd+unix" => {
            let socket = query
                .into_iter()
                .flat_map(|q| q.split('&'))
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(bad)?;
            if !authority.is_empty() {
                return Err(bad());
            }
            Ok((
                Target::Unix {
                    path: percent_decode(socket)?,
                },
                export,
            ))
        }
        _ => Err(bad()),
    }
}

/// What the server said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags (`TF_*` in `protocol`).
    pub flags: u16,
    pub read_only: bool,
    /// Block size constraints (1/4096/32 MiB when the server does not say).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

impl ExportInfo {
    pub fn can_flush(&self) -> bool {
        self.flags & TF_SEND_FLUSH != 0
    }
    pub fn can_fua(&self) -> bool {
        self.flags & TF_SEND_FUA != 0
    }
    pub fn can_trim(&self) -> bool {
        self.flags & TF_SEND_TRIM != 0
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & TF_SEND_WRITE_ZEROES != 0
    }
}

/// Connection options.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The export's credential, proven with vNode's `OPT_VNODE_AUTH` before `NBD_OPT_GO`; the
    /// server must prove it back, so a server without vNode authentication is refused.
    pub credential: Option<Credential>,
    /// Requests allowed in flight at once; `submit` blocks beyond this.
    pub max_in_flight: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            credential: None,
            max_in_flight: 128,
        }
    }
}

/// One request for [`NbdClient::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
}

/// Result of a request: the data for a read, empty for the others.
pub type Completion = Box<dyn FnOnce(Result<Vec<u8>, ClientError>) + Send>;

/// Identifies a submitted request (its NBD cookie).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle(pub u64);

struct Pending {
    map: HashMap<u64, InFlight>,
    next_cookie: u64,
    dead: bool,
}

struct Inner {
    writer: Mutex<(Stream, Vec<u8>)>,
    pending: Mutex<Pending>,
    slot_freed: Condvar,
    max_in_flight: usize,
    rtt: Rtt,
    peer: String,
}

impl Inner {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A poisoned lock means a completion panicked, and panic=abort makes that unreachable.
        self.pending.lock().expect("pending lock poisoned")
    }

    /// The deadline an outstanding request has missed, if any: no byte since `progress` (or
    /// since it was sent, if later) for longer than its deadline.
    fn overdue(&self, progress: Instant) -> Option<Duration> {
        let now = Instant::now();
        self.pending().map.values().find_map(|f| {
            let d = self.rtt.deadline_with(f.floor, f.bytes);
            (now.duration_since(f.sent.max(progress)) > d).then_some(d)
        })
    }
}

/// A connected NBD client with pipelined requests.
pub struct NbdClient {
    inner: Arc<Inner>,
    info: ExportInfo,
    rx: Option<JoinHandle<()>>,
}

impl NbdClient {
    /// Connects to `uri` and negotiates the export it names.
    pub fn connect(uri: &str, opts: &ConnectOptions) -> Result<Self, ClientError> {
        let (target, export) = parse_uri(uri)?;
        let (stream, peer) = match &target {
            Target::Tcp { host, port } => {
                let addr = format!("{host}:{port}");
                let connect_err = |e: io::Error| ClientError::Connect {
                    addr: addr.clone(),
                    msg: e.to_string(),
                };
                let mut last = io::Error::from(io::ErrorKind::NotFound);
                let mut conn = None;
                for sa in std::net::ToSocketAddrs::to_socket_addrs(&addr).map_err(connect_err)? {
                    match TcpStream::connect_timeout(&sa, deadline::HANDSHAKE) {
                        Ok(s) => {
                            conn = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = conn.ok_or_else(|| connect_err(last))?;
                (Stream::Tcp(s), addr)
            }
            Target::Unix { path } => {
                let s = UnixStream::connect(path).map_err(|e| ClientError::Connect {
                    addr: path.clone(),
                    msg: e.to_string(),
                })?;
                (Stream::Unix(s), path.clone())
            }
        };
        stream.set_nodelay()?;
        stream.set_read_timeout(Some(deadline::HANDSHAKE))?;
        stream.set_write_timeout(Some(deadline::HANDSHAKE))?;
        let start = Instant::now();
        let (s, info) = Self::handshake(stream, &export, opts)?;
        let rtt = Rtt::new(start.elapsed());
        Self::start(s, info, opts.max_in_flight.max(1), rtt, peer)
    }

    fn handshake(
        mut s: Stream,
        export: &str,
        opts: &ConnectOptions,
    ) -> Result<(Stream, ExportInfo), ClientError> {
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet)?;
        let hflags = u16::from_be_bytes([greet[16], greet[17]]);
        if greet[..8] != NBDMAGIC.to_be_bytes()
            || greet[8..16] != IHAVEOPT.to_be_bytes()
            || hflags & FLAG_FIXED_NEWSTYLE == 0
        {
            return Err(ClientError::NotFixedNewstyle);
        }
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
        s.write_all(&cflags.to_be_bytes())?;
        if let Some(c) = &opts.credential {
            authenticate(&mut s, export, c)?;
        }
        let go = InfoRequest {
            name: export.as_bytes().to_vec(),
            requests: vec![INFO_BLOCK_SIZE],
        };
        send_option(&mut s, OPT_GO, &go.encode())?;
        let mut info = ExportInfo {
            size: 0,
            flags: 0,
            read_only: false,
            min_block: 1,
            preferred_block: 4096,
            max_block: MAX_PAYLOAD,
        };
        let mut have_export = false;
        loop {
            let (r, data) = read_option_reply_raw(&mut s, OPT_GO)?;
            match r.kind {
                REP_INFO => match Info::decode(&data)? {
                    Info::Export { size, flags } => {
                        info.size = size;
                        info.flags = flags;
                        have_export = true;
                    }
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        info.min_block = min.max(1);
                        info.preferred_block = preferred;
                        info.max_block = max.min(MAX_PAYLOAD);
                    }
                    Info::Other(_) => {}
                },
                REP_ACK if have_export => break,
                REP_ACK => return Err(ClientError::Protocol("GO acked without size".into())),
                REP_ERR_UNSUP => {
                    let (size, flags) = export_name_fallback(&mut s, export, no_zeroes)?;
                    info.size = size;
                    info.flags = flags;
                    break;
                }
                code => {
                    let msg = String::from_utf8_lossy(&data).into_owned();
                    return Err(match code {
                        REP_ERR_UNKNOWN => ClientError::NoSuchExport(export.to_owned()),
                        REP_ERR_POLICY => ClientError::Denied(msg),
                        _ => refused(OPT_GO, code, msg),
                    });
                }
            }
        }
        info.read_only = info.flags & TF_READ_ONLY != 0;
        Ok((s, info))
    }

    fn start(
        s: Stream,
        info: ExportInfo,
        max_in_flight: usize,
        rtt: Rtt,
        peer: String,
    ) -> Result<Self, ClientError> {
        // The reader wakes every TICK to check deadlines; a send blocked for the ceiling means
        // the server stopped reading (the reader will usually have failed it already).
        s.set_read_timeout(Some(TICK))?;
        s.set_write_timeout(Some(deadline::CEILING))?;
        let reader = s.try_clone()?;
        let inner = Arc::new(Inner {
            writer: Mutex::new((s, Vec::with_capacity(64 << 10))),
            pending: Mutex::new(Pending {
                map: HashMap::new(),
                next_cookie: 1,
                dead: false,
            }),
            slot_freed: Condvar::new(),
            max_in_flight,
            rtt,
            peer,
        });
        let rx_inner = Arc::clone(&inner);
        let rx = thread::Builder::new()
            .name("nbd-client-rx".into())
            .spawn(move || {
                crate::threads::started(crate::threads::ClientThread::Reader);
                receive(&rx_inner, reader)
            })?;
        Ok(Self {
            inner,
            info,
            rx: Some(rx),
        })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The round-trip estimate (handshake, then an EWMA of request times).
    pub fn rtt(&self) -> Duration {
        self.inner.rtt.get()
    }

    /// The server, as connected to (`host:port` or a socket path).
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    /// Sends `cmd`; `done` runs on the client's reader thread when the reply arrives (or the
    /// connection dies). Keep it short and do not block in it. Blocks only while
    /// `max_in_flight` requests are outstanding. On `Err`, `done` has not run and never will.
    pub fn submit(&self, cmd: Command, done: Completion) -> Result<Handle, ClientError> {
        let (kind, flags, offset, len, data) = self.check(&cmd)?;
        let cookie = {
            let mut p = self.inner.pending();
            while p.map.len() >= self.inner.max_in_flight && !p.dead {
                p = self
                    .inner
                    .slot_freed
                    .wait(p)
                    .expect("pending lock poisoned");
            }
            if p.dead {
                return Err(ClientError::Disconnected);
            }
            let cookie = p.next_cookie;
            p.next_cookie += 1;
            let expect = if kind == CMD_READ { len } else { 0 };
            p.map.insert(
                cookie,
                InFlight {
                    expect,
                    done,
                    sent: Instant::now(),
                    bytes: expect as usize + data.len(),
                    floor: if kind == CMD_FLUSH || flags & CMD_FLAG_FUA != 0 {
                        deadline::DURABLE_FLOOR
                    } else {
                        deadline::STORAGE_FLOOR
                    },
                },
            );
            cookie
        };
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        if let Err(e) = self.send(&req, data) {
            // If the reader already failed it, its completion ran: report success of the submit.
            let mut p = self.inner.pending();
            if p.map.remove(&cookie).is_some() {
                return Err(e.into());
            }
        }
        Ok(Handle(cookie))
    }

    /// Validates a command against the export; returns its wire fields.
    fn check<'a>(&self, cmd: &'a Command) -> Result<(u16, u16, u64, u32, &'a [u8]), ClientError> {
        let fua = |f: bool| if f { CMD_FLAG_FUA } else { 0 };
        let (kind, flags, offset, len, data): (u16, u16, u64, u32, &[u8]) = match cmd {
            Command::Read { offset, len } => (CMD_READ, 0, *offset, *len, &[]),
            Command::Write {
                offset,
                data,
                fua: f,
            } => {
                let len = u32::try_from(data.len()).map_err(|_| ClientError::InvalidRequest)?;
                (CMD_WRITE, fua(*f), *offset, len, data)
            }
            Command::Flush => (CMD_FLUSH, 0, 0, 0, &[]),
            Command::Trim { offset, len } => (CMD_TRIM, 0, *offset, *len, &[]),
            Command::WriteZeroes {
                offset,
                len,
                fua: f,
            } => (CMD_WRITE_ZEROES, fua(*f), *offset, *len, &[]),
        };
        if self.info.read_only && kind != CMD_READ && kind != CMD_FLUSH {
            return Err(ClientError::ReadOnly);
        }
        if matches!(kind, CMD_READ | CMD_WRITE) && len > self.info.max_block {
            return Err(ClientError::InvalidRequest);
        }
        Ok((kind, flags, offset, len, data))
    }

    fn send(&self, req: &Request, data: &[u8]) -> io::Result<()> {
        let mut guard = self.inner.writer.lock().expect("writer lock poisoned");
        let (s, buf) = &mut *guard;
        let res = if data.len() <= 64 << 10 {
            buf.clear();
            buf.extend_from_slice(&req.encode());
            buf.extend_from_slice(data);
            s.write_all(buf)
        } else {
            s.write_all(&req.encode()).and_then(|()| s.write_all(data))
        };
        if res.is_err() {
            // A partly sent request leaves the stream unusable: end it, the reader fails the rest.
            let _ = s.shutdown();
        }
        res
    }

    /// Submits `cmd` and waits for its result.
    fn call(&self, cmd: Command) -> Result<Vec<u8>, ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            cmd,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        rx.recv().map_err(|_| ClientError::Disconnected)?
    }

    /// Reads `buf.len()` bytes at `offset`, split into requests the server accepts and all
    /// in flight at once.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ClientError> {
        let chunk = self.info.max_block as usize;
        let rxs = buf
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                let (tx, rx) = mpsc::sync_channel(1);
                self.submit(
                    Command::Read {
                        offset: offset + (i * chunk) as u64,
                        len: c.len() as u32,
                    },
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                )?;
                Ok(rx)
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        for (rx, c) in rxs.into_iter().zip(buf.chunks_mut(chunk)) {
            let data = rx.recv().map_err(|_| ClientError::Disconnected)??;
            if data.len() != c.len() {
                return Err(ClientError::Protocol("short read".into()));
            }
            c.copy_from_slice(&data);
        }
        Ok(())
    }

    /// Writes `data` at `offset`; with `fua` it is durable when this returns.
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ClientError> {
        let chunk = self.info.max_block as usize;
        let rxs = data
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                let (tx, rx) = mpsc::sync_channel(1);
                let cmd = Command::Write {
                    offset: offset + (i * chunk) as u64,
                    data: c.to_vec(),
                    fua,
                };
                self.submit(
                    cmd,
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                )?;
                Ok(rx)
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        for rx in rxs {
            rx.recv().map_err(|_| ClientError::Disconnected)??;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), ClientError> {
        self.call(Command::Flush).map(drop)
    }

    pub fn trim(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(Command::Trim { offset, len }).map(drop)
    }

    pub fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), ClientError> {
        self.call(Command::WriteZeroes { offset, len, fua })
            .map(drop)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner.pending().map.len()
    }

    /// The bound on requests in flight; a device that must never block can submit only while
    /// `in_flight() < max_in_flight()` (it is the only submitter, so the check holds).
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight
    }
}

impl Drop for NbdClient {
    /// Sends DISC and half-closes: the server answers what is in flight, then closes, and the
    /// reader thread runs the remaining completions and ends.
    fn drop(&mut self) {
        if let Ok(mut w) = self.inner.writer.lock() {
            let disc = Request {
                flags: 0,
                kind: CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            };
            let _ = w.0.write_all(&disc.encode());
            if let Stream::Tcp(t) = &w.0 {
                let _ = t.shutdown(std::net::Shutdown::Write);
            } else if let Stream::Unix(u) = &w.0 {
                let _ = u.shutdown(std::net::Shutdown::Write);
            }
        }
        if let Some(rx) = self.rx.take() {
            let _ = rx.join();
        }
    }
}

/// The reader thread: completes requests as replies arrive; fails them all when the
/// connection ends.
fn receive(inner: &Inner, mut s: Stream) {
    let mut progress = Progress {
        byte: Instant::now(),
        reply: Instant::now(),
    };
    let err = loop {
        match receive_one(inner, &mut s, &mut progress) {
            Ok(()) => {}
            Err(e) => break e,
        }
    };
    match &err {
        ClientError::Timeout { .. } => tracing::warn!(error = %err, "nbd server failed"),
        _ => tracing::debug!(error = %err, "nbd client connection ended"),
    }
    // Wakes a writer blocked on a server that stopped reading.
    let _ = s.shutdown();
    let failed = match err {
        e @ ClientError::Timeout { .. } => e,
        _ => ClientError::Disconnected,
    };
    let drained: Vec<_> = {
        let mut p = inner.pending();
        p.dead = true;
        p.map.drain().map(|(_, f)| f.done).collect()
    };
    inner.slot_freed.notify_all();
    for done in drained {
        done(Err(failed.clone()));
    }
}

/// When the reader last received a byte, and a whole reply.
struct Progress {
    byte: Instant,
    reply: Instant,
}

/// Fills `buf`, waking every TICK to fail the connection if a request is past its deadline
/// (an outstanding one, or `current`: the one whose reply is being read, no longer listed).
fn read_full(
    inner: &Inner,
    s: &mut Stream,
    buf: &mut [u8],
    progress: &mut Progress,
    current: Option<Duration>,
) -> Result<(), ClientError> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(ClientError::Disconnected),
            Ok(n) => {
                got += n;
                progress.byte = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                let current = current.filter(|d| progress.byte.elapsed() > *d);
                if let Some(d) = current.or_else(|| inner.overdue(progress.byte)) {
                    return Err(ClientError::Timeout {
                        peer: inner.peer.clone(),
                        after_ms: d.as_millis() as u64,
                    });
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn receive_one(inner: &Inner, s: &mut Stream, progress: &mut Progress) -> Result<(), ClientError> {
    let mut hdr = [0u8; SIMPLE_REPLY_LEN];
    read_full(inner, s, &mut hdr, progress, None)?;
    let (errno, cookie) = decode_simple_reply(&hdr)?;
    let Some(f) = inner.pending().map.remove(&cookie) else {
        return Err(ClientError::Protocol(format!(
            "reply to unknown cookie {cookie}"
        )));
    };
    let now = Instant::now();
    inner.rtt.observe(now - f.sent.max(progress.reply));
    progress.reply = now;
    inner.slot_freed.notify_one();
    if errno != 0 {
        (f.done)(Err(ClientError::Remote { errno }));
        return Ok(());
    }
    let mut data = vec![0u8; f.expect as usize];
    let current = Some(inner.rtt.deadline_with(f.floor, f.bytes));
    if let Err(e) = read_full(inner, s, &mut data, progress, current) {
        (f.done)(Err(e.clone()));
        return Err(e);
    }
    (f.done)(Ok(data));
    Ok(())
}

/// `OPT_VNODE_AUTH` (see "Access control" in `protocol.rs`): checks the server's proof before
/// sending its own, so an impostor learns nothing it can use.
fn authenticate(s: &mut Stream, export: &str, c: &Credential) -> Result<(), ClientError> {
    let opt = OPT_VNODE_AUTH;
    let cn = vnode_common::cred::nonce().map_err(|e| ClientError::Io(e.to_string()))?;
    let name = export.as_bytes();
    let start = AuthStep::Start {
        client_nonce: cn,
        export: name.to_vec(),
    };
    send_option(s, opt, &start.encode())?;
    let (r, data) = read_option_reply_raw(s, opt)?;
    match r.kind {
        REP_VNODE_CHALLENGE => {}
        REP_ERR_UNSUP => {
            return Err(ClientError::Denied(
                "the server does not do vNode authentication (an --insecure vnode-blkd, another NBD server, or an impostor); refusing to use it with a credential".into(),
            ))
        }
        code => {
            return Err(refused(opt, code, String::from_utf8_lossy(&data).into_owned()))
        }
    }
    let (sn, server_proof) =
        auth::decode_challenge(&data).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if !auth::check_server_proof(c, &cn, &sn, name, &server_proof) {
        return Err(ClientError::Denied(
            "the server did not prove it holds the cluster key (an impostor?)".into(),
        ));
    }
    let prove = AuthStep::Prove {
        proof: auth::client_proof(c, &sn, &cn, name),
    };
    send_option(s, opt, &prove.encode())?;
    let (r, msg) = read_option_reply(s, opt)?;
    match r.kind {
        REP_ACK => Ok(()),
        REP_ERR_POLICY => Err(ClientError::Denied(format!("credential refused: {msg}"))),
        code => Err(refused(opt, code, msg)),
    }
}

fn refused(option: u32, code: u32, msg: String) -> ClientError {
    ClientError::Refused { option, code, msg }
}

fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let h = OptionHeader {
        option,
        len: data.len() as u32,
    };
    let mut b = h.encode().to_vec();
    b.extend_from_slice(data);
    s.write_all(&b)
}

fn read_option_reply_raw(
    s: &mut Stream,
    option: u32,
) -> Result<(OptionReply, Vec<u8>), ClientError> {
    let mut hdr = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut hdr)?;
    let r = OptionReply::decode(&hdr)?;
    if r.option != option {
        return Err(ClientError::Protocol(format!(
            "reply for option {} to option {option}",
            r.option
        )));
    }
    if r.len > MAX_OPTION_LEN {
        return Err(ClientError::Protocol(format!(
            "option reply of {} bytes",
            r.len
        )));
    }
    let mut data = vec![0u8; r.len as usize];
    s.read_exact(&mut data)?;
    Ok((r, data))
}

fn read_option_reply(s: &mut Stream, option: u32) -> Result<(OptionReply, String), ClientError> {
    let (r, data) = read_option_reply_raw(s, option)?;
    Ok((r, String::from_utf8_lossy(&data).into_owned()))
}

/// Old servers without `NBD_OPT_GO`: `NBD_OPT_EXPORT_NAME` returns size and flags directly.
fn export_name_fallback(
    s: &mut Stream,
    export: &str,
    no_zeroes: bool,
) -> Result<(u64, u16), ClientError> {
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b)
        .map_err(|_| ClientError::NoSuchExport(export.to_owned()))?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&b[..8]);
    Ok((u64::from_be_bytes(size), u16::from_be_bytes([b[8], b[9]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_uris() {
        assert_eq!(
            parse_uri("nbd://127.0.0.1:1234/disk").expect("valid"),
            (
                Target::Tcp {
                    host: "127.0.0.1".into(),
                    port: 1234
                },
                "disk".into()
            )
        );
        assert_eq!(
            parse_uri("nbd://host").expect("valid"),
            (
                Target::Tcp {
                    host: "host".into(),
                    port: DEFAULT_PORT
                },
                String::new()
            )
        );
        assert_eq!(
            parse_uri("nbd://[::1]:99/a%20b").expect("valid"),
            (
                Target::Tcp {
                    host: "::1".into(),
                    port: 99
                },
                "a b".into()
            )
        );
    }

    #[test]
    fn parses_unix_uris() {
        assert_eq!(
            parse_uri("nbd+unix:///disk?socket=/tmp/s.sock").expect("valid"),
            (
                Target::Unix {
                    path: "/tmp/s.sock".into()
                },
                "disk".into()
            )
        );
    }

    #[test]
    fn rejects_bad_uris() {
        for u in [
            "http://x/y",
            "nbd:///x",
            "nbd://h:notaport/x",
            "nbd+unix:///x",
            "nbd://h/%zz",
        ] {
            assert!(parse_uri(u).is_err(), "{u}");
        }
    }
}
