//! The threads the client side starts (NBD reply readers, a replicated disk's resync thread),
//! and a hook each calls first: how a user that sandboxes its threads (vnode's seccomp filters)
//! gets these too. Set once, before connecting.

use std::sync::OnceLock;

/// Which client thread is starting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientThread {
    /// `nbd-client-rx`: reads one connection's replies.
    Reader,
    /// `blk-resync`: reconnects failed replicas (starting new readers) and copies their data.
    Resync,
}

static START: OnceLock<fn(ClientThread)> = OnceLock::new();

/// Sets the function every client thread calls at its start (later calls are ignored).
pub fn on_thread_start(f: fn(ClientThread)) {
    let _ = START.set(f);
}

/// Called first on each client thread.
pub(crate) fn started(kind: ClientThread) {
    if let Some(f) = START.get() {
        f(kind);
    }
}
