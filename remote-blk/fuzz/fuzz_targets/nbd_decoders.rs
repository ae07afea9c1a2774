//! Every NBD decoder on arbitrary bytes: none may panic, and what decodes re-encodes to the
//! same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remote_blk::nbd::protocol::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::decode(data) {
        assert_eq!(&r.encode()[..], &data[..REQUEST_LEN]);
    }
    if let Ok(h) = OptionHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..OPTION_HEADER_LEN]);
    }
    if let Ok(r) = InfoRequest::decode(data) {
        assert_eq!(r.encode(), data);
    }
    if let Ok(r) = OptionReply::decode(data) {
        let end = OPTION_REPLY_HEADER_LEN + r.len as usize;
        if data.len() >= end {
            let body = &data[OPTION_REPLY_HEADER_LEN..end];
            assert_eq!(
                OptionReply::encode_with(r.option, r.kind, body),
                &data[..end]
            );
        }
    }
    let _ = Info::decode(data);
    let _ = decode_rep_server(data);
    let _ = decode_simple_reply(data);
    if let Ok(step) = remote_blk::nbd::auth::AuthStep::decode(data) {
        assert_eq!(step.encode(), data, "auth step round trip");
    }
    let _ = remote_blk::nbd::auth::decode_challenge(data);
});
