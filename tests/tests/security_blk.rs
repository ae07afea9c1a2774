//! Former exploits on vnode-blkd, each refused while a real vNode (the test guest on real KVM,
//! its disk a protected export it reaches with its own credential) keeps running and ends
//! `ok:true`: `NBD_OPT_LIST` no longer shows protected exports, 1,000 wrong credentials on one
//! connection are cut off after the limit, another export's credential does not open this one,
//! 2,000 idle sockets leave threads bounded, and no key or credential crosses the wire.

mod blk_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use blk_common::{start_blkd, Server, TempDir};
use remote_blk::nbd::auth::AuthStep;
use remote_blk::nbd::client::{ClientError, ConnectOptions, NbdClient};
use remote_blk::nbd::protocol::*;
use vnode_common::cred;
use vnode_common::secret::Secret;
use vnode_tests::wire::{assert_absent, recording_relay, threads_of};
use vnode_tests::{bin, vnode_testguest, wait_deadline};

const KEY: &str = "blk-cluster-key";
const SECTORS: u64 = 32 << 11; // 32 MiB

fn key() -> Secret {
    Secret::from_bytes(KEY.as_bytes().to_vec()).expect("key")
}

/// vnode-blkd with the cluster key, a protected export `victim`, a protected `other`, a public
/// `pub`, and `extra` args.
fn secure_blkd(dir: &TempDir, extra: &[&str]) -> Server {
    let keyfile = dir.path("cluster.key");
    std::fs::write(&keyfile, format!("{KEY}\n")).expect("key file");
    let exports = [
        format!("victim={}:{}", dir.path("v.img").display(), SECTORS * 512),
        format!("other={}:1M", dir.path("o.img").display()),
        format!("pub={}:1M", dir.path("p.img").display()),
    ];
    let mut args = vec![
        "--secret-file",
        keyfile.to_str().expect("utf-8 path"),
        "--public",
        "pub",
    ];
    for e in &exports {
        args.extend(["--export", e.as_str()]);
    }
    args.extend_from_slice(extra);
    start_blkd(&args)
}

/// The victim: the blk test guest on export `victim`, with only that export's credential
/// (from `vnode-cred`, as the manager would hand it over).
fn start_victim(dir: &TempDir, srv: &Server) -> (Child, JoinHandle<String>) {
    let cred_file = dir.path("victim.cred");
    let out = std::process::Command::new(bin("vnode-cred"))
        .args(["blk", "--export", "victim"])
        .env("VNODE_SECRET", KEY)
        .output()
        .expect("vnode-cred");
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&cred_file, &out.stdout).expect("credential file");
    let disk = format!(
        "{},credential-file={}",
        srv.uri("victim"),
        cred_file.display()
    );
    let cmdline = format!("test=blk sectors={SECTORS} pattern=random seed=9");
    let mut child = vnode_testguest("256M", 1, &cmdline, &["--disk", &disk])
        .env_remove("VNODE_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vnode");
    // The guest's first line comes after the disk is connected: attacks start after that.
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).expect("first line");
    assert!(
        first.contains("testguest"),
        "guest did not start: {first:?}"
    );
    let out = std::thread::spawn(move || {
        let mut s = first;
        let _ = stdout.read_to_string(&mut s);
        s
    });
    (child, out)
}

fn assert_victim_ok((mut child, out): (Child, JoinHandle<String>)) {
    let st = wait_deadline(&mut child, Duration::from_secs(300));
    let out = out.join().expect("stdout");
    assert!(st.success(), "victim failed ({st}): {out}");
    assert!(
        out.contains("\"ok\":true"),
        "victim's guest not ok:true: {out}"
    );
    assert!(out.contains("\"io_errors\":0"), "{out}");
}

/// A raw NBD connection past the greeting and client flags.
fn raw(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).expect("greeting");
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .expect("flags");
    s
}

fn send_opt(s: &mut TcpStream, option: u32, data: &[u8]) -> std::io::Result<()> {
    let h = OptionHeader {
        option,
        len: data.len() as u32,
    };
    let mut b = h.encode().to_vec();
    b.extend_from_slice(data);
    s.write_all(&b)
}

fn read_reply(s: &mut TcpStream) -> std::io::Result<(OptionReply, Vec<u8>)> {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h)?;
    let r = OptionReply::decode(&h).expect("reply header");
    let mut d = vec![0u8; r.len as usize];
    s.read_exact(&mut d)?;
    Ok((r, d))
}

#[test]
fn protected_exports_stay_closed_while_their_vnode_runs() {
    let dir = TempDir::new("sec-blk");
    let srv = secure_blkd(&dir, &["--max-connections", "64"]);
    let victim = start_victim(&dir, &srv);
    // NBD_OPT_LIST shows only the public export.
    let mut s = raw(&srv.addr);
    send_opt(&mut s, OPT_LIST, &[]).expect("list");
    let mut names = Vec::new();
    loop {
        let (r, d) = read_reply(&mut s).expect("list reply");
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_SERVER);
        names.push(String::from_utf8(decode_rep_server(&d).expect("name")).expect("utf-8"));
    }
    assert_eq!(names, ["pub"], "protected exports are not listed");
    // GO on the victim's export without a proof: refused.
    let go = InfoRequest {
        name: b"victim".to_vec(),
        requests: vec![],
    };
    send_opt(&mut s, OPT_GO, &go.encode()).expect("go");
    let (r, d) = read_reply(&mut s).expect("go reply");
    assert_eq!(r.kind, REP_ERR_POLICY, "{}", String::from_utf8_lossy(&d));
    // 1,000 wrong proofs on one connection: the server closes it after the limit.
    let mut s = raw(&srv.addr);
    let mut answered = 0;
    for i in 0..1000u32 {
        let start = AuthStep::Start {
            client_nonce: [i as u8; 32],
            export: b"victim".to_vec(),
        };
        let prove = AuthStep::Prove {
            proof: [(i % 251) as u8; 32],
        };
        if send_opt(&mut s, OPT_VNODE_AUTH, &start.encode()).is_err()
            || send_opt(&mut s, OPT_VNODE_AUTH, &prove.encode()).is_err()
        {
            break;
        }
        match (read_reply(&mut s), read_reply(&mut s)) {
            (Ok((c, _)), Ok((r, msg))) => {
                assert_eq!(c.kind, REP_VNODE_CHALLENGE);
                assert_eq!(r.kind, REP_ERR_POLICY);
                answered += 1;
                if answered == MAX_AUTH_FAILURES {
                    assert!(String::from_utf8_lossy(&msg).contains("closing"));
                }
            }
            _ => break,
        }
    }
    assert_eq!(answered, MAX_AUTH_FAILURES, "cut off after the limit");
    let mut rest = Vec::new();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap_or(0),
        0,
        "connection closed"
    );
    // Another export's credential, and a credential for a guessed name, do not open it.
    let other = ConnectOptions {
        credential: Some(cred::blk_credential(&key(), "other")),
        ..Default::default()
    };
    let e = NbdClient::connect(&srv.uri("victim"), &other)
        .err()
        .expect("refused");
    assert!(matches!(e, ClientError::Denied(_)), "{e}");
    NbdClient::connect(&srv.uri("other"), &other).expect("its own export opens");
    // 2,000 idle sockets: threads stay bounded by --max-connections.
    let idle: Vec<TcpStream> = (0..2000)
        .map(|_| TcpStream::connect(&srv.addr).expect("idle connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let threads = threads_of(srv.child.id());
    assert!(threads <= 64 + 8, "threads bounded: {threads}");
    // Past the handshake deadline the idle ones are gone; new clients get in.
    std::thread::sleep(Duration::from_secs(11));
    let c = NbdClient::connect(&srv.uri("pub"), &ConnectOptions::default()).expect("served");
    c.write_at(b"after", 0, true).expect("write");
    drop(idle);
    assert_victim_ok(victim);
}

#[test]
fn no_key_or_credential_crosses_the_wire() {
    let dir = TempDir::new("sec-blk-wire");
    let srv = secure_blkd(&dir, &[]);
    let (relay, wire) = recording_relay(srv.addr.clone());
    let c = cred::blk_credential(&key(), "victim");
    let opts = ConnectOptions {
        credential: Some(c.clone()),
        ..Default::default()
    };
    let client =
        NbdClient::connect(&format!("nbd://{relay}/victim"), &opts).expect("through relay");
    client.write_at(&[0x42; 4096], 0, true).expect("write");
    drop(client);
    let wire = wire.join().expect("relay");
    assert!(wire.len() > 4096, "traffic recorded");
    assert_absent(&wire, "cluster key", KEY.as_bytes());
    assert_absent(&wire, "credential", c.as_bytes());
}

#[test]
fn blkd_refuses_to_start_without_a_key() {
    let out = std::process::Command::new(blk_common::blkd_bin())
        .args(["--listen", "127.0.0.1:0", "--export", "d=/dev/null"])
        .env_remove("VNODE_SECRET")
        .output()
        .expect("run vnode-blkd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("VNODE_SECRET") && err.contains("--insecure"),
        "{err}"
    );
}
