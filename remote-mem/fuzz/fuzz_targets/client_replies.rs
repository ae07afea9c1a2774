//! Fuzzes the client's reply handling: a `MemClient` whose server answers with arbitrary bytes.
//! Whatever a (broken or hostile) server sends, the client must return an error or data of the
//! right size, never panic or hang.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remote_mem::protocol::PAGE_SIZE;
use remote_mem::transport::Scripted;
use remote_mem::{ClientAuth, MemClient};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Half the inputs get a valid handshake so the fuzzer reaches the request replies.
    let conn = if mode & 1 == 0 {
        Scripted::after_insecure_handshake(rest, "fuzz:0")
    } else {
        Scripted::new(rest.to_vec(), "fuzz:0")
    };
    let Ok(mut c) = MemClient::with_conn(Box::new(conn), &ClientAuth::insecure(1)) else {
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
