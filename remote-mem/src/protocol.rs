//! The vNode memory protocol: what a memory client and `vnode-memd` say to each other.
//!
//! Every frame, in both directions, is a fixed 16-byte header followed by `len` bytes of body.
//! All integers are little-endian.
//!
//! ```text
//!  0      2   3   4        8                16
//!  +------+---+---+--------+----------------+----------------
//!  |magic |ver|op | len u32|    tag u64     |  body (len bytes)
//!  +------+---+---+--------+----------------+----------------
//! ```
//!
//! `magic` is [`MAGIC`], `ver` is [`VERSION`]; a frame with another magic or version is refused.
//! `tag` is chosen by the client and echoed in the reply. Requests on one connection are
//! served in order and replies come back in the same order, so a client may pipeline: send many
//! requests, then read the replies. `len` is bounded per op ([`Op::max_body`]); a header whose
//! `len` is larger is refused before any of the body is read.
//!
//! Request bodies (client to server):
//!
//! | op | body |
//! |---|---|
//! | `Hello` | vnode_id u64, role u8, 7 reserved bytes (0), client_nonce [32], client_proof [32] |
//! | `Alloc` | region u64, pages u64 |
//! | `Free` | region u64 |
//! | `Read` | region u64, count u32, reserved u32 (0), count x page u64 |
//! | `Write` | region u64, count u32, reserved u32 (0), count x page u64, count x 4096 bytes |
//! | `Migrate` | region u64, addr_len u16, target server address (UTF-8) |
//! | `Open` | region u64, pages u64 (the size the client expects; 0: any) |
//! | `Ping` | empty (keeps an idle connection alive; answered `Done`) |
//! | `MigrateIn` | region u64, pages u64 (role 1 only: a region migrating in, see below) |
//! | `Commit` | region u64 (role 1 only: the migrated region becomes this server's) |
//!
//! Server bodies (server to client):
//!
//! | op | body |
//! |---|---|
//! | `Challenge` | server_nonce [32]: the first frame of every connection, tag 0 |
//! | `HelloOk` | capacity_pages u64, free_pages u64, server_proof [32] |
//! | `Done` | empty (Alloc, Free, Write, Migrate, Ping succeeded) |
//! | `Opened` | pages u64: the size of the region opened |
//! | `Data` | count x 4096 bytes, in the order the pages were asked for |
//! | `Error` | code u16, msg_len u16, msg (UTF-8) |
//!
//! ## Authentication: mutual challenge-response, no secret on the wire
//!
//! The client holds a 32-byte key `K` for its `role` (see `vnode_common::cred`): role 0, a vNode,
//! `K = HMAC(cluster_key, "vnode-mem-v1" || vnode_id)`, its own credential; role 1, a memory
//! server migrating a region of vNode `vnode_id` here, `K = HMAC(cluster_key,
//! "vnode-mem-server-v1")`. The server holds the cluster key and derives `K` itself. With
//! `parts = server_nonce || client_nonce || vnode_id u64 LE || role u8`:
//!
//! ```text
//!   S -> C  Challenge  server_nonce (fresh random)
//!   C -> S  Hello      vnode_id, role, client_nonce (fresh random),
//!                      client_proof = HMAC(K, "vnode-mem-v2 client" || 0 || parts)
//!   S -> C  HelloOk    capacity, free, server_proof = HMAC(K, "vnode-mem-v2 server" || 0 || parts)
//! ```
//!
//! The server checks `client_proof`, so only a holder of `K` gets in; the client checks
//! `server_proof`, so a server that does not hold the cluster key is detected. Fresh nonces on
//! both sides make a recorded handshake useless on another connection. After `HelloOk`, every
//! request acts on the regions of the authenticated `vnode_id` and no request carries a vNode
//! id. A server started `--insecure` (no cluster key) accepts any proof and sends a zero
//! `server_proof`; only a client that is itself insecure accepts that.
//!
//! Regions are named by (vNode id of the connection, region number): one vNode never sees
//! another's regions. A region outlives the connection that allocated it: `Alloc` creates one
//! (refused if it exists), `Open` attaches to one that exists (refused with `NoRegion` if it
//! does not, `Moved` if it was migrated, `SizeMismatch` if its size is not the one asked for),
//! which is how a restored or migrated VMM takes over its guest RAM; `Free` ends it.
//!
//! A version grows by new ops only, never by changing a frame that exists: `Open`/`Opened` and
//! `SizeMismatch` were added to version 1 this way. Version 2 changed the handshake (the
//! challenge-response above), which old clients cannot speak, hence the new version number. A server that predates an op refuses it as an unknown
//! op (`Malformed`) and closes the connection, so a client learns the server is too old.
//!
//! `Migrate` makes this server connect to `target` as role 1 for the connection's vNode, check
//! that `target` proves it holds the cluster key, create the region there and copy it. The
//! target learns nothing secret (it sees a proof over nonces); a target that is not a real
//! server fails its proof and nothing is sent to it.
//!
//! ## Live migration (`Migrate`, served by `server/migrate.rs`)
//!
//! Who asks: anyone authenticated for the vNode: the vNode itself, or an operator or the
//! manager holding the cluster key and connecting as role 1 (`vnode-memd migrate`). The
//! operator is the intended trigger: draining or balancing servers is the cluster's decision,
//! and the VMM needs to do nothing, since it follows the region by itself. The `Migrate` reply
//! comes when the migration has finished (or failed).
//!
//! ```text
//!   source                                          target (role-1 connection)
//!   start tracking writes (dirty bitmap)
//!   MigrateIn region, pages        ------------->   incoming region: capacity taken, invisible
//!                                                   to every other connection, dropped if this
//!                                                   connection ends before Commit
//!   pass 1: Write every non-zero page  --------->   (pipelined, 256 pages per frame)
//!   pass 2..: Write the pages written meanwhile ->  (until few are left, or 8 passes)
//!   switch: hold off the region's requests,
//!   Write the last dirty pages     ------------->
//!   Commit region                  ------------->   the region is the target's (memory log:
//!                                  <-------------   renamed into place), Done
//!   region marked moved: requests get Error Moved "region N moved to ADDR"; the copy freed
//! ```
//!
//! While the copy runs, the region keeps serving reads and writes; only requests that arrive
//! during the switch wait (for the last dirty pages and one round trip). A client that gets
//! `Moved` connects to ADDR with its own credential and retries. Exactly one server owns the
//! region at every moment: the source until `Commit` is acknowledged, the target from then on.
//! If the target or the connection fails before that, the source keeps the region and the
//! target drops its incoming copy; if the `Commit` reply is lost, the source frees the
//! target's copy with a role-1 `Free` before it goes on serving. Known gap: with `--data-dir`,
//! a source killed between the target's commit and its own removal of the region's file finds
//! that file again at restart (a second, stale copy) until the manager reconciles them.
//!
//! Connection state machine (server side):
//!
//! ```text
//!   accept --> (over --max-connections: Error Busy, close; no thread is started)
//!     | S: Challenge
//!     v
//!   AwaitHello --Hello, proof valid--> Ready --(any request)--> Ready
//!     |  whole handshake within the                |  idle longer than --idle-timeout: close
//!     |  handshake deadline, else close            |
//!     | anything else, bad proof,                  | bad magic/version, unknown op,
//!     v old version                                v oversized or malformed frame
//!   Error reply, close                           Error reply, close
//! ```
//!
//! A client of an older version sends a frame with its own version byte; the server answers
//! `Error` (`Version`) naming both versions, and closes.
//!
//! In `Ready`, a well-formed request that cannot be done (unknown region, page out of range,
//! capacity exhausted, per-vNode limit reached, no room in the data directory, region moved)
//! gets an `Error` reply and the connection stays open.
//! A frame the server cannot parse ends the connection after the `Error` reply, because the
//! byte stream can no longer be trusted to be in step.

use thiserror::Error;

/// First two bytes of every frame ("vM").
pub const MAGIC: u16 = 0x4d76;
/// Protocol version spoken by this crate.
pub const VERSION: u8 = 2;
/// Size of a page, the unit of every read and write.
pub const PAGE_SIZE: usize = 4096;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 16;
/// Most pages in one `Read` or `Write` request.
pub const MAX_BATCH: usize = 256;
/// Bytes of a handshake nonce and of a proof.
pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;
/// Body of a `Hello`: vnode_id, role, reserved, client nonce, client proof.
pub const HELLO_LEN: usize = 16 + NONCE_LEN + PROOF_LEN;
/// Body of a `HelloOk`: capacity, free pages, server proof.
pub const HELLO_OK_LEN: usize = 16 + PROOF_LEN;
/// Label of the client's proof.
pub const CLIENT_PROOF_LABEL: &[u8] = b"vnode-mem-v2 client";
/// Label of the server's proof.
pub const SERVER_PROOF_LABEL: &[u8] = b"vnode-mem-v2 server";
/// Longest migration target address.
pub const MAX_ADDR: usize = 256;
/// Longest error message carried in an `Error` reply.
pub const MAX_ERROR_MSG: usize = 1024;
/// Fixed part of `Read` and `Write` bodies: region, count, reserved.
pub const BATCH_FIXED: usize = 16;

/// Frame kinds. Requests have the high bit clear, replies have it set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Hello = 0x01,
    Alloc = 0x02,
    Free = 0x03,
    Read = 0x04,
    Write = 0x05,
    Migrate = 0x06,
    Open = 0x07,
    Ping = 0x08,
    MigrateIn = 0x0a,
    Commit = 0x0b,
    Challenge = 0x80,
    HelloOk = 0x81,
    Done = 0x82,
    Data = 0x84,
    Opened = 0x87,
    Error = 0xff,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            0x01 => Op::Hello,
            0x02 => Op::Alloc,
            0x03 => Op::Free,
            0x04 => Op::Read,
            0x05 => Op::Write,
            0x06 => Op::Migrate,
            0x07 => Op::Open,
            0x08 => Op::Ping,
            0x0a => Op::MigrateIn,
            0x0b => Op::Commit,
            0x80 => Op::Challenge,
            0x81 => Op::HelloOk,
            0x82 => Op::Done,
            0x84 => Op::Data,
            0x87 => Op::Opened,
            0xff => Op::Error,
            _ => return None,
        })
    }

    /// Largest body a frame of this kind may carry.
    pub fn max_body(self) -> usize {
        match self {
            Op::Hello => HELLO_LEN,
            Op::Alloc => 16,
            Op::Free => 8,
            Op::Read => BATCH_FIXED + 8 * MAX_BATCH,
            Op::Write => BATCH_FIXED + (8 + PAGE_SIZE) * MAX_BATCH,
            Op::Migrate => 10 + MAX_ADDR,
            Op::Open => 16,
            Op::Ping => 0,
            Op::MigrateIn => 16,
            Op::Commit => 8,
            Op::Challenge => NONCE_LEN,
            Op::HelloOk => HELLO_OK_LEN,
            Op::Done => 0,
            Op::Data => PAGE_SIZE * MAX_BATCH,
            Op::Opened => 8,
            Op::Error => 4 + MAX_ERROR_MSG,
        }
    }

    pub fn is_request(self) -> bool {
        (self as u8) & 0x80 == 0
    }
}

/// Why a request failed, as carried in an `Error` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Missing or wrong credential, or a request before `Hello`.
    Auth = 1,
    /// Frame could not be parsed.
    Malformed = 2,
    /// Frame longer than its op allows.
    Oversized = 3,
    /// Protocol version not spoken by the server.
    Version = 4,
    /// No such region.
    NoRegion = 5,
    /// Region already exists.
    Exists = 6,
    /// Not enough capacity left for the allocation.
    Capacity = 7,
    /// Page index beyond the end of the region.
    OutOfRange = 8,
    /// Region was migrated; the message names the new server.
    Moved = 9,
    /// Server-side failure (storage, migration target).
    Internal = 10,
    /// Too many connections; try again later or elsewhere.
    Busy = 11,
    /// `Open` of a region whose size is not the one asked for.
    SizeMismatch = 12,
    /// A per-vNode limit (regions, pages) would be exceeded.
    Limit = 13,
    /// The data directory has no room for the region.
    NoSpace = 14,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> ErrorCode {
        match v {
            1 => ErrorCode::Auth,
            2 => ErrorCode::Malformed,
            3 => ErrorCode::Oversized,
            4 => ErrorCode::Version,
            5 => ErrorCode::NoRegion,
            6 => ErrorCode::Exists,
            7 => ErrorCode::Capacity,
            8 => ErrorCode::OutOfRange,
            9 => ErrorCode::Moved,
            11 => ErrorCode::Busy,
            12 => ErrorCode::SizeMismatch,
            13 => ErrorCode::Limit,
            14 => ErrorCode::NoSpace,
            _ => ErrorCode::Internal,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorCode::Auth => "authentication failed",
            ErrorCode::Malformed => "malformed frame",
            ErrorCode::Oversized => "oversized frame",
            ErrorCode::Version => "unsupported protocol version",
            ErrorCode::NoRegion => "no such region",
            ErrorCode::Exists => "region exists",
            ErrorCode::Capacity => "capacity exceeded",
            ErrorCode::OutOfRange => "page out of range",
            ErrorCode::Moved => "region moved",
            ErrorCode::Internal => "internal error",
            ErrorCode::Busy => "server busy",
            ErrorCode::SizeMismatch => "region size mismatch",
            ErrorCode::Limit => "per-vNode limit reached",
            ErrorCode::NoSpace => "no space in the data directory",
        };
        f.write_str(s)
    }
}

/// A frame that does not follow this protocol.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("bad magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    #[error("unknown op {0:#04x}")]
    UnknownOp(u8),
    #[error("{op:?} frame of {len} bytes exceeds {max}")]
    Oversized { op: Op, len: usize, max: usize },
    #[error("malformed {op:?} frame: {what}")]
    Malformed { op: Op, what: &'static str },
}

impl ProtocolError {
    /// The code a server replies with when it refuses this frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::BadVersion(_) => ErrorCode::Version,
            ProtocolError::Oversized { .. } => ErrorCode::Oversized,
            _ => ErrorCode::Malformed,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub op: Op,
    pub len: usize,
    pub tag: u64,
}

impl Header {
    pub fn new(op: Op, len: usize, tag: u64) -> Self {
        Header { op, len, tag }
    }

    /// Encodes the header. `len` must already respect [`Op::max_body`].
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = VERSION;
        b[3] = self.op as u8;
        // max_body() is far below u32::MAX, so the cast cannot truncate for valid frames.
        b[4..8].copy_from_slice(&(self.len as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b
    }

    /// Decodes and validates a header: magic, version, op and the length bound.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        if b[2] != VERSION {
            return Err(ProtocolError::BadVersion(b[2]));
        }
        let op = Op::from_u8(b[3]).ok_or(ProtocolError::UnknownOp(b[3]))?;
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        let max = op.max_body();
        if len > max {
            return Err(ProtocolError::Oversized { op, len, max });
        }
        let tag = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        Ok(Header { op, len, tag })
    }
}

/// Page numbers of a batch, borrowed from the frame (unaligned, little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageList<'a>(&'a [u8]);

impl<'a> PageList<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        self.0.chunks_exact(8).map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
    }
}

/// A decoded request, borrowing its variable parts from the frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Hello(Hello),
    Alloc {
        region: u64,
        pages: u64,
    },
    Free {
        region: u64,
    },
    Read {
        region: u64,
        pages: PageList<'a>,
    },
    Write {
        region: u64,
        pages: PageList<'a>,
        data: &'a [u8],
    },
    Migrate {
        region: u64,
        target: &'a str,
    },
    Open {
        region: u64,
        pages: u64,
    },
    Ping,
    MigrateIn {
        region: u64,
        pages: u64,
    },
    Commit {
        region: u64,
    },
}

/// Who is authenticating in a `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AuthRole {
    /// A vNode, with its own credential.
    Vnode = 0,
    /// A memory server migrating a region of `vnode_id` here, with the servers' credential.
    Server = 1,
}

/// A decoded `Hello` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub vnode_id: u64,
    pub role: AuthRole,
    pub client_nonce: [u8; NONCE_LEN],
    pub proof: [u8; PROOF_LEN],
}

impl Hello {
    /// Appends the whole frame.
    pub fn encode(&self, buf: &mut Vec<u8>, tag: u64) {
        buf.extend_from_slice(&Header::new(Op::Hello, HELLO_LEN, tag).encode());
        buf.extend_from_slice(&self.vnode_id.to_le_bytes());
        buf.push(self.role as u8);
        buf.extend_from_slice(&[0u8; 7]);
        buf.extend_from_slice(&self.client_nonce);
        buf.extend_from_slice(&self.proof);
    }
}

/// The fields both proofs cover, in order: server nonce, client nonce, vNode id, role.
pub fn proof_parts(
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
    vnode_id: u64,
    role: AuthRole,
) -> [u8; 2 * NONCE_LEN + 9] {
    let mut b = [0u8; 2 * NONCE_LEN + 9];
    b[..NONCE_LEN].copy_from_slice(server_nonce);
    b[NONCE_LEN..2 * NONCE_LEN].copy_from_slice(client_nonce);
    b[2 * NONCE_LEN..2 * NONCE_LEN + 8].copy_from_slice(&vnode_id.to_le_bytes());
    b[2 * NONCE_LEN + 8] = role as u8;
    b
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

impl<'a> Request<'a> {
    /// Decodes a request body. `h` must come from [`Header::decode`] and `body.len() == h.len`.
    pub fn decode(h: &Header, body: &'a [u8]) -> Result<Request<'a>, ProtocolError> {
        let op = h.op;
        let bad = |what| ProtocolError::Malformed { op, what };
        if body.len() != h.len {
            return Err(bad("body length differs from header"));
        }
        match op {
            Op::Hello => {
                if body.len() != HELLO_LEN {
                    return Err(bad("body is not 80 bytes"));
                }
                let role = match body[8] {
                    0 => AuthRole::Vnode,
                    1 => AuthRole::Server,
                    _ => return Err(bad("unknown role")),
                };
                if body[9..16].iter().any(|&b| b != 0) {
                    return Err(bad("reserved bytes not zero"));
                }
                let mut client_nonce = [0u8; NONCE_LEN];
                client_nonce.copy_from_slice(&body[16..16 + NONCE_LEN]);
                let mut proof = [0u8; PROOF_LEN];
                proof.copy_from_slice(&body[16 + NONCE_LEN..]);
                Ok(Request::Hello(Hello {
                    vnode_id: u64_at(body, 0),
                    role,
                    client_nonce,
                    proof,
                }))
            }
            Op::Alloc | Op::Open | Op::MigrateIn => {
                if body.len() != 16 {
                    return Err(bad("body is not 16 bytes"));
                }
                let (region, pages) = (u64_at(body, 0), u64_at(body, 8));
                Ok(match op {
                    Op::Alloc => Request::Alloc { region, pages },
                    Op::Open => Request::Open { region, pages },
                    _ => Request::MigrateIn { region, pages },
                })
            }
            Op::Free | Op::Commit => {
                if body.len() != 8 {
                    return Err(bad("body is not 8 bytes"));
                }
                let region = u64_at(body, 0);
                Ok(match op {
                    Op::Free => Request::Free { region },
                    _ => Request::Commit { region },
                })
            }
            Op::Read | Op::Write => Self::decode_batch(op, body),
            Op::Migrate => {
                if body.len() < 10 {
                    return Err(bad("short body"));
                }
                let n = u16_at(body, 8) as usize;
                if n == 0 || n > MAX_ADDR || body.len() != 10 + n {
                    return Err(bad("bad address length"));
                }
                let target =
                    std::str::from_utf8(&body[10..]).map_err(|_| bad("address not utf-8"))?;
                Ok(Request::Migrate {
                    region: u64_at(body, 0),
                    target,
                })
            }
            Op::Ping if body.is_empty() => Ok(Request::Ping),
            Op::Ping => Err(bad("ping takes no body")),
            Op::Challenge | Op::HelloOk | Op::Done | Op::Data | Op::Opened | Op::Error => {
                Err(bad("reply op in a request"))
            }
        }
    }

    fn decode_batch(op: Op, body: &'a [u8]) -> Result<Request<'a>, ProtocolError> {
        let bad = |what| ProtocolError::Malformed { op, what };
        if body.len() < BATCH_FIXED {
            return Err(bad("short body"));
        }
        let region = u64_at(body, 0);
        let count = u32_at(body, 8) as usize;
        if u32_at(body, 12) != 0 {
            return Err(bad("reserved field not zero"));
        }
        if count == 0 || count > MAX_BATCH {
            return Err(bad("page count out of bounds"));
        }
        let per_page = if op == Op::Write { 8 + PAGE_SIZE } else { 8 };
        if body.len() != BATCH_FIXED + count * per_page {
            return Err(bad("body length does not match page count"));
        }
        let idx_end = BATCH_FIXED + 8 * count;
        let pages = PageList(&body[BATCH_FIXED..idx_end]);
        if op == Op::Write {
            Ok(Request::Write {
                region,
                pages,
                data: &body[idx_end..],
            })
        } else {
            Ok(Request::Read { region, pages })
        }
    }
}

/// Appends the header and fixed part of a `Read` or `Write` request (everything but the page
/// data) to `buf`. Written for the client hot path: no allocation once `buf` has grown.
pub fn encode_batch(buf: &mut Vec<u8>, op: Op, tag: u64, region: u64, pages: &[u64]) {
    let per_page = if op == Op::Write { 8 + PAGE_SIZE } else { 8 };
    let len = BATCH_FIXED + pages.len() * per_page;
    buf.extend_from_slice(&Header::new(op, len, tag).encode());
    buf.extend_from_slice(&region.to_le_bytes());
    buf.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    for p in pages {
        buf.extend_from_slice(&p.to_le_bytes());
    }
}

/// Appends a whole `Challenge` frame.
pub fn encode_challenge(buf: &mut Vec<u8>, server_nonce: &[u8; NONCE_LEN]) {
    buf.extend_from_slice(&Header::new(Op::Challenge, NONCE_LEN, 0).encode());
    buf.extend_from_slice(server_nonce);
}

/// Appends a whole `Ping` frame.
pub fn encode_ping(buf: &mut Vec<u8>, tag: u64) {
    buf.extend_from_slice(&Header::new(Op::Ping, 0, tag).encode());
}

/// Appends a whole `Alloc` frame.
pub fn encode_alloc(buf: &mut Vec<u8>, tag: u64, region: u64, pages: u64) {
    encode_region_pages(buf, Op::Alloc, tag, region, pages);
}

/// Appends a whole `Alloc` or `MigrateIn` frame.
pub fn encode_region_pages(buf: &mut Vec<u8>, op: Op, tag: u64, region: u64, pages: u64) {
    buf.extend_from_slice(&Header::new(op, 16, tag).encode());
    buf.extend_from_slice(&region.to_le_bytes());
    buf.extend_from_slice(&pages.to_le_bytes());
}

/// Appends a whole `Open` frame (`pages` 0: any size).
pub fn encode_open(buf: &mut Vec<u8>, tag: u64, region: u64, pages: u64) {
    buf.extend_from_slice(&Header::new(Op::Open, 16, tag).encode());
    buf.extend_from_slice(&region.to_le_bytes());
    buf.extend_from_slice(&pages.to_le_bytes());
}

/// Appends a whole `Opened` reply.
pub fn encode_opened(buf: &mut Vec<u8>, tag: u64, pages: u64) {
    buf.extend_from_slice(&Header::new(Op::Opened, 8, tag).encode());
    buf.extend_from_slice(&pages.to_le_bytes());
}

/// Decodes an `Opened` body into the region's size in pages.
pub fn decode_opened(body: &[u8]) -> Result<u64, ProtocolError> {
    if body.len() != 8 {
        return Err(ProtocolError::Malformed {
            op: Op::Opened,
            what: "body is not 8 bytes",
        });
    }
    Ok(u64_at(body, 0))
}

/// Appends a whole `Free` frame.
pub fn encode_free(buf: &mut Vec<u8>, tag: u64, region: u64) {
    encode_region(buf, Op::Free, tag, region);
}

/// Appends a whole `Free` or `Commit` frame.
pub fn encode_region(buf: &mut Vec<u8>, op: Op, tag: u64, region: u64) {
    buf.extend_from_slice(&Header::new(op, 8, tag).encode());
    buf.extend_from_slice(&region.to_le_bytes());
}

/// Appends a whole `Migrate` frame.
pub fn encode_migrate(buf: &mut Vec<u8>, tag: u64, region: u64, target: &str) {
    buf.extend_from_slice(&Header::new(Op::Migrate, 10 + target.len(), tag).encode());
    buf.extend_from_slice(&region.to_le_bytes());
    buf.extend_from_slice(&(target.len() as u16).to_le_bytes());
    buf.extend_from_slice(target.as_bytes());
}

/// Appends a whole `Error` frame; the message is cut to [`MAX_ERROR_MSG`] bytes.
pub fn encode_error(buf: &mut Vec<u8>, tag: u64, code: ErrorCode, msg: &str) {
    let mut end = msg.len().min(MAX_ERROR_MSG);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &msg.as_bytes()[..end];
    buf.extend_from_slice(&Header::new(Op::Error, 4 + msg.len(), tag).encode());
    buf.extend_from_slice(&(code as u16).to_le_bytes());
    buf.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    buf.extend_from_slice(msg);
}

/// Decodes an `Error` reply body into its code and message.
pub fn decode_error(body: &[u8]) -> Result<(ErrorCode, String), ProtocolError> {
    let bad = |what| ProtocolError::Malformed {
        op: Op::Error,
        what,
    };
    if body.len() < 4 {
        return Err(bad("short body"));
    }
    let n = u16_at(body, 2) as usize;
    if body.len() != 4 + n {
        return Err(bad("bad message length"));
    }
    let code = ErrorCode::from_u16(u16_at(body, 0));
    Ok((code, String::from_utf8_lossy(&body[4..]).into_owned()))
}

/// Encodes a whole `HelloOk` frame.
pub fn encode_hello_ok(
    buf: &mut Vec<u8>,
    tag: u64,
    capacity_pages: u64,
    free_pages: u64,
    proof: &[u8; PROOF_LEN],
) {
    buf.extend_from_slice(&Header::new(Op::HelloOk, HELLO_OK_LEN, tag).encode());
    buf.extend_from_slice(&capacity_pages.to_le_bytes());
    buf.extend_from_slice(&free_pages.to_le_bytes());
    buf.extend_from_slice(proof);
}

/// Decodes a `HelloOk` body into (capacity_pages, free_pages, server proof).
pub fn decode_hello_ok(body: &[u8]) -> Result<(u64, u64, [u8; PROOF_LEN]), ProtocolError> {
    if body.len() != HELLO_OK_LEN {
        return Err(ProtocolError::Malformed {
            op: Op::HelloOk,
            what: "body is not 48 bytes",
        });
    }
    let mut proof = [0u8; PROOF_LEN];
    proof.copy_from_slice(&body[16..]);
    Ok((u64_at(body, 0), u64_at(body, 8), proof))
}

/// Decodes one whole frame (header and body) as a request. For the fuzzer and tests: the
/// server reads the header and body separately.
pub fn decode_frame(frame: &[u8]) -> Result<(Header, Request<'_>), ProtocolError> {
    let mut hb = [0u8; HEADER_LEN];
    if frame.len() < HEADER_LEN {
        return Err(ProtocolError::Malformed {
            op: Op::Hello,
            what: "short header",
        });
    }
    hb.copy_from_slice(&frame[..HEADER_LEN]);
    let h = Header::decode(&hb)?;
    let req = Request::decode(&h, &frame[HEADER_LEN..])?;
    Ok((h, req))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header::new(Op::Write, 16 + 4104, 77);
        assert_eq!(Header::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn header_rejects_bad_magic_version_op_and_length() {
        let mut b = Header::new(Op::Read, 24, 1).encode();
        b[0] = 0;
        assert!(matches!(
            Header::decode(&b),
            Err(ProtocolError::BadMagic(_))
        ));
        let mut b = Header::new(Op::Read, 24, 1).encode();
        b[2] = 9;
        assert_eq!(Header::decode(&b), Err(ProtocolError::BadVersion(9)));
        let mut b = Header::new(Op::Read, 24, 1).encode();
        b[3] = 0x42;
        assert_eq!(Header::decode(&b), Err(ProtocolError::UnknownOp(0x42)));
        let b = Header::new(Op::Free, 9, 1).encode();
        assert!(matches!(
            Header::decode(&b),
            Err(ProtocolError::Oversized { len: 9, max: 8, .. })
        ));
        let b = Header::new(Op::Write, u32::MAX as usize, 1).encode();
        assert_eq!(
            Header::decode(&b).map_err(|e| e.code()),
            Err(ErrorCode::Oversized)
        );
    }

    #[test]
    fn batch_round_trip() {
        let mut buf = Vec::new();
        encode_batch(&mut buf, Op::Write, 5, 3, &[7, 9]);
        buf.extend_from_slice(&[0xab; 2 * PAGE_SIZE]);
        let (h, req) = decode_frame(&buf).expect("valid frame");
        assert_eq!(h.tag, 5);
        match req {
            Request::Write {
                region,
                pages,
                data,
            } => {
                assert_eq!(region, 3);
                assert_eq!(pages.iter().collect::<Vec<_>>(), vec![7, 9]);
                assert_eq!(data.len(), 2 * PAGE_SIZE);
            }
            other => panic!("decoded {other:?}"),
        }
        let mut buf = Vec::new();
        encode_batch(&mut buf, Op::Read, 6, 3, &[1, 2, 3]);
        let (_, req) = decode_frame(&buf).expect("valid frame");
        assert!(matches!(req, Request::Read { region: 3, pages } if pages.len() == 3));
    }

    #[test]
    fn batch_rejects_count_mismatch_and_empty() {
        let mut buf = Vec::new();
        encode_batch(&mut buf, Op::Read, 1, 3, &[1, 2]);
        buf[16 + 8] = 3; // claim three pages, carry two
        assert!(matches!(
            decode_frame(&buf),
            Err(ProtocolError::Malformed { .. })
        ));
        let mut buf = Vec::new();
        encode_batch(&mut buf, Op::Read, 1, 3, &[]);
        assert!(matches!(
            decode_frame(&buf),
            Err(ProtocolError::Malformed { .. })
        ));
        // A write without its data.
        let mut buf = Vec::new();
        encode_batch(&mut buf, Op::Write, 1, 3, &[1]);
        let hdr = Header::new(Op::Write, buf.len() - HEADER_LEN, 1).encode();
        buf[..HEADER_LEN].copy_from_slice(&hdr);
        assert!(matches!(
            decode_frame(&buf),
            Err(ProtocolError::Malformed { .. })
        ));
    }

    #[test]
    fn hello_alloc_free_migrate_round_trip() {
        let hello = Hello {
            vnode_id: 42,
            role: AuthRole::Server,
            client_nonce: [3; NONCE_LEN],
            proof: [4; PROOF_LEN],
        };
        let mut buf = Vec::new();
        hello.encode(&mut buf, 1);
        assert_eq!(decode_frame(&buf).map(|f| f.1), Ok(Request::Hello(hello)));
        let mut buf = Vec::new();
        encode_ping(&mut buf, 8);
        assert_eq!(decode_frame(&buf).map(|f| f.1), Ok(Request::Ping));
        buf.clear();
        encode_region_pages(&mut buf, Op::MigrateIn, 3, 4, 5);
        assert_eq!(
            decode_frame(&buf).map(|f| f.1),
            Ok(Request::MigrateIn {
                region: 4,
                pages: 5
            })
        );
        buf.clear();
        encode_region(&mut buf, Op::Commit, 3, 4);
        assert_eq!(
            decode_frame(&buf).map(|f| f.1),
            Ok(Request::Commit { region: 4 })
        );
        let mut buf = Vec::new();
        encode_alloc(&mut buf, 2, 4, 100);
        assert_eq!(
            decode_frame(&buf).map(|f| f.1),
            Ok(Request::Alloc {
                region: 4,
                pages: 100
            })
        );
        let mut buf = Vec::new();
        encode_free(&mut buf, 3, 4);
        assert_eq!(
            decode_frame(&buf).map(|f| f.1),
            Ok(Request::Free { region: 4 })
        );
        let mut buf = Vec::new();
        encode_migrate(&mut buf, 3, 4, "127.0.0.1:9");
        assert_eq!(
            decode_frame(&buf).map(|f| f.1),
            Ok(Request::Migrate {
                region: 4,
                target: "127.0.0.1:9"
            })
        );
    }

    #[test]
    fn open_and_opened_round_trip() {
        let mut buf = Vec::new();
        encode_open(&mut buf, 4, 0, 1 << 18);
        assert_eq!(
            decode_frame(&buf).map(|f| f.1),
            Ok(Request::Open {
                region: 0,
                pages: 1 << 18
            })
        );
        let mut short = buf.clone();
        short.truncate(buf.len() - 1);
        short[4] = 15;
        assert!(decode_frame(&short).is_err());
        let mut buf = Vec::new();
        encode_opened(&mut buf, 4, 77);
        assert!(decode_frame(&buf).is_err(), "a reply is not a request");
        assert_eq!(decode_opened(&buf[HEADER_LEN..]), Ok(77));
        assert!(decode_opened(&buf[HEADER_LEN..HEADER_LEN + 4]).is_err());
        assert_eq!(ErrorCode::from_u16(12), ErrorCode::SizeMismatch);
    }

    #[test]
    fn hello_rejects_bad_role_reserved_and_length() {
        let hello = Hello {
            vnode_id: 42,
            role: AuthRole::Vnode,
            client_nonce: [3; NONCE_LEN],
            proof: [4; PROOF_LEN],
        };
        let mut buf = Vec::new();
        hello.encode(&mut buf, 1);
        let mut bad_role = buf.clone();
        bad_role[HEADER_LEN + 8] = 2;
        assert!(decode_frame(&bad_role).is_err());
        let mut reserved = buf.clone();
        reserved[HEADER_LEN + 12] = 1;
        assert!(decode_frame(&reserved).is_err());
        let mut short = buf.clone();
        short.pop();
        short[4] -= 1;
        assert!(decode_frame(&short).is_err());
        // A version-1 client's hello is refused by its header.
        let mut old = buf;
        old[2] = 1;
        assert!(matches!(
            decode_frame(&old),
            Err(ProtocolError::BadVersion(1))
        ));
    }

    #[test]
    fn error_and_hello_ok_round_trip() {
        let mut buf = Vec::new();
        encode_error(&mut buf, 9, ErrorCode::Capacity, "no room");
        let h = Header::decode(buf[..HEADER_LEN].try_into().expect("16 bytes")).expect("header");
        assert_eq!(h.op, Op::Error);
        assert_eq!(
            decode_error(&buf[HEADER_LEN..]),
            Ok((ErrorCode::Capacity, "no room".to_string()))
        );
        let long = "é".repeat(MAX_ERROR_MSG);
        let mut buf = Vec::new();
        encode_error(&mut buf, 9, ErrorCode::Internal, &long);
        assert!(Header::decode(buf[..HEADER_LEN].try_into().expect("16 bytes")).is_ok());
        let mut buf = Vec::new();
        encode_hello_ok(&mut buf, 1, 10, 4, &[9; PROOF_LEN]);
        assert_eq!(
            decode_hello_ok(&buf[HEADER_LEN..]),
            Ok((10, 4, [9; PROOF_LEN]))
        );
    }

    #[test]
    fn replies_are_not_requests() {
        let mut buf = Vec::new();
        encode_hello_ok(&mut buf, 1, 10, 4, &[0; PROOF_LEN]);
        assert!(decode_frame(&buf).is_err());
        let mut buf = Vec::new();
        encode_challenge(&mut buf, &[1; NONCE_LEN]);
        assert!(decode_frame(&buf).is_err());
    }
}
