//! NBD wire protocol: constants, fixed-size headers and the option/request decoders.
//!
//! This is the plain-code half of the NBD implementation (no sockets): both `server.rs` and
//! `client.rs` build on it, and `fuzz/` feeds its decoders arbitrary bytes.
//!
//! # Protocol
//!
//! vNode speaks the *fixed newstyle* NBD protocol (the one `qemu-nbd`, `nbdkit`, libnbd and the
//! Linux kernel client use; see the upstream `proto.md`). All integers are big-endian.
//! There is no protocol version field of our own: the version is "fixed newstyle", and the
//! handshake's flag words and option replies are how the two ends agree on extensions.
//!
//! ## Handshake state machine (server view)
//!
//! ```text
//!  accept
//!    |  S: "NBDMAGIC" u64, "IHAVEOPT" u64, handshake flags u16 (FIXED_NEWSTYLE|NO_ZEROES)
//!    v
//!  [ClientFlags]  C: u32 flags; unknown bits or no FIXED_NEWSTYLE -> close
//!    v
//!  [Options] <---------------------------------------------------------+
//!    |  C: "IHAVEOPT" u64, option u32, length u32, data[length]        |
//!    |  S: per option one or more replies:                             |
//!    |     magic 0x3e889045565a9 u64, option u32, type u32, len u32    |
//!    |                                                                 |
//!    +-- LIST               -> REP_SERVER per export, ACK -------------+
//!    +-- INFO               -> REP_INFO..., ACK (or REP_ERR_*) --------+
//!    +-- STRUCTURED_REPLY   -> ACK, later replies are structured ------+
//!    +-- VNODE_AUTH step 1  -> REP_VNODE_CHALLENGE (server nonce+proof)+
//!    +-- VNODE_AUTH step 2  -> ACK if the proof is right, ERR_POLICY --+
//!    |                         (the 3rd failure on a connection: close)
//!    +-- unknown/unsupported-> ERR_UNSUP ------------------------------+
//!    +-- ABORT              -> ACK, close
//!    +-- EXPORT_NAME        -> size u64, flags u16, [124 zero bytes] --> [Transmission]
//!    |                         (unknown export or denied: close, no reply possible)
//!    +-- GO                 -> REP_INFO..., ACK --------------------------> [Transmission]
//!                              (REP_ERR_UNKNOWN / REP_ERR_POLICY: stay in Options)
//!
//!  [Transmission]
//!    C: request  magic 0x25609513 u32, flags u16, type u16, cookie u64, offset u64, len u32
//!       (28 bytes) + len bytes of data for WRITE
//!    S: simple reply  magic 0x67446698 u32, error u32, cookie u64 (16 bytes) + data for READ
//!       or, once STRUCTURED_REPLY was acknowledged, structured chunks:
//!       magic 0x668e33ef u32, flags u16, type u16, cookie u64, length u32 (20 bytes) + payload
//!    DISC -> no reply, the server closes after finishing the requests before it.
//! ```
//!
//! Replies may come in any order; the cookie (a.k.a. handle) matches them to requests, so a
//! client may keep many requests in flight on one connection.
//!
//! ## Access control: a challenge-response option (no secret on the wire), not TLS
//!
//! `vnode-blkd` holds the cluster key. Each export's credential is
//! `HMAC-SHA256(cluster_key, "vnode-blk-v1" || export name)` (`vnode_common::cred`), so the
//! manager hands a vNode only its own export's credential, and the server derives it itself.
//! Exports require it unless started `--public` (or the whole server `--insecure`). A client
//! proves it holds the credential with vNode's own option, [`OPT_VNODE_AUTH`], in two steps
//! sent before `NBD_OPT_GO`; all data big-endian like the rest of NBD:
//!
//! ```text
//!  C: VNODE_AUTH  step u8 = 1, client_nonce [32], name_len u16, export name
//!  S: reply REP_VNODE_CHALLENGE: server_nonce [32],
//!       server_proof = HMAC(cred, "vnode-blk-v1 server" || 0 || client_nonce || server_nonce || name)
//!  C: VNODE_AUTH  step u8 = 2, client_proof = HMAC(cred, "vnode-blk-v1 client" || 0 ||
//!       server_nonce || client_nonce || name) [32]
//!  S: ACK (the connection may now use that export) or ERR_POLICY
//! ```
//!
//! The client checks `server_proof` before it answers, so a server without the cluster key is
//! detected; fresh nonces on both sides make recorded bytes useless on another connection;
//! only proofs cross the wire. A server without a cluster key (`--insecure`) answers
//! `ERR_UNSUP`, as qemu-nbd and nbdkit do, and our client then refuses to go on if it was given
//! a credential (it cannot tell such a server from an impostor). After three failed proofs on
//! one connection the server closes it. A protected export is absent from `NBD_OPT_LIST` and
//! refused by `INFO`/`GO` (`ERR_POLICY`) and `EXPORT_NAME` (close) until the option succeeded
//! for it; unknown names go through step 1 like known ones (the credential is derived from the
//! name), so the option does not reveal which exports exist.
//!
//! The option and reply numbers are vNode's private ones, `0x764e_xxxx` ("vN"), far from the
//! numbers the NBD specification allocates (all below 0x100); servers that do not know the
//! option answer `ERR_UNSUP`. Why not NBD's standard STARTTLS with a pre-shared key (what
//! qemu-nbd and nbdkit do with GnuTLS): rustls has no TLS 1.3 external-PSK support, and TLS with
//! x509 certificates through rustls is not done yet (see the README). So the transmission
//! phase is not encrypted: an on-path observer can read the disk's blocks, but never a key or
//! credential, and cannot authenticate as anyone.

use thiserror::Error;

/// "NBDMAGIC": first word the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server -> client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flags (client -> server).
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// vNode's private challenge-response option ("vN" + 2, far from the standard numbers; "vN" + 1
/// carried a secret in clear in earlier versions and is no longer understood).
pub const OPT_VNODE_AUTH: u32 = 0x764e_0002;
/// The server's reply to `OPT_VNODE_AUTH` step 1: its nonce and proof.
pub const REP_VNODE_CHALLENGE: u32 = 0x764e_0002;
/// Bytes of a nonce or proof in `OPT_VNODE_AUTH`.
pub const AUTH_NONCE_LEN: usize = 32;
/// Label of the client's proof.
pub const AUTH_CLIENT_LABEL: &[u8] = b"vnode-blk-v1 client";
/// Label of the server's proof.
pub const AUTH_SERVER_LABEL: &[u8] = b"vnode-blk-v1 server";
/// Failed proofs one connection may make before it is closed.
pub const MAX_AUTH_FAILURES: u32 = 3;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Information types in `NBD_REP_INFO` / requested by INFO and GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Transmission error values (errno-like, fixed by the protocol).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE payload the server accepts (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload the server reads; longer options are skipped and refused.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Longest export name / secret accepted (the spec caps names at 4096 bytes).
pub const MAX_NAME_LEN: usize = 4096;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header on the wire.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of a client option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// What went wrong while decoding bytes from the peer.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("message truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("name of {0} bytes is too long")]
    NameTooLong(usize),
    #[error("option data has {0} trailing bytes")]
    TrailingBytes(usize),
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

fn need(buf: &[u8], n: usize) -> Result<(), ProtocolError> {
    if buf.len() < n {
        return Err(ProtocolError::Truncated {
            need: n,
            have: buf.len(),
        });
    }
    Ok(())
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Decodes the 28-byte header; the WRITE payload, if any, follows it on the wire.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        need(buf, REQUEST_LEN)?;
        let magic = be_u32(buf, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadMagic(u64::from(magic)));
        }
        Ok(Self {
            flags: be_u16(buf, 4),
            kind: be_u16(buf, 6),
            cookie: be_u64(buf, 8),
            offset: be_u64(buf, 16),
            len: be_u32(buf, 24),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Appends a simple reply header.
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Decodes a simple reply header: (error, cookie).
pub fn decode_simple_reply(buf: &[u8]) -> Result<(u32, u64), ProtocolError> {
    need(buf, SIMPLE_REPLY_LEN)?;
    let magic = be_u32(buf, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic(u64::from(magic)));
    }
    Ok((be_u32(buf, 4), be_u64(buf, 8)))
}

/// Appends a structured reply chunk header.
pub fn put_structured_reply(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A client option header; `len` bytes of option data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        need(buf, OPTION_HEADER_LEN)?;
        let magic = be_u64(buf, 0);
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadMagic(magic));
        }
        Ok(Self {
            option: be_u32(buf, 8),
            len: be_u32(buf, 12),
        })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the information types asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<Self, ProtocolError> {
        need(data, 4)?;
        let name_len = be_u32(data, 0) as usize;
        if name_len > MAX_NAME_LEN {
            return Err(ProtocolError::NameTooLong(name_len));
        }
        let name_end = 4 + name_len;
        need(data, name_end + 2)?;
        let name = data[4..name_end].to_vec();
        let count = usize::from(be_u16(data, name_end));
        let end = name_end + 2 + 2 * count;
        need(data, end)?;
        if data.len() > end {
            return Err(ProtocolError::TrailingBytes(data.len() - end));
        }
        let requests = (0..count)
            .map(|i| be_u16(data, name_end + 2 + 2 * i))
            .collect();
        Ok(Self { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.name);
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// An option reply header; `len` bytes of reply data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub kind: u32,
    pub len: u32,
}

impl OptionReply {
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        need(buf, OPTION_REPLY_HEADER_LEN)?;
        let magic = be_u64(buf, 0);
        if magic != REPLY_MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        Ok(Self {
            option: be_u32(buf, 8),
            kind: be_u32(buf, 12),
            len: be_u32(buf, 16),
        })
    }

    /// Encodes the header followed by `data`.
    pub fn encode_with(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
        b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    pub fn is_error(&self) -> bool {
        self.kind & REP_ERR != 0
    }
}

/// `NBD_INFO_EXPORT` payload: type, size, transmission flags.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` payload: type, minimum, preferred, maximum.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

/// A decoded `NBD_REP_INFO` payload (the kinds the client uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    BlockSize { min: u32, preferred: u32, max: u32 },
    Other(u16),
}

impl Info {
    pub fn decode(data: &[u8]) -> Result<Self, ProtocolError> {
        need(data, 2)?;
        match be_u16(data, 0) {
            INFO_EXPORT => {
                need(data, 12)?;
                Ok(Info::Export {
                    size: be_u64(data, 2),
                    flags: be_u16(data, 10),
                })
            }
            INFO_BLOCK_SIZE => {
                need(data, 14)?;
                Ok(Info::BlockSize {
                    min: be_u32(data, 2),
                    preferred: be_u32(data, 6),
                    max: be_u32(data, 10),
                })
            }
            other => Ok(Info::Other(other)),
        }
    }
}

/// Decodes the `NBD_REP_SERVER` payload of `NBD_OPT_LIST`: the export name.
pub fn decode_rep_server(data: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    need(data, 4)?;
    let len = be_u32(data, 0) as usize;
    if len > MAX_NAME_LEN {
        return Err(ProtocolError::NameTooLong(len));
    }
    need(data, 4 + len)?;
    Ok(data[4..4 + len].to_vec())
}

/// Encodes the `NBD_REP_SERVER` payload for one export name.
pub fn encode_rep_server(name: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name);
    b
}

/// Human-readable name of a transmission error value, for logs and client errors.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 4096,
            len: 512,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn request_rejects_bad_magic_and_short_input() {
        let mut b = Request {
            flags: 0,
            kind: 0,
            cookie: 1,
            offset: 0,
            len: 1,
        }
        .encode();
        assert!(matches!(
            Request::decode(&b[..10]),
            Err(ProtocolError::Truncated { need: 28, have: 10 })
        ));
        b[0] ^= 1;
        assert!(matches!(
            Request::decode(&b),
            Err(ProtocolError::BadMagic(_))
        ));
    }

    #[test]
    fn info_request_round_trips_and_rejects_trailing_bytes() {
        let r = InfoRequest {
            name: b"disk".to_vec(),
            requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let mut b = r.encode();
        assert_eq!(InfoRequest::decode(&b), Ok(r));
        b.push(0);
        assert_eq!(
            InfoRequest::decode(&b),
            Err(ProtocolError::TrailingBytes(1))
        );
    }

    #[test]
    fn info_request_rejects_huge_name() {
        let mut b = vec![0u8; 8];
        b[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            InfoRequest::decode(&b),
            Err(ProtocolError::NameTooLong(_))
        ));
    }

    #[test]
    fn option_header_and_reply_round_trip() {
        let h = OptionHeader {
            option: OPT_GO,
            len: 10,
        };
        assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        let r = OptionReply::encode_with(OPT_GO, REP_ERR_POLICY, b"no");
        let d = OptionReply::decode(&r).expect("valid reply");
        assert_eq!(d.kind, REP_ERR_POLICY);
        assert!(d.is_error());
        assert_eq!(d.len, 2);
    }

    #[test]
    fn info_payloads_decode() {
        assert_eq!(
            Info::decode(&encode_info_export(1 << 30, TF_HAS_FLAGS)),
            Ok(Info::Export {
                size: 1 << 30,
                flags: TF_HAS_FLAGS
            })
        );
        assert_eq!(
            Info::decode(&encode_info_block_size(1, 4096, MAX_PAYLOAD)),
            Ok(Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_PAYLOAD
            })
        );
        assert_eq!(
            decode_rep_server(&encode_rep_server(b"x")),
            Ok(b"x".to_vec())
        );
    }

    #[test]
    fn simple_reply_round_trips() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, EINVAL, 7);
        assert_eq!(decode_simple_reply(&out), Ok((EINVAL, 7)));
    }
}
