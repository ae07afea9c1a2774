//! vnode-memd against bad input and limits: wrong credentials, malformed and oversized frames,
//! unallocated regions, capacity. Each is refused with an error, and the server keeps serving
//! other clients. Also: batched and split-phase reads and writes, and the command line.

mod mem_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use mem_support::{auth, pattern, spawn_memd, temp_dir, Memd};
use remote_mem::protocol::{self, ErrorCode, Header, Op, HEADER_LEN, NONCE_LEN};
use remote_mem::{ClientAuth, ClientError, MemClient, PAGE_SIZE};
use vnode_common::secret::Secret;

/// A good client still gets correct data from the server.
fn assert_serves(addr: &str, vnode: u64) {
    let mut c = MemClient::connect(addr, &auth(vnode)).expect("good client connects");
    let region = 1000 + vnode;
    c.alloc_region(region, 4).expect("alloc");
    let data = pattern(vnode, &[2, 0]);
    c.write_pages(region, &[2, 0], &data).expect("write");
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    c.read_pages(region, &[2, 0], &mut out).expect("read");
    assert_eq!(out, data);
    c.free_region(region).expect("free");
}

/// Sends raw bytes and returns the server's reply frame (op, code) and whether it then closed.
fn raw_exchange(addr: &str, frames: &[u8]) -> (Header, Vec<u8>, bool) {
    let (mut s, _) = raw_connect(addr);
    s.write_all(frames).expect("send");
    read_reply(&mut s)
}

/// Connects and reads the server's challenge (the first frame of every connection).
fn raw_connect(addr: &str) -> (TcpStream, [u8; NONCE_LEN]) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).expect("challenge header");
    let h = Header::decode(&hb).expect("valid challenge header");
    assert_eq!((h.op, h.len), (Op::Challenge, NONCE_LEN));
    let mut nonce = [0u8; NONCE_LEN];
    s.read_exact(&mut nonce).expect("challenge body");
    (s, nonce)
}

fn read_reply(s: &mut TcpStream) -> (Header, Vec<u8>, bool) {
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).expect("reply header");
    let h = Header::decode(&hb).expect("valid reply header");
    let mut body = vec![0u8; h.len];
    s.read_exact(&mut body).expect("reply body");
    let mut rest = Vec::new();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let closed = matches!(s.read_to_end(&mut rest), Ok(0));
    (h, body, closed)
}

fn error_code(h: &Header, body: &[u8]) -> ErrorCode {
    assert_eq!(h.op, Op::Error, "expected an error reply");
    protocol::decode_error(body).expect("error body").0
}

/// vNode 7's valid answer to `nonce`.
fn hello_frame(nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut b = Vec::new();
    auth(7).hello(nonce).expect("nonce").encode(&mut b, 1);
    b
}

#[test]
fn mem_wrong_credential_is_refused_and_server_keeps_serving() {
    let srv = Memd::start(&[]);
    let wrong = Secret::from_bytes(b"not-the-secret".to_vec()).expect("key");
    let err = MemClient::connect(&srv.addr, &ClientAuth::from_cluster_key(1, &wrong))
        .expect_err("must be refused");
    assert_eq!(err.code(), Some(ErrorCode::Auth), "{err}");
    assert!(
        err.to_string().contains(&srv.addr),
        "error names the server: {err}"
    );
    // A request without any hello is refused too, and the connection closed.
    let mut b = Vec::new();
    protocol::encode_alloc(&mut b, 1, 1, 1);
    let (h, body, closed) = raw_exchange(&srv.addr, &b);
    assert_eq!(error_code(&h, &body), ErrorCode::Auth);
    assert!(closed);
    assert_serves(&srv.addr, 1);
}

#[test]
fn mem_malformed_frames_are_refused_and_server_keeps_serving() {
    let srv = Memd::start(&[]);
    // Bad magic.
    let (h, body, closed) = raw_exchange(&srv.addr, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(error_code(&h, &body), ErrorCode::Malformed);
    assert!(closed);
    // Unknown version.
    let mut b = hello_frame(&[0; NONCE_LEN]);
    b[2] = 99;
    let (h, body, closed) = raw_exchange(&srv.addr, &b);
    assert_eq!(error_code(&h, &body), ErrorCode::Version);
    assert!(closed);
    // After a good hello: a read whose page count disagrees with its length.
    let (mut s, nonce) = raw_connect(&srv.addr);
    let mut b = hello_frame(&nonce);
    let mut bad = Vec::new();
    protocol::encode_batch(&mut bad, Op::Read, 2, 0, &[1, 2]);
    bad[HEADER_LEN + 8] = 9;
    b.extend_from_slice(&bad);
    s.write_all(&b).expect("send");
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).expect("hello reply");
    let hello = Header::decode(&hb).expect("header");
    assert_eq!(hello.op, Op::HelloOk);
    let mut skip = vec![0u8; hello.len];
    s.read_exact(&mut skip).expect("hello body");
    let (h, body, closed) = read_reply(&mut s);
    assert_eq!(h.tag, 2);
    assert_eq!(error_code(&h, &body), ErrorCode::Malformed);
    assert!(closed);
    // A reply op sent as a request, and an unknown op.
    let mut b = hello_frame(&[0; NONCE_LEN]);
    b[3] = 0x42;
    let (h, body, _) = raw_exchange(&srv.addr, &b);
    assert_eq!(error_code(&h, &body), ErrorCode::Malformed);
    assert_serves(&srv.addr, 2);
}

#[test]
fn mem_oversized_frame_is_refused_before_its_body() {
    let srv = Memd::start(&[]);
    let (mut s, nonce) = raw_connect(&srv.addr);
    let mut b = hello_frame(&nonce);
    // A write header claiming 4 GiB - 1: refused from the header alone, nothing more is read.
    b.extend_from_slice(&Header::new(Op::Write, u32::MAX as usize, 3).encode());
    s.write_all(&b).expect("send");
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).expect("hello reply");
    let mut skip = vec![0u8; Header::decode(&hb).expect("header").len];
    s.read_exact(&mut skip).expect("hello body");
    let (h, body, closed) = read_reply(&mut s);
    assert_eq!(h.tag, 3);
    assert_eq!(error_code(&h, &body), ErrorCode::Oversized);
    assert!(closed);
    // A hello longer than allowed.
    let mut b = Vec::new();
    b.extend_from_slice(&Header::new(Op::Hello, 10 + 100_000, 1).encode());
    let (h, body, _) = raw_exchange(&srv.addr, &b);
    assert_eq!(error_code(&h, &body), ErrorCode::Oversized);
    assert_serves(&srv.addr, 3);
}

#[test]
fn mem_unallocated_region_is_refused_and_connection_goes_on() {
    let srv = Memd::start(&[]);
    let mut c = MemClient::connect(&srv.addr, &auth(4)).expect("connect");
    let mut out = vec![0u8; PAGE_SIZE];
    let err = c.read_pages(77, &[0], &mut out).expect_err("no region 77");
    assert_eq!(err.code(), Some(ErrorCode::NoRegion), "{err}");
    assert!(err.to_string().contains(&srv.addr), "{err}");
    let err = c
        .write_pages(77, &[0], &pattern(0, &[0]))
        .expect_err("no region 77");
    assert_eq!(err.code(), Some(ErrorCode::NoRegion));
    // Out of range, and another vNode's region, are refused the same way.
    c.alloc_region(5, 2).expect("alloc");
    let err = c.read_pages(5, &[2], &mut out).expect_err("page 2 of 2");
    assert_eq!(err.code(), Some(ErrorCode::OutOfRange));
    let mut other = MemClient::connect(&srv.addr, &auth(5)).expect("connect");
    let err = other
        .read_pages(5, &[0], &mut out)
        .expect_err("vnode 5 has no region 5");
    assert_eq!(err.code(), Some(ErrorCode::NoRegion));
    // The same connection keeps working.
    let data = pattern(9, &[1]);
    c.write_pages(5, &[1], &data).expect("write");
    c.read_pages(5, &[1], &mut out).expect("read");
    assert_eq!(out, data);
    assert_serves(&srv.addr, 4);
}

#[test]
fn mem_capacity_is_enforced() {
    // 64 KiB = 16 pages.
    let srv = Memd::start(&["--capacity", "64K"]);
    let mut c = MemClient::connect(&srv.addr, &auth(1)).expect("connect");
    assert_eq!(c.server_pages(), (16, 16));
    c.alloc_region(1, 10).expect("10 of 16 pages");
    let err = c.alloc_region(2, 7).expect_err("7 more pages do not fit");
    assert_eq!(err.code(), Some(ErrorCode::Capacity));
    let msg = err.to_string();
    assert!(
        msg.contains("capacity exceeded") && msg.contains("6 of 16"),
        "{msg}"
    );
    c.alloc_region(2, 6).expect("6 pages fit");
    c.free_region(1).expect("free");
    c.alloc_region(3, 10).expect("fits again after free");
    assert_eq!(
        c.alloc_region(3, 1).expect_err("exists").code(),
        Some(ErrorCode::Exists)
    );
}

#[test]
fn mem_batches_pipelines_and_split_phase_reads() {
    let srv = Memd::start(&[]);
    let mut c = MemClient::connect(&srv.addr, &auth(9)).expect("connect");
    let n = 700u64; // more than two frames' worth
    c.alloc_region(0, n).expect("alloc");
    let all: Vec<u64> = (0..n).collect();
    let data = pattern(1, &all);
    c.write_pages(0, &all, &data).expect("batched write");
    // Read back in a scrambled order, across frame boundaries.
    let order: Vec<u64> = (0..n).map(|i| (i * 37) % n).collect();
    let mut out = vec![0u8; order.len() * PAGE_SIZE];
    c.read_pages(0, &order, &mut out).expect("batched read");
    for (i, p) in order.iter().enumerate() {
        let p = *p as usize;
        assert_eq!(
            &out[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            &data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
            "page {p}"
        );
    }
    // Split phase: submit three, complete them out of order, with a demand read between.
    let t1 = c.submit_read(0, &[1, 2]).expect("submit");
    let t2 = c.submit_read(0, &[3]).expect("submit");
    let t3 = c.submit_read(0, &[699]).expect("submit");
    let mut demand = vec![0u8; PAGE_SIZE];
    c.read_pages(0, &[5], &mut demand).expect("demand read");
    assert_eq!(demand, &data[5 * PAGE_SIZE..6 * PAGE_SIZE]);
    let mut o3 = vec![0u8; t3.len_bytes()];
    c.complete_read(t3, &mut o3).expect("t3");
    let mut o1 = vec![0u8; t1.len_bytes()];
    c.complete_read(t1, &mut o1).expect("t1");
    let mut o2 = vec![0u8; t2.len_bytes()];
    c.complete_read(t2, &mut o2).expect("t2");
    assert_eq!(o1, &data[PAGE_SIZE..3 * PAGE_SIZE]);
    assert_eq!(o2, &data[3 * PAGE_SIZE..4 * PAGE_SIZE]);
    assert_eq!(o3, &data[699 * PAGE_SIZE..700 * PAGE_SIZE]);
    // Never-written pages read as zero.
    c.alloc_region(1, 3).expect("alloc");
    let mut z = vec![1u8; PAGE_SIZE];
    c.read_pages(1, &[2], &mut z).expect("read");
    assert!(z.iter().all(|&b| b == 0));
    // Buffer length mismatches are caught before anything is sent.
    let err = c
        .read_pages(0, &[1], &mut z[..100])
        .expect_err("short buffer");
    assert!(matches!(err, ClientError::BadArgument { .. }));
}

#[test]
fn mem_cli_needs_a_secret_unless_insecure() {
    let log = temp_dir("cli").join("stderr");
    let out = Command::new(mem_support::memd_bin())
        .args(["--listen", "127.0.0.1:0", "--capacity", "1M"])
        .env_remove("VNODE_SECRET")
        .output()
        .expect("run vnode-memd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("VNODE_SECRET") && err.contains("--insecure"),
        "{err}"
    );
    // --insecure accepts any credential.
    let mut child = Command::new(mem_support::memd_bin())
        .args(["--listen", "127.0.0.1:0", "--capacity", "1M", "--insecure"])
        .env_remove("VNODE_SECRET")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("stdout");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("address line");
    let c = MemClient::connect(addr, &ClientAuth::insecure(1));
    // A client with a real credential cannot tell this server from an impostor: refused.
    let real = MemClient::connect(addr, &auth(1));
    let _ = child.kill();
    let _ = child.wait();
    c.expect("insecure server accepts an insecure client");
    let err = real.expect_err("a secure client refuses a server that proves nothing");
    assert!(err.to_string().contains("did not prove"), "{err}");
}

#[test]
fn mem_cli_secret_file_and_ready_file() {
    let dir = temp_dir("cli");
    let secret = dir.join("secret");
    std::fs::write(&secret, b"from-a-file\n").expect("write secret");
    let ready = dir.join("ready");
    let ready_s = ready.to_str().expect("utf-8 path");
    let srv = Memd::start(&[
        "--secret-file",
        secret.to_str().expect("utf-8 path"),
        "--ready-file",
        ready_s,
    ]);
    let from_file = std::fs::read_to_string(&ready).expect("ready file");
    assert_eq!(from_file.trim(), srv.addr);
    let from_file = Secret::from_bytes(b"from-a-file".to_vec()).expect("key");
    MemClient::connect(&srv.addr, &ClientAuth::from_cluster_key(1, &from_file))
        .expect("file secret, newline trimmed");
    assert!(
        MemClient::connect(&srv.addr, &auth(1)).is_err(),
        "the file wins over the env"
    );
}

#[test]
fn mem_cli_rdma_transport_fails_clearly_here() {
    let log = temp_dir("cli").join("stderr");
    let mut child = spawn_memd(
        &[
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "1M",
            "--transport",
            "rdma",
        ],
        &log,
    );
    let status = child.wait().expect("wait");
    assert!(!status.success());
    let err = std::fs::read_to_string(&log).expect("stderr");
    assert!(
        err.contains("no RDMA device") || err.contains("without the `rdma` cargo feature"),
        "{err}"
    );
}

#[test]
fn mem_concurrent_clients_on_one_region_see_their_own_writes() {
    let srv = Memd::start(&[]);
    let mut c = MemClient::connect(&srv.addr, &auth(30)).expect("connect");
    c.alloc_region(0, 4 * 256).expect("alloc");
    let addr = srv.addr.clone();
    // Four "fault threads", each on its own connection and its own quarter of the region.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = MemClient::connect(&addr, &auth(30)).expect("connect");
                let mut out = vec![0u8; 8 * PAGE_SIZE];
                for round in 0..50u64 {
                    let pages: Vec<u64> = (0..8).map(|k| t * 256 + (round * 8 + k) % 256).collect();
                    let data = pattern(round * 10 + t, &pages);
                    c.write_pages(0, &pages, &data).expect("write");
                    c.read_pages(0, &pages, &mut out).expect("read");
                    assert_eq!(out, data, "thread {t} round {round}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
}

#[test]
fn mem_connections_beyond_the_limit_are_refused_busy() {
    let srv = Memd::start(&["--max-connections", "2"]);
    let _a = MemClient::connect(&srv.addr, &auth(1)).expect("first");
    let mut b = MemClient::connect(&srv.addr, &auth(1)).expect("second");
    let err = MemClient::connect(&srv.addr, &auth(1)).expect_err("third is over the limit");
    assert_eq!(err.code(), Some(ErrorCode::Busy), "{err}");
    // The served ones go on.
    b.alloc_region(1, 1).expect("alloc");
    drop(b);
    // A slot frees up when a client leaves (its thread notices the close).
    let mut ok = None;
    for _ in 0..100 {
        match MemClient::connect(&srv.addr, &auth(1)) {
            Ok(c) => {
                ok = Some(c);
                break;
            }
            Err(e) if e.code() == Some(ErrorCode::Busy) => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(ok.is_some(), "a slot was freed");
}
