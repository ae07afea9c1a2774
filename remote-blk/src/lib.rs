//! Remote block storage for vNode: `vnode-blkd`, an NBD server over raw files, and the NBD
//! client library behind the VMM's virtio-blk backend.
//!
//! - [`nbd::protocol`]: the NBD wire format and handshake state machine (plain code, fuzzed).
//! - [`nbd::server`]: the server: a thread per connection serving requests inline.
//! - [`nbd::client`]: a pipelined client (`submit` + completion callback, or blocking calls).
//! - [`backend`]: the raw file behind an export.
//! - [`replica`]: client-side replication (write to N servers, ack when all have it).
//! - [`metrics`]: the server's Prometheus registry (`--metrics-listen`).
//! - [`threads`]: a start hook for the client's threads (vnode sandboxes them).

pub mod backend;
pub mod metrics;
pub mod nbd;
pub mod replica;
pub mod threads;
