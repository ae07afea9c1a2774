//! virtio-blk: `device` (configuration and features), `handler` (the queue-processing thread),
//! `request` (descriptor-chain parsing) and `backend` (file or NBD storage).

pub mod backend;
pub mod device;
pub mod handler;
pub mod request;

pub use backend::{BackendError, BlockBackend, FileBackend, NbdBackend, ReplicatedBackend};
pub use device::Block;
