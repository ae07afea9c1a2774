//! Fuzzes `vnode-memd`'s whole connection state machine from the client's side: the
//! challenge-response handshake, then requests, played as arbitrary bytes against a real
//! server (its in-memory page store). Half the inputs go to a server with a cluster key (the
//! fuzzer cannot forge a proof, so this is the refusal path of every malformed or wrong hello),
//! half to an `--insecure` one (a zero proof passes, so the fuzzer reaches every request).
//! The server must answer or close, never panic, and its store stays within its capacity.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use remote_mem::server::{Server, ServerConfig};
use remote_mem::transport::Scripted;
use vnode_common::secret::Secret;

fn server(secure: bool) -> &'static Server {
    static SECURE: OnceLock<Server> = OnceLock::new();
    static INSECURE: OnceLock<Server> = OnceLock::new();
    let (cell, key) = if secure {
        let key = Secret::from_bytes(b"fuzz cluster key".to_vec()).expect("a key");
        (&SECURE, Some(key))
    } else {
        (&INSECURE, None)
    };
    cell.get_or_init(|| {
        Server::bind("127.0.0.1:0", ServerConfig::new(256, key)).expect("an in-memory server")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let s = server(mode & 1 == 1);
    s.serve_conn(Scripted::new(rest.to_vec(), "fuzz:0"));
    let a = s.admin();
    assert!(a.used_pages() <= a.capacity_pages());
    // Each input starts from an empty store, so one run's regions do not shape the next.
    for v in a.vnodes() {
        a.free_vnode(v);
    }
    assert_eq!(a.used_pages(), 0);
});
