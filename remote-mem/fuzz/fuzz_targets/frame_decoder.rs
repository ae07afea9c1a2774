//! Fuzzes every decoder `vnode-memd` and its clients run on bytes from the network: frame
//! headers, request bodies, error and hello replies. Decoding must never panic, and a frame
//! that decodes must re-encode to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use remote_mem::protocol::{self, Header, Op, Request, HEADER_LEN};

fn reencode(h: &Header, req: &Request<'_>) -> Vec<u8> {
    let mut b = Vec::new();
    match *req {
        Request::Hello(hello) => hello.encode(&mut b, h.tag),
        Request::Ping => protocol::encode_ping(&mut b, h.tag),
        Request::Alloc { region, pages } => protocol::encode_alloc(&mut b, h.tag, region, pages),
        Request::Free { region } => protocol::encode_free(&mut b, h.tag, region),
        Request::MigrateIn { region, pages } => {
            protocol::encode_region_pages(&mut b, Op::MigrateIn, h.tag, region, pages)
        }
        Request::Commit { region } => protocol::encode_region(&mut b, Op::Commit, h.tag, region),
        Request::Open { region, pages } => protocol::encode_open(&mut b, h.tag, region, pages),
        Request::Migrate { region, target } => {
            protocol::encode_migrate(&mut b, h.tag, region, target)
        }
        Request::Read { region, pages } => {
            let idx: Vec<u64> = pages.iter().collect();
            protocol::encode_batch(&mut b, Op::Read, h.tag, region, &idx);
        }
        Request::Write {
            region,
            pages,
            data,
        } => {
            let idx: Vec<u64> = pages.iter().collect();
            protocol::encode_batch(&mut b, Op::Write, h.tag, region, &idx);
            b.extend_from_slice(data);
        }
    }
    b
}

fuzz_target!(|data: &[u8]| {
    if let Ok((h, req)) = protocol::decode_frame(data) {
        assert_eq!(h.len + HEADER_LEN, data.len());
        assert_eq!(reencode(&h, &req), data, "decode/encode round trip");
    }
    if data.len() >= HEADER_LEN {
        let body = &data[HEADER_LEN..];
        let _ = protocol::decode_error(body);
        let _ = protocol::decode_hello_ok(body);
        let _ = protocol::decode_opened(body);
    }
});
