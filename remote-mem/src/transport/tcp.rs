//! TCP transport: TCP_NODELAY, one `writev` per send, a read buffer so that a reply header and
//! its page usually arrive in one `recv`.

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::Conn;

/// Read buffer size: a few pages, so small pipelined replies are read in one syscall.
const READ_BUF: usize = 64 * 1024;

pub struct TcpConn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    peer: String,
    spin: Option<Duration>,
}

/// Busy-waits up to `limit` for `s` to have data (or an error/EOF) to read, without consuming
/// it. Returns whether it became readable. Saves the wake-up of a sleeping reader, which costs
/// more than a loopback round trip when the peer runs on another core.
pub fn spin_until_readable(s: &TcpStream, limit: Duration) -> bool {
    let fd = s.as_raw_fd();
    let start = Instant::now();
    let mut byte = 0u8;
    loop {
        // SAFETY: peeks at most one byte into a live local; MSG_PEEK leaves the data queued and
        // MSG_DONTWAIT keeps the call from blocking. `fd` is owned by `s`, open for the call.
        let n = unsafe {
            libc::recv(
                fd,
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return true;
        }
        let err = io::Error::last_os_error().kind();
        if err != io::ErrorKind::WouldBlock && err != io::ErrorKind::Interrupted {
            return true; // let the real read report it
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::hint::spin_loop();
    }
}

impl TcpConn {
    /// Connects to `addr`, giving up after [`vnode_common::deadline::HANDSHAKE`] (an
    /// unreachable host would otherwise hold the caller for the kernel's SYN retries, minutes).
    pub fn connect(addr: &str) -> io::Result<TcpConn> {
        let mut last = io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing");
        for sa in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&sa, vnode_common::deadline::HANDSHAKE) {
                Ok(s) => return TcpConn::from_stream(s, addr.to_string()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Wraps an accepted or connected stream.
    pub fn from_stream(s: TcpStream, peer: String) -> io::Result<TcpConn> {
        s.set_nodelay(true)?;
        let reader = BufReader::with_capacity(READ_BUF, s.try_clone()?);
        Ok(TcpConn {
            writer: s,
            reader,
            peer,
            spin: None,
        })
    }

    /// The underlying socket, e.g. to shut it down from another thread.
    pub fn stream(&self) -> &TcpStream {
        &self.writer
    }
}

impl Conn for TcpConn {
    fn send(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        while !bufs.is_empty() {
            match self.writer.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if let Some(limit) = self.spin {
            if self.reader.buffer().len() < buf.len() {
                spin_until_readable(&self.writer, limit);
            }
        }
        self.reader.read_exact(buf)
    }

    fn recv_exact_by(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.writer.set_read_timeout(Some(left))?;
            match self.reader.read(&mut buf[filled..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn set_spin(&mut self, spin: Option<Duration>) {
        self.spin = spin;
    }

    fn peer(&self) -> &str {
        &self.peer
    }

    fn set_timeout(&mut self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        // The reader is a clone of the same socket: one setsockopt covers both directions.
        self.writer.set_read_timeout(timeout)?;
        self.writer.set_write_timeout(timeout)
    }
}
