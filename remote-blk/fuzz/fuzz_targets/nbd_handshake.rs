//! The server's whole option-haggling state machine on arbitrary client bytes: it must end
//! with a result (never panic or loop) whatever the client sends.
#![no_main]

use std::io::Cursor;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use remote_blk::backend::FileBackend;
use remote_blk::nbd::protocol::*;
use remote_blk::nbd::server::{Export, Server, ServerOptions};

fn server() -> &'static Arc<Server> {
    static S: OnceLock<Arc<Server>> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("nbd-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let export = |name: &str, public: bool| Export {
            name: name.into(),
            backend: FileBackend::open(&dir.join(name), Some(1 << 20), false).expect("backend"),
            public,
            read_only: false,
        };
        let key = vnode_common::secret::Secret::from_bytes(b"key".to_vec()).expect("key");
        Server::new(
            vec![export("disk", true), export("locked", false)],
            ServerOptions {
                cluster_key: Some(key),
                ..ServerOptions::default()
            },
        )
    })
}

/// Turns fuzz bytes into a client stream with well-formed framing most of the time, so the
/// fuzzer spends its effort inside the options rather than on the 64-bit magic: after the
/// client flags, each record is `selector, length, data[length]`, sent as an option
/// (selector picks the option) or, for selector 0xff, as raw bytes.
fn client_stream(data: &[u8]) -> Vec<u8> {
    const OPTS: [u32; 11] = [
        OPT_EXPORT_NAME,
        OPT_ABORT,
        OPT_LIST,
        OPT_STARTTLS,
        OPT_INFO,
        OPT_GO,
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        OPT_VNODE_AUTH,
        0x1234,
    ];
    let Some((&flags, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut s = u32::from(flags % 4).to_be_bytes().to_vec();
    while let [sel, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (body, next) = tail.split_at(n);
        if *sel == 0xff {
            s.extend_from_slice(body);
        } else {
            let h = OptionHeader {
                option: OPTS[usize::from(*sel) % OPTS.len()],
                len: n as u32,
            };
            s.extend_from_slice(&h.encode());
            s.extend_from_slice(body);
        }
        rest = next;
    }
    s
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let _ = server().negotiate(&mut Cursor::new(client_stream(data)), &mut out);
});
