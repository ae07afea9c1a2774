//! The NBD client library (what the VMM's virtio-blk backend uses) against `vnode-blkd`,
//! `qemu-nbd` and `nbdkit file`: pipelined submits with many requests in flight, the blocking
//! calls, and the secret option.

mod blk_common;

use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc;

use blk_common::{have_tool, pattern, start_blkd, start_nbdkit, start_qemu_nbd, TempDir};
use remote_blk::nbd::client::{ClientError, Command, ConnectOptions, NbdClient};
use vnode_common::cred::{self, Credential};
use vnode_common::secret::Secret;

const SIZE: u64 = 16 << 20;

/// Exercises every operation and checks what reads back.
fn exercise(c: &NbdClient) {
    assert_eq!(c.size(), SIZE);
    let info = *c.info();
    assert!(!info.read_only && info.can_flush() && info.can_fua());

    // 512 pipelined 4 KiB writes, each with its own content, up to max_in_flight outstanding.
    let blocks = 512u64;
    let (tx, rx) = mpsc::channel();
    for i in 0..blocks {
        let tx = tx.clone();
        c.submit(
            Command::Write {
                offset: i * 4096,
                data: pattern(i, 4096),
                fua: i % 64 == 0,
            },
            Box::new(move |r| tx.send((i, r)).expect("test alive")),
        )
        .expect("submit write");
    }
    for _ in 0..blocks {
        let (i, r) = rx.recv().expect("completion");
        assert_eq!(
            r.unwrap_or_else(|e| panic!("write {i}: {e}")),
            Vec::<u8>::new()
        );
    }
    c.flush().expect("flush");
    // Read them back pipelined too, in reverse order.
    for i in (0..blocks).rev() {
        let tx = tx.clone();
        c.submit(
            Command::Read {
                offset: i * 4096,
                len: 4096,
            },
            Box::new(move |r| tx.send((i, r)).expect("test alive")),
        )
        .expect("submit read");
    }
    for _ in 0..blocks {
        let (i, r) = rx.recv().expect("completion");
        assert!(r.expect("read") == pattern(i, 4096), "block {i} differs");
    }
    assert_eq!(c.in_flight(), 0);

    // Blocking calls: a large unaligned write, zeroes, trim, FUA.
    let big = pattern(99, (3 << 20) + 123);
    c.write_at(&big, (4 << 20) + 7, true).expect("write_at");
    let mut got = vec![0u8; big.len()];
    c.read_at(&mut got, (4 << 20) + 7).expect("read_at");
    assert!(got == big);
    if info.can_write_zeroes() {
        c.write_zeroes(4 << 20, 65536, false).expect("write_zeroes");
        let mut z = vec![1u8; 65536];
        c.read_at(&mut z, 4 << 20).expect("read zeroes");
        assert!(z.iter().all(|&b| b == 0));
    }
    if info.can_trim() {
        c.trim(12 << 20, 1 << 20).expect("trim");
    }
    // Errors come back per request; the connection goes on.
    let mut past = [0u8; 4096];
    assert!(matches!(
        c.read_at(&mut past, SIZE - 1024),
        Err(ClientError::Remote { .. })
    ));
    let mut tail = vec![0u8; 4096];
    c.read_at(&mut tail, 0).expect("read after error");
    assert!(tail == pattern(0, 4096));
}

#[test]
fn client_against_vnode_blkd_tcp() {
    let dir = TempDir::new("blk-client-tcp");
    // The 3 MiB reads in exercise() take the sendfile path (simple replies).
    let srv = start_blkd(&[
        "--sendfile-min",
        "1M",
        "--export",
        &format!("disk={}:16M", dir.path("d.img").display()),
    ]);
    let c = NbdClient::connect(&srv.uri("disk"), &ConnectOptions::default()).expect("connect");
    exercise(&c);
}

#[test]
fn client_against_vnode_blkd_unix_and_pool_threads() {
    let dir = TempDir::new("blk-client-unix");
    let sock = dir.path("s.sock");
    let srv = start_blkd(&[
        "--socket",
        sock.to_str().expect("utf-8"),
        "--threads",
        "pool:3",
        "--export",
        &format!("disk={}:16M", dir.path("d.img").display()),
    ]);
    let c = NbdClient::connect(&srv.uri("disk"), &ConnectOptions::default()).expect("connect");
    exercise(&c);
}

#[test]
fn client_against_vnode_blkd_direct_io() {
    let dir = TempDir::new("blk-client-direct");
    // tmpfs has no O_DIRECT: use the target dir's file system.
    let img = std::env::current_exe()
        .expect("exe")
        .with_file_name(format!("blk-direct-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&img);
    let probe = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(&img);
    if let Err(e) = probe {
        eprintln!(
            "SKIPPED: O_DIRECT unsupported where {} lives: {e}",
            img.display()
        );
        return;
    }
    std::fs::remove_file(&img).expect("remove probe");
    let srv = start_blkd(&[
        "--direct",
        "--export",
        &format!("disk={}:16M", img.display()),
    ]);
    let c = NbdClient::connect(&srv.uri("disk"), &ConnectOptions::default()).expect("connect");
    assert_eq!(c.info().min_block, 512);
    let data = pattern(5, 1 << 20);
    c.write_at(&data, 8192, true).expect("direct write");
    let mut got = vec![0u8; data.len()];
    c.read_at(&mut got, 8192).expect("direct read");
    assert!(got == data);
    // Unaligned requests are refused, not corrupted.
    assert!(c.write_at(&data[..100], 3, false).is_err());
    drop(c);
    drop(srv);
    drop(dir);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn client_against_qemu_nbd() {
    if !have_tool("qemu-nbd") {
        return;
    }
    let dir = TempDir::new("blk-client-qemu");
    let img = dir.path("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(SIZE))
        .expect("image");
    let srv = start_qemu_nbd(&dir, &img, "disk");
    let c = NbdClient::connect(&srv.uri("disk"), &ConnectOptions::default()).expect("connect");
    exercise(&c);
}

#[test]
fn client_against_nbdkit_file() {
    if !have_tool("nbdkit") {
        return;
    }
    let dir = TempDir::new("blk-client-nbdkit");
    let img = dir.path("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(SIZE))
        .expect("image");
    let srv = start_nbdkit(&dir, &img, "disk");
    // A client holding a credential refuses a server that cannot prove it holds the cluster
    // key: nbdkit does not know vNode's option.
    let opts = ConnectOptions {
        credential: Some(Credential::from_bytes([7; 32])),
        ..Default::default()
    };
    let e = NbdClient::connect(&srv.uri("disk"), &opts)
        .err()
        .expect("refused");
    assert!(
        e.to_string().contains("does not do vNode authentication"),
        "{e}"
    );
    let c = NbdClient::connect(&srv.uri("disk"), &ConnectOptions::default()).expect("connect");
    exercise(&c);
}

#[test]
fn many_connections_many_requests_in_flight() {
    let dir = TempDir::new("blk-client-many");
    let srv = start_blkd(&[
        "--export",
        &format!("disk={}:64M", dir.path("d.img").display()),
    ]);
    let uri = srv.uri("disk");
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let uri = &uri;
            s.spawn(move || {
                let opts = ConnectOptions {
                    max_in_flight: 32,
                    ..Default::default()
                };
                let c = NbdClient::connect(uri, &opts).expect("connect");
                let base = t * (8 << 20);
                let (tx, rx) = mpsc::channel();
                for i in 0..256u64 {
                    let tx = tx.clone();
                    let cmd = Command::Write {
                        offset: base + i * 8192,
                        data: pattern(t * 1000 + i, 8192),
                        fua: false,
                    };
                    c.submit(cmd, Box::new(move |r| tx.send(r).expect("alive")))
                        .expect("submit");
                }
                for _ in 0..256 {
                    rx.recv().expect("completion").expect("write");
                }
                let mut got = vec![0u8; 256 * 8192];
                c.read_at(&mut got, base).expect("read back");
                for (i, chunk) in got.chunks(8192).enumerate() {
                    assert!(
                        chunk == pattern(t * 1000 + i as u64, 8192),
                        "conn {t} block {i}"
                    );
                }
            });
        }
    });
}

#[test]
fn credential_guards_an_export() {
    let dir = TempDir::new("blk-client-secret");
    let key = dir.path("key");
    std::fs::write(&key, "s3cret\r\n").expect("key file");
    let srv = start_blkd(&[
        "--export",
        &format!("open={}:1M", dir.path("o.img").display()),
        "--export",
        &format!("locked={}:1M", dir.path("l.img").display()),
        "--public",
        "open",
        "--secret-file",
        key.to_str().expect("utf-8 path"),
    ]);
    let cluster = Secret::from_bytes(b"s3cret".to_vec()).expect("key");
    let none = ConnectOptions::default();
    let with = |c| ConnectOptions {
        credential: Some(c),
        ..Default::default()
    };
    assert!(matches!(
        NbdClient::connect(&srv.uri("locked"), &none),
        Err(ClientError::Denied(_))
    ));
    let wrong = with(cred::blk_credential(&cluster, "open"));
    assert!(matches!(
        NbdClient::connect(&srv.uri("locked"), &wrong),
        Err(ClientError::Denied(_))
    ));
    let right = with(cred::blk_credential(&cluster, "locked"));
    let c = NbdClient::connect(&srv.uri("locked"), &right).expect("right credential");
    c.write_at(b"inside", 0, true).expect("write");
    let mut got = [0u8; 6];
    c.read_at(&mut got, 0).expect("read");
    assert_eq!(&got, b"inside");
    NbdClient::connect(&srv.uri("open"), &none).expect("a public export needs no credential");
    assert!(matches!(
        NbdClient::connect(&srv.uri("missing"), &right),
        Err(ClientError::Denied(_) | ClientError::NoSuchExport(_))
    ));
    // Standard tools without the credential are refused too (ClientError::Denied above is our
    // client's name for NBD_REP_ERR_POLICY; libnbd logs the server's message), and see only the
    // public export listed.
    if have_tool("nbdinfo") {
        let out = std::process::Command::new("nbdinfo")
            .arg(srv.uri("locked"))
            .env("LIBNBD_DEBUG", "1")
            .output()
            .expect("nbdinfo");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("requires vNode authentication"), "{err}");
        let out = std::process::Command::new("nbdinfo")
            .args(["--list", &srv.uri("")])
            .output()
            .expect("nbdinfo --list");
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.contains("open"), "{list}");
        assert!(
            !list.contains("locked"),
            "a protected export is not listed: {list}"
        );
    }
}
