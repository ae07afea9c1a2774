//! Fuzzes the client's reply handling: a `MemClient` whose server answers with arbitrary bytes.
//! Whatever a (broken or hostile) server sends, the client must return an error or data of the
//! right size, never panic or hang.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remote_mem::protocol::{encode_hello_ok, PAGE_SIZE};
use remote_mem::transport::Scripted;
use remote_mem::MemClient;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Half the inputs get a valid handshake so the fuzzer reaches the request replies.
    let mut replies = Vec::new();
    if mode & 1 == 0 {
        encode_hello_ok(&mut replies, 1, 1, 1);
    }
    replies.extend_from_slice(rest);
    let conn = Scripted::new(replies, "fuzz:0");
    let Ok(mut c) = MemClient::with_conn(Box::new(conn), 1, b"secret") else {
        return;
    };
    let mut out = vec![0u8; 4 * PAGE_SIZE];
    let _ = c.read_pages(0, &[1, 2], &mut out[..2 * PAGE_SIZE]);
    let t = c.submit_read(0, &[3]);
    let _ = c.write_pages(0, &[3], &[7u8; PAGE_SIZE]);
    if let Ok(t) = t {
        let _ = c.complete_read(t, &mut out[..PAGE_SIZE]);
    }
    let _ = c.alloc_region(1, 2);
    let _ = c.open_region(1, 2);
    let _ = c.free_region(1);
});
