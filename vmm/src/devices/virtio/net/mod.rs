//! virtio-net on a Linux TAP: `device` (configuration, features, starting the thread), `handler`
//! (the queue-processing thread), `chain` (descriptor-chain parsing) and `tap` (the TAP fd).

pub mod chain;
pub mod device;
pub mod handler;
pub mod tap;

pub use device::{default_mac, Net, VIRTIO_ID_NET};
pub use tap::{Tap, TapError};
