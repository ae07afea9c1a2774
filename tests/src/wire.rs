//! What crosses the wire: a relay that records every byte of one TCP connection both ways, and
//! the check that a secret is not among them (raw, or hex in either case).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;

/// A TCP relay on 127.0.0.1 to `target` for one connection; returns its address and a handle
/// that yields every byte seen in both directions once either side closes.
pub fn recording_relay(target: String) -> (String, JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = l.local_addr().expect("addr").to_string();
    let h = std::thread::spawn(move || {
        let (a, _) = l.accept().expect("accept");
        let b = TcpStream::connect(&target).expect("connect target");
        let up = pump(a.try_clone().expect("clone"), b.try_clone().expect("clone"));
        let down = pump(b, a);
        let mut all = up.join().expect("up");
        all.extend(down.join().expect("down"));
        all
    });
    (addr, h)
}

/// Copies `from` to `to` until `from` ends, returning what it copied.
fn pump(mut from: TcpStream, mut to: TcpStream) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let (mut seen, mut buf) = (Vec::new(), [0u8; 65536]);
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
        seen
    })
}

/// Panics if `secret` is in `wire` as raw bytes or as hex (lower or upper case).
pub fn assert_absent(wire: &[u8], what: &str, secret: &[u8]) {
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    for needle in [
        secret.to_vec(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
    ] {
        assert!(
            !wire.windows(needle.len()).any(|w| w == needle.as_slice()),
            "the {what} is on the wire"
        );
    }
}

/// The number of threads of process `pid`.
pub fn threads_of(pid: u32) -> usize {
    crate::proc_status(pid, "Threads")
        .and_then(|n| n.parse().ok())
        .expect("Threads: line")
}
