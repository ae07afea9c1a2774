//! Bad input against `vnode-blkd`, each a test: out-of-range requests, oversized requests,
//! unknown commands, a client that vanishes mid-write, a full backing disk, garbage in the
//! handshake. The server must answer with an NBD error (or drop only that connection) and go on
//! serving everyone else.

mod blk_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use blk_common::{pattern, start_blkd, Server, TempDir};
use remote_blk::nbd::client::{ClientError, ConnectOptions, NbdClient};
use remote_blk::nbd::protocol::*;

/// A hand-driven NBD connection (simple replies) for sending what a good client never would.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn greet(srv: &Server) -> Self {
        let mut s = TcpStream::connect(&srv.addr).expect("connect");
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(g[..8], NBDMAGIC.to_be_bytes());
        s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
            .expect("client flags");
        Self { s }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.s.write_all(&h.encode()).expect("option header");
        self.s.write_all(data).expect("option data");
    }

    fn option_reply(&mut self) -> (OptionReply, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).expect("option reply");
        let r = OptionReply::decode(&h).expect("valid option reply");
        let mut d = vec![0u8; r.len as usize];
        self.s.read_exact(&mut d).expect("option reply data");
        (r, d)
    }

    /// Connects and enters transmission on `export`; returns the export size.
    fn open(srv: &Server, export: &str) -> (Self, u64) {
        let mut c = Self::greet(srv);
        let go = InfoRequest {
            name: export.as_bytes().to_vec(),
            requests: vec![],
        };
        c.option(OPT_GO, &go.encode());
        let mut size = 0;
        loop {
            let (r, d) = c.option_reply();
            match r.kind {
                REP_INFO => {
                    if let Ok(Info::Export { size: s, .. }) = Info::decode(&d) {
                        size = s;
                    }
                }
                REP_ACK => return (c, size),
                k => panic!("GO refused: {k:#x}"),
            }
        }
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let r = Request {
            flags: 0,
            kind,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&r.encode()).expect("request");
        self.s.write_all(data).expect("payload");
    }

    /// Reads a simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).expect("reply");
        decode_simple_reply(&h).expect("valid reply")
    }

    /// A read that must succeed; returns its data.
    fn read_ok(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(CMD_READ, cookie, offset, len, &[]);
        assert_eq!(self.reply(), (0, cookie), "read at {offset}");
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).expect("read data");
        d
    }
}

fn one_export(dir: &TempDir, size: &str) -> Server {
    start_blkd(&[
        "--export",
        &format!("disk={}:{size}", dir.path("d.img").display()),
    ])
}

#[test]
fn read_past_end_is_einval_and_connection_goes_on() {
    let dir = TempDir::new("blk-bad-read-end");
    let srv = one_export(&dir, "1M");
    let (mut c, size) = Raw::open(&srv, "disk");
    assert_eq!(size, 1 << 20);
    c.request(CMD_READ, 1, size - 512, 4096, &[]);
    assert_eq!(c.reply(), (EINVAL, 1));
    c.request(CMD_READ, 2, u64::MAX - 10, 4096, &[]); // offset + length overflows
    assert_eq!(c.reply(), (EINVAL, 2));
    c.request(CMD_TRIM, 3, size, 1, &[]);
    assert_eq!(c.reply(), (EINVAL, 3));
    // The same connection still works.
    assert_eq!(c.read_ok(4, size - 4096, 4096), vec![0u8; 4096]);
}

#[test]
fn write_past_end_is_enospc_and_writes_nothing() {
    let dir = TempDir::new("blk-bad-write-end");
    let srv = one_export(&dir, "1M");
    let (mut c, size) = Raw::open(&srv, "disk");
    let data = pattern(1, 8192);
    c.request(CMD_WRITE, 1, size - 4096, 8192, &data);
    assert_eq!(c.reply(), (ENOSPC, 1));
    c.request(CMD_WRITE_ZEROES, 2, size, 4096, &[]);
    assert_eq!(c.reply(), (ENOSPC, 2));
    assert_eq!(c.read_ok(3, size - 4096, 4096), vec![0u8; 4096]);
    assert_eq!(
        std::fs::metadata(dir.path("d.img")).expect("stat").len(),
        size
    );
}

#[test]
fn length_over_maximum_is_refused() {
    let dir = TempDir::new("blk-bad-len");
    let srv = one_export(&dir, "128M");
    let (mut c, _) = Raw::open(&srv, "disk");
    c.request(CMD_READ, 1, 0, MAX_PAYLOAD + 4096, &[]);
    assert_eq!(c.reply(), (EINVAL, 1));
    // An oversized write's payload is consumed and refused; the stream stays in sync.
    let big = vec![0x5au8; (MAX_PAYLOAD + 4096) as usize];
    c.request(CMD_WRITE, 2, 0, big.len() as u32, &big);
    assert_eq!(c.reply(), (EINVAL, 2));
    assert_eq!(c.read_ok(3, 0, 4096), vec![0u8; 4096]);
}

#[test]
fn unknown_command_is_einval() {
    let dir = TempDir::new("blk-bad-cmd");
    let srv = one_export(&dir, "1M");
    let (mut c, _) = Raw::open(&srv, "disk");
    c.request(0x77, 1, 0, 0, &[]);
    assert_eq!(c.reply(), (EINVAL, 1));
    c.request(CMD_CACHE, 2, 0, 4096, &[]); // not advertised
    assert_eq!(c.reply(), (EINVAL, 2));
    assert_eq!(c.read_ok(3, 0, 512), vec![0u8; 512]);
}

#[test]
fn client_vanishing_mid_write_harms_nobody() {
    let dir = TempDir::new("blk-bad-midwrite");
    let mut srv = one_export(&dir, "1M");
    let (mut bystander, _) = Raw::open(&srv, "disk");
    let (mut c, _) = Raw::open(&srv, "disk");
    // Header for 64 KiB, then only 1000 bytes of it, then gone.
    let r = Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 9,
        offset: 0,
        len: 65536,
    };
    c.s.write_all(&r.encode()).expect("header");
    c.s.write_all(&[0xee; 1000]).expect("partial payload");
    drop(c);
    // A partial write is never applied, and other clients carry on.
    assert_eq!(bystander.read_ok(1, 0, 4096), vec![0u8; 4096]);
    let (mut late, _) = Raw::open(&srv, "disk");
    assert_eq!(late.read_ok(1, 0, 1000), vec![0u8; 1000]);
    assert!(srv.alive());
}

#[test]
fn garbage_handshake_drops_only_that_connection() {
    let dir = TempDir::new("blk-bad-hs");
    let mut srv = one_export(&dir, "1M");
    // Wrong option magic.
    let mut c = Raw::greet(&srv);
    c.s.write_all(&[0xff; 16]).expect("garbage");
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).expect("closed cleanly"), 0);
    // An option that is too large is skipped and refused; unknown exports get ERR_UNKNOWN.
    let mut c = Raw::greet(&srv);
    c.option(OPT_LIST, &vec![0u8; (MAX_OPTION_LEN + 1) as usize]);
    assert_eq!(c.option_reply().0.kind, REP_ERR_TOO_BIG);
    let go = InfoRequest {
        name: b"nope".to_vec(),
        requests: vec![],
    };
    c.option(OPT_GO, &go.encode());
    assert_eq!(c.option_reply().0.kind, REP_ERR_UNKNOWN);
    c.option(OPT_GO, &[1, 2, 3]); // truncated GO data
    assert_eq!(c.option_reply().0.kind, REP_ERR_INVALID);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().0.kind, REP_ACK);
    let (mut ok, _) = Raw::open(&srv, "disk");
    assert_eq!(ok.read_ok(1, 0, 512), vec![0u8; 512]);
    assert!(srv.alive());
}

/// Mounts a 1 MiB tmpfs at `at`; false when this process may not mount.
fn mount_small_tmpfs(at: &Path) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "vnode-blk-test"])
        .arg(at)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn full_backing_disk_is_an_io_error_for_that_request_only() {
    let dir = TempDir::new("blk-bad-full");
    let mnt = dir.path("mnt");
    std::fs::create_dir_all(&mnt).expect("mount point");
    if !mount_small_tmpfs(&mnt) {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)");
        return;
    }
    let _unmount = Unmount(&mnt);
    let srv = start_blkd(&[
        "--export",
        &format!("small={}:8M", mnt.join("s.img").display()),
        "--export",
        &format!("big={}:8M", dir.path("b.img").display()),
    ]);
    let small = NbdClient::connect(&srv.uri("small"), &ConnectOptions::default()).expect("small");
    let big = NbdClient::connect(&srv.uri("big"), &ConnectOptions::default()).expect("big");
    // The sparse 8 MiB file fits; filling it does not (the tmpfs holds 1 MiB).
    let chunk = pattern(7, 256 << 10);
    let mut failed_at = None;
    for i in 0..32u64 {
        match small.write_at(&chunk, i * chunk.len() as u64, false) {
            Ok(()) => {}
            Err(ClientError::Remote { errno }) => {
                assert!(errno == ENOSPC || errno == EIO, "errno {errno}");
                failed_at = Some(i);
                break;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    let failed_at = failed_at.expect("a 1 MiB tmpfs cannot hold 8 MiB");
    assert!(failed_at >= 1, "the first 256 KiB fit");
    // What was written before the disk filled reads back; the connection and server live on.
    let mut got = vec![0u8; chunk.len()];
    small.read_at(&mut got, 0).expect("read back");
    assert!(got == chunk);
    big.write_at(&chunk, 0, true)
        .expect("other export still writes");
    big.read_at(&mut got, 0).expect("other export reads");
    assert!(got == chunk);
}

#[test]
fn disconnect_answers_requests_sent_before_it() {
    let dir = TempDir::new("blk-disc");
    let srv = one_export(&dir, "1M");
    let (mut c, _) = Raw::open(&srv, "disk");
    // Three pipelined requests and DISC in one segment: all three are answered, then EOF.
    let mut batch = Vec::new();
    for cookie in 1..=3u64 {
        let r = Request {
            flags: 0,
            kind: CMD_READ,
            cookie,
            offset: cookie * 4096,
            len: 4096,
        };
        batch.extend_from_slice(&r.encode());
    }
    let disc = Request {
        flags: 0,
        kind: CMD_DISC,
        cookie: 4,
        offset: 0,
        len: 0,
    };
    batch.extend_from_slice(&disc.encode());
    c.s.write_all(&batch).expect("batch");
    for cookie in 1..=3u64 {
        assert_eq!(c.reply(), (0, cookie));
        let mut d = vec![1u8; 4096];
        c.s.read_exact(&mut d).expect("data");
        assert!(d.iter().all(|&b| b == 0));
    }
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).expect("clean close"), 0);
}

#[test]
fn structured_replies_carry_data_and_errors() {
    let dir = TempDir::new("blk-structured");
    let srv = one_export(&dir, "1M");
    let mut c = Raw::greet(&srv);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0.kind, REP_ACK);
    let go = InfoRequest {
        name: b"disk".to_vec(),
        requests: vec![],
    };
    c.option(OPT_GO, &go.encode());
    while c.option_reply().0.kind != REP_ACK {}
    let data = pattern(3, 512);
    c.request(CMD_WRITE, 1, 512, 512, &data);
    c.request(CMD_READ, 2, 512, 512, &[]);
    c.request(CMD_READ, 3, 1 << 20, 512, &[]);
    let chunk = |c: &mut Raw| {
        let mut h = [0u8; STRUCTURED_REPLY_LEN];
        c.s.read_exact(&mut h).expect("chunk header");
        assert_eq!(h[..4], STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
        let mut payload = vec![0u8; len as usize];
        c.s.read_exact(&mut payload).expect("chunk payload");
        assert_eq!(flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
        (kind, cookie, payload)
    };
    assert_eq!(chunk(&mut c), (REPLY_TYPE_NONE, 1, vec![]));
    let (kind, cookie, payload) = chunk(&mut c);
    assert_eq!((kind, cookie), (REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(payload[..8], 512u64.to_be_bytes());
    assert!(payload[8..] == data[..]);
    let (kind, cookie, payload) = chunk(&mut c);
    assert_eq!((kind, cookie), (REPLY_TYPE_ERROR, 3));
    assert_eq!(payload[..4], EINVAL.to_be_bytes());
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = TempDir::new("blk-ro");
    std::fs::write(dir.path("d.img"), pattern(9, 65536)).expect("image");
    let srv = start_blkd(&[
        "--read-only",
        "--export",
        &format!("disk={}", dir.path("d.img").display()),
    ]);
    let client = NbdClient::connect(&srv.uri("disk"), &ConnectOptions::default()).expect("connect");
    assert!(client.info().read_only);
    assert_eq!(client.write_at(b"x", 0, false), Err(ClientError::ReadOnly));
    let mut got = vec![0u8; 65536];
    client.read_at(&mut got, 0).expect("read");
    assert!(got == pattern(9, 65536));
    let (mut c, _) = Raw::open(&srv, "disk");
    c.request(CMD_WRITE, 1, 0, 4, b"oops");
    assert_eq!(c.reply(), (EPERM, 1));
    c.request(CMD_TRIM, 2, 0, 4096, &[]);
    assert_eq!(c.reply(), (EPERM, 2));
    assert!(std::fs::read(dir.path("d.img")).expect("image") == pattern(9, 65536));
}
