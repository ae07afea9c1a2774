//! Byte-stream transports the protocol runs over.
//!
//! The protocol only needs a reliable, ordered stream with a gather send, so a transport is a
//! [`Conn`]: TCP today ([`tcp`]), RDMA behind the `rdma` feature ([`rdma`]). The client and the
//! server are written against `Conn`, not against a socket type.

use std::io::{self, IoSlice};

pub mod rdma;
pub mod tcp;

/// One established, bidirectional connection.
pub trait Conn: Send {
    /// Sends every byte of `bufs`, in order; one gather syscall when the kernel takes it all.
    fn send(&mut self, bufs: &mut [IoSlice<'_>]) -> io::Result<()>;
    /// Fills `buf` completely or fails (`UnexpectedEof` when the peer closed).
    fn recv_exact(&mut self, buf: &mut [u8]) -> io::Result<()>;
    /// The peer's address, for error messages.
    fn peer(&self) -> &str;
    /// Bounds how long a send or receive may block (`None`: forever). A timeout surfaces as
    /// an `io::Error` of kind `WouldBlock` or `TimedOut`.
    fn set_timeout(&mut self, timeout: Option<std::time::Duration>) -> io::Result<()>;
    /// Fills `buf` by `deadline` or fails with `TimedOut`, however slowly the peer drips its
    /// bytes (a per-read timeout would let one byte every few seconds hold a connection open).
    /// The default sets one timeout for the whole read; TCP re-arms it before every read.
    fn recv_exact_by(&mut self, buf: &mut [u8], deadline: std::time::Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.set_timeout(Some(left))?;
        self.recv_exact(buf)
    }
    /// Busy-poll up to this long for a reply before sleeping in the kernel (`None`: never).
    /// Transports without the notion ignore it.
    fn set_spin(&mut self, _spin: Option<std::time::Duration>) {}
}

/// A connection to a scripted peer: sends go nowhere and receives replay `replies`, then fail
/// with `UnexpectedEof`. For tests and fuzz targets that drive a client against exact bytes.
pub struct Scripted {
    replies: Vec<u8>,
    pos: usize,
    peer: String,
}

impl Scripted {
    pub fn new(replies: Vec<u8>, peer: &str) -> Self {
        Scripted {
            replies,
            pos: 0,
            peer: peer.to_string(),
        }
    }

    /// A peer that first plays an `--insecure` server's side of the handshake (a challenge,
    /// then `HelloOk` reporting 100 pages of which 50 are free), then `replies`. For a client
    /// made with `ClientAuth::insecure`.
    pub fn after_insecure_handshake(replies: &[u8], peer: &str) -> Self {
        use crate::protocol::{encode_challenge, encode_hello_ok, NONCE_LEN, PROOF_LEN};
        let mut all = Vec::new();
        encode_challenge(&mut all, &[0x5a; NONCE_LEN]);
        encode_hello_ok(&mut all, 1, 100, 50, &[0; PROOF_LEN]);
        all.extend_from_slice(replies);
        Self::new(all, peer)
    }
}

impl Conn for Scripted {
    fn send(&mut self, _: &mut [IoSlice<'_>]) -> io::Result<()> {
        Ok(())
    }
    fn recv_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let end = self.pos + buf.len();
        if end > self.replies.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&self.replies[self.pos..end]);
        self.pos = end;
        Ok(())
    }
    fn peer(&self) -> &str {
        &self.peer
    }
    fn set_timeout(&mut self, _: Option<std::time::Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// Which transport a server listens on or a client connects with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Tcp,
    Rdma,
}
