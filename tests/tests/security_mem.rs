//! Former exploits on vnode-memd, each now refused with a clear error while a real vNode (the
//! victim, a test guest on real KVM with its RAM on the server) keeps running and ends `ok:true`:
//! another vNode's region read, written, freed and migrated with the attacker's own valid
//! credential; a guessed vNode id; a replayed handshake; a fake server; 2,000 idle sockets; a
//! data directory too small for a region; and no key or credential bytes on the wire.

mod mem_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use mem_support::{auth, cluster_key, temp_dir, Memd, SECRET_STR};
use remote_mem::protocol::{self, ErrorCode, Header, Op, HEADER_LEN, NONCE_LEN};
use remote_mem::{ClientAuth, MemClient, PAGE_SIZE};
use vnode_common::cred;
use vnode_tests::wire::{assert_absent, recording_relay, threads_of};
use vnode_tests::{bin, vnode_testguest, wait_deadline};

const VICTIM: u64 = 0x5eed_0000_0000_0001;
const ATTACKER: u64 = 0x5eed_0000_0000_0002;

/// A victim vNode running the memory test guest with its RAM on `addr`, authenticated with
/// its own credential (derived by `vnode-cred`, as the manager would hand it over).
struct Victim {
    child: Child,
    out: JoinHandle<String>,
}

impl Victim {
    fn start(addr: &str, passes: u32) -> Victim {
        let dir = temp_dir("victim");
        let cred_file = dir.join("victim.cred");
        let out = Command::new(bin("vnode-cred"))
            .args(["mem", "--vnode-id", &format!("{VICTIM:#x}")])
            .env("VNODE_SECRET", SECRET_STR)
            .output()
            .expect("run vnode-cred");
        assert!(out.status.success(), "vnode-cred: {out:?}");
        std::fs::write(&cred_file, &out.stdout).expect("write credential");
        let cmdline = format!("test=mem bytes=64M pattern=random seed=3 writes=50 passes={passes}");
        let mut cmd = vnode_testguest(
            "128M",
            1,
            &cmdline,
            &[
                "--mem-server",
                addr,
                "--local-mem",
                "8M",
                "--vnode-id",
                &format!("{VICTIM:#x}"),
                "--mem-credential-file",
                cred_file.to_str().expect("utf-8 path"),
            ],
        );
        cmd.env_remove("VNODE_SECRET");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vnode");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        stdout.read_line(&mut first).expect("first line");
        assert!(
            first.contains("testguest"),
            "guest did not start: {first:?}"
        );
        let out = std::thread::spawn(move || {
            let mut rest = first;
            let _ = stdout.read_to_string(&mut rest);
            rest
        });
        Victim { child, out }
    }

    /// Waits for the guest and asserts it verified all its memory.
    fn assert_ok(mut self) {
        let st = wait_deadline(&mut self.child, Duration::from_secs(240));
        let out = self.out.join().expect("stdout reader");
        assert!(st.success(), "victim vnode failed ({st}): {out}");
        assert!(
            out.contains("\"ok\":true"),
            "the victim's guest did not end ok:true: {out}"
        );
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

#[test]
fn another_vnodes_region_is_out_of_reach_of_a_valid_credential() {
    let srv = Memd::start(&["--capacity", "512M"]);
    let victim = Victim::start(&srv.addr, 6);
    // The attacker holds its own, valid credential: it gets in, as itself.
    let mut a = MemClient::connect(&srv.addr, &auth(ATTACKER)).expect("attacker's own session");
    let mut page = vec![0u8; PAGE_SIZE];
    // Region 0 is the victim's guest RAM; in the attacker's session it names the attacker's.
    let e = a.read_pages(0, &[0], &mut page).expect_err("read");
    assert_eq!(e.code(), Some(ErrorCode::NoRegion), "{e}");
    let e = a
        .write_pages(0, &[0], &[0xee; PAGE_SIZE])
        .expect_err("write");
    assert_eq!(e.code(), Some(ErrorCode::NoRegion), "{e}");
    let e = a.free_region(0).expect_err("free");
    assert_eq!(e.code(), Some(ErrorCode::NoRegion), "{e}");
    let e = a.migrate_region(0, "127.0.0.1:9").expect_err("migrate");
    assert_eq!(e.code(), Some(ErrorCode::NoRegion), "{e}");
    // Claiming the victim's id with the attacker's credential, or a guessed id with none.
    let attackers = cred::mem_credential(&cluster_key(), ATTACKER);
    let e = MemClient::connect(&srv.addr, &ClientAuth::vnode(VICTIM, attackers))
        .expect_err("victim's id with the attacker's credential");
    assert_eq!(e.code(), Some(ErrorCode::Auth), "{e}");
    assert!(e.to_string().contains("wrong credential"), "{e}");
    let guessed = cred::Credential::from_bytes([0x41; 32]);
    let e = MemClient::connect(&srv.addr, &ClientAuth::vnode(VICTIM, guessed))
        .expect_err("guessed credential");
    assert_eq!(e.code(), Some(ErrorCode::Auth), "{e}");
    let e = MemClient::connect(&srv.addr, &ClientAuth::insecure(VICTIM)).expect_err("no key");
    assert_eq!(e.code(), Some(ErrorCode::Auth), "{e}");
    victim.assert_ok();
}

/// Reads the challenge of a fresh raw connection.
fn raw_challenge(addr: &str) -> (TcpStream, [u8; NONCE_LEN]) {
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).expect("challenge");
    assert_eq!(Header::decode(&hb).expect("header").op, Op::Challenge);
    let mut n = [0u8; NONCE_LEN];
    s.read_exact(&mut n).expect("nonce");
    (s, n)
}

fn read_frame(s: &mut TcpStream) -> (Header, Vec<u8>) {
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).expect("reply header");
    let h = Header::decode(&hb).expect("valid header");
    let mut body = vec![0u8; h.len];
    s.read_exact(&mut body).expect("reply body");
    (h, body)
}

#[test]
fn a_replayed_handshake_is_refused() {
    let srv = Memd::start(&[]);
    // A legitimate handshake, its client bytes captured.
    let (mut s, nonce) = raw_challenge(&srv.addr);
    let mut captured = Vec::new();
    auth(VICTIM)
        .hello(&nonce)
        .expect("hello")
        .encode(&mut captured, 1);
    s.write_all(&captured).expect("send");
    assert_eq!(
        read_frame(&mut s).0.op,
        Op::HelloOk,
        "the original is accepted"
    );
    // The same bytes on a new connection answer a different challenge: refused and closed.
    let (mut s2, nonce2) = raw_challenge(&srv.addr);
    assert_ne!(nonce, nonce2, "fresh nonce per connection");
    s2.write_all(&captured).expect("replay");
    let (h, body) = read_frame(&mut s2);
    assert_eq!(h.op, Op::Error);
    let (code, msg) = protocol::decode_error(&body).expect("error body");
    assert_eq!(code, ErrorCode::Auth);
    assert!(msg.contains("wrong credential"), "{msg}");
    let mut rest = Vec::new();
    assert_eq!(s2.read_to_end(&mut rest).expect("closed"), 0);
    // The original session is unharmed.
    let mut alloc = Vec::new();
    protocol::encode_alloc(&mut alloc, 2, 0, 4);
    s.write_all(&alloc).expect("alloc");
    assert_eq!(read_frame(&mut s).0.op, Op::Done);
}

#[test]
fn a_fake_server_is_detected_by_the_client() {
    // It sends a proper challenge and accepts whatever comes, but cannot prove it holds the
    // cluster key.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut out = Vec::new();
        protocol::encode_challenge(&mut out, &[9; NONCE_LEN]);
        s.write_all(&out).expect("challenge");
        let (h, _) = read_frame(&mut s);
        let mut ok = Vec::new();
        protocol::encode_hello_ok(&mut ok, h.tag, 1 << 20, 1 << 20, &[0x77; 32]);
        s.write_all(&ok).expect("hello ok");
        // What the client does next: nothing, it must have hung up.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("read");
        rest
    });
    let e = MemClient::connect(&addr, &auth(VICTIM)).expect_err("impostor detected");
    assert!(e.to_string().contains("did not prove"), "{e}");
    assert!(
        fake.join().expect("fake server").is_empty(),
        "nothing sent after the failed proof"
    );
}

#[test]
fn two_thousand_idle_sockets_do_not_starve_a_running_vnode() {
    let srv = Memd::start(&["--capacity", "512M", "--max-connections", "64"]);
    let victim = Victim::start(&srv.addr, 8);
    let mut victim = victim;
    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        match TcpStream::connect(&srv.addr) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect {}: {e}", idle.len()),
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let threads = threads_of(srv.pid());
    assert!(
        threads <= 64 + 8,
        "threads bounded by --max-connections: {threads}"
    );
    assert!(victim.still_running(), "the victim is still running");
    // After the handshake deadline the idle ones are gone and new clients get in.
    std::thread::sleep(Duration::from_secs(11));
    let mut c = MemClient::connect(&srv.addr, &auth(ATTACKER)).expect("a new client gets in");
    c.alloc_region(1, 1).expect("and is served");
    assert!(
        srv.stderr().contains("too many connections"),
        "refusals logged"
    );
    drop(idle);
    victim.assert_ok();
}

#[test]
fn a_full_data_directory_refuses_the_region_and_the_server_lives() {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    let dir = temp_dir("small-fs");
    let mnt = dir.to_str().expect("utf-8 path");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt])
        .status()
        .expect("mount");
    assert!(st.success(), "mount tmpfs");
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.to_string());
    let data = dir.join("mem");
    let data_s = data.to_str().expect("utf-8 path");
    // A capacity the directory cannot hold is refused at start.
    let out = Command::new(mem_support::memd_bin())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "64M",
            "--data-dir",
            data_s,
        ])
        .env("VNODE_SECRET", SECRET_STR)
        .output()
        .expect("run vnode-memd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("more than the data directory"), "{err}");
    // One that fits starts (the memory log takes two slots per page: 1.5M of capacity needs
    // 3M of the 4M); then something else fills the filesystem.
    let srv = Memd::start(&["--capacity", "1536K", "--data-dir", data_s]);
    let mut c = MemClient::connect(&srv.addr, &auth(VICTIM)).expect("connect");
    c.alloc_region(0, 64).expect("256 KiB fit");
    c.write_pages(0, &[5], &[0xab; PAGE_SIZE]).expect("write");
    std::fs::write(dir.join("filler"), vec![1u8; 3 << 20]).expect("fill the filesystem");
    let e = c.alloc_region(1, 256).expect_err("1 MiB no longer fits");
    assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}");
    assert!(e.to_string().contains("no room"), "{e}");
    // The server is alive and the first region intact.
    let mut page = vec![0u8; PAGE_SIZE];
    c.read_pages(0, &[5], &mut page).expect("read back");
    assert!(page.iter().all(|&b| b == 0xab));
    let mut c2 = MemClient::connect(&srv.addr, &auth(ATTACKER)).expect("server alive");
    c2.alloc_region(0, 1).expect("a small region still fits");
}

#[test]
fn no_key_or_credential_crosses_the_wire() {
    let src = Memd::start(&[]);
    let dst = Memd::start(&[]);
    // A vNode's session through the relay, then a migration whose target is a relay in front of
    // the other server: both handshakes are recorded.
    let (client_relay, client_wire) = recording_relay(src.addr.clone());
    let (server_relay, server_wire) = recording_relay(dst.addr.clone());
    let mut c = MemClient::connect(&client_relay, &auth(VICTIM)).expect("through the relay");
    c.alloc_region(3, 8).expect("alloc");
    c.write_pages(3, &[1], &[0x5a; PAGE_SIZE]).expect("write");
    c.migrate_region(3, &server_relay)
        .expect("migrate through the relay");
    drop(c);
    let mut on_dst = MemClient::connect(&dst.addr, &auth(VICTIM)).expect("target");
    let mut page = vec![0u8; PAGE_SIZE];
    on_dst
        .read_pages(3, &[1], &mut page)
        .expect("moved with the same vNode id");
    assert!(page.iter().all(|&b| b == 0x5a));
    let key = cluster_key();
    let client_wire = client_wire.join().expect("relay");
    let server_wire = server_wire.join().expect("relay");
    assert!(
        // A live migration skips zero pages: the written page crosses, the 7 others do not.
        client_wire.len() > PAGE_SIZE && server_wire.len() > PAGE_SIZE,
        "traffic recorded"
    );
    for (wire, name) in [(&client_wire, "client"), (&server_wire, "server-to-server")] {
        assert_absent(wire, &format!("the cluster key ({name})"), key.as_bytes());
        for (what, c) in [
            (
                "the victim's credential",
                cred::mem_credential(&key, VICTIM),
            ),
            ("the servers' credential", cred::mem_server_credential(&key)),
        ] {
            assert_absent(wire, &format!("{what} ({name})"), c.as_bytes());
        }
    }
}
