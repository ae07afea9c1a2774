//! vNode's control API, as a running `vnode` serves it on its Unix socket (`--api-socket`): the
//! request and response types (serde, with their OpenAPI schemas from utoipa) and a small blocking
//! [`client::Client`]. The compute agent, the manager and `vnodectl vm` link this crate; it links
//! no KVM and no VMM code.
//!
//! Endpoints (the OpenAPI document, `docs/api/vnode.openapi.json`, is generated from the server's
//! code and is the reference):
//!
//! | method | path            | body                | answer                 |
//! |--------|-----------------|---------------------|------------------------|
//! | GET    | `/vm`           |                     | [`VmInfo`]             |
//! | GET    | `/vm/counters`  |                     | [`Counters`]           |
//! | GET    | `/metrics`      |                     | Prometheus text format |
//! | PUT    | `/vm/pause`     |                     | [`VmInfo`]             |
//! | PUT    | `/vm/resume`    |                     | [`VmInfo`]             |
//! | PUT    | `/vm/shutdown`  | [`ShutdownRequest`] | [`VmInfo`] (202)       |
//! | PUT    | `/vm/stop`      |                     | [`VmInfo`]             |
//! | PUT    | `/vm/excache`   | [`ExCacheResize`]   | [`VmInfo`]             |
//! | PUT    | `/vm/snapshot`  | [`SnapshotRequest`] | [`SnapshotInfo`]       |
//!
//! Every error is a 4xx or 5xx status with an [`ErrorBody`]; a client's mistake (bad JSON, an
//! action the VM's state does not allow, an unknown path) is always a 4xx.

pub mod client;
mod snapshot;
mod types;

pub use snapshot::{SnapshotInfo, SnapshotRequest};
pub use types::*;

/// The API's paths, shared by the server's router and the client.
pub mod paths {
    pub const VM: &str = "/vm";
    pub const COUNTERS: &str = "/vm/counters";
    pub const METRICS: &str = "/metrics";
    pub const PAUSE: &str = "/vm/pause";
    pub const RESUME: &str = "/vm/resume";
    pub const SHUTDOWN: &str = "/vm/shutdown";
    pub const STOP: &str = "/vm/stop";
    pub const EXCACHE: &str = "/vm/excache";
    pub const MEM_SPARE: &str = "/vm/mem/spare";
    pub const SNAPSHOT: &str = "/vm/snapshot";
}
