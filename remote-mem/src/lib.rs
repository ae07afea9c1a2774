//! Remote memory for vNode: the `vnode-memd` memory server and the client library the VMM's
//! fault-serving threads use to fetch and evict guest pages.
//!
//! - [`protocol`]: the versioned, length-prefixed wire protocol (with its state machine).
//! - [`transport`]: byte streams the protocol runs over: TCP (default), RDMA (`rdma` feature).
//! - [`auth`]: the handshake's challenge-response, client and server sides.
//! - [`client`]: [`MemClient`], one authenticated connection, pipelined and batched.
//! - [`replica`]: [`ReplicatedRegion`], a region kept on a primary and a backup server, with
//!   fail-over and migration.
//! - [`server`]: the server: connection handling, the page store, the memory log.

pub mod auth;
pub mod client;
pub mod error;
pub mod health;
pub mod protocol;
pub mod replica;
pub mod server;
pub mod transport;

pub use auth::{ClientAuth, ServerKeys, VnodeKey};
pub use client::{MemClient, ReadTicket, WriteTicket};
pub use error::ClientError;
pub use health::{HealthSnapshot, RegionHealth, ReplicaState};
pub use protocol::{ErrorCode, PAGE_SIZE};
pub use replica::{Repair, ReplicaReadTicket, ReplicatedRegion, Role};
