//! The transmission half of the server: requests in, I/O on the export, replies out, in the
//! inline and the pool threading models (see the module docs of `server`).

use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::Instant;

use super::affinity::{is_loopback, CpuFollower};
use super::{Export, Server, ServerError, Session};
use crate::backend::{AlignedBuf, DIRECT_BLOCK};
use crate::nbd::protocol::*;
use crate::nbd::Stream;

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
        let started = Instant::now();
        self.execute_timed(s, r, payload, w);
        self.stats.latency.of(r.kind).record(started.elapsed());
    }

    fn execute_timed(&self, s: &Session<'_>, r: &Request, payload: &[u8], w: &mut Worker) {
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
    pub(super) fn serve_inline(
        &self,
        s: &Session<'_>,
        mut rd: BufReader<Stream>,
        mut wr: Stream,
    ) -> Result<(), ServerError> {
        let mut w = Worker::new();
        let mut payload = AlignedBuf::new(64 << 10);
        let mut follow = (self.follow_client && is_loopback(&wr)).then(|| CpuFollower::new(&wr));
        let mut batch = 0u32;
        loop {
            // Answer everything handled so far once no request is waiting in our buffer.
            if rd.buffer().is_empty() {
                if !w.out.is_empty() {
                    wr.write_all(&w.out)?;
                    w.out.clear();
                }
                if let Some(f) = follow.as_mut() {
                    f.on_batch(batch);
                }
                batch = 0;
            }
            let r = match read_request(&mut rd)? {
                Incoming::Request(r) => r,
                Incoming::Disconnect => break,
            };
            batch += 1;
            let plen = payload_len(&r);
            if payload.len() < plen {
                payload = AlignedBuf::new(plen);
            }
            if r.kind == CMD_WRITE {
                read_payload(&mut rd, &r, &mut payload.as_mut_slice()[..plen])?;
            }
            if self.zero_copy_read(s, &r) {
                self.send_read(s, &r, &mut w.out, &mut wr)?;
                continue;
            }
            self.execute(s, &r, &payload.as_slice()[..plen], &mut w);
            if w.out.len() >= self.reply_batch {
                wr.write_all(&w.out)?;
                w.out.clear();
            }
        }
        if !w.out.is_empty() {
            wr.write_all(&w.out)?;
        }
        Ok(())
    }

    /// Large buffered reads go out with sendfile (see [`Server::send_read`]).
    fn zero_copy_read(&self, s: &Session<'_>, r: &Request) -> bool {
        self.sendfile_min
            .is_some_and(|min| r.kind == CMD_READ && r.len >= min)
            && !s.export.backend.direct()
            && validate(s.export, r).is_ok()
    }

    /// Sends pending replies, then this read's reply header and its data straight from the
    /// page cache. The header promises success before the data is read: if the file then fails
    /// (an I/O error on a bad disk) the only honest move left is to drop the connection.
    fn send_read(
        &self,
        s: &Session<'_>,
        r: &Request,
        out: &mut Vec<u8>,
        wr: &mut Stream,
    ) -> Result<(), ServerError> {
        let started = Instant::now();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if s.structured {
            put_structured_reply(
                out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                r.cookie,
                8 + r.len,
            );
            out.extend_from_slice(&r.offset.to_be_bytes());
        } else {
            put_simple_reply(out, 0, r.cookie);
        }
        wr.write_all(out)?;
        out.clear();
        s.export
            .backend
            .send_to(wr.as_raw_fd(), r.offset, u64::from(r.len))?;
        self.stats
            .bytes_read
            .fetch_add(u64::from(r.len), Ordering::Relaxed);
        self.stats.latency.read.record(started.elapsed());
        Ok(())
    }

    pub(super) fn serve_pool(
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

#[cfg(test)]
mod tests {
    use super::super::test_util::export;
    use super::*;

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
        let e = export("v", true, false);
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
        let ro = export("ro", true, true);
        assert_eq!(validate(&ro, &req(CMD_WRITE, 0, 1)), Err(EPERM));
        assert_eq!(validate(&ro, &req(CMD_READ, 0, 1)), Ok(()));
    }
}
