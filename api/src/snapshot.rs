//! `PUT /vm/snapshot`: the request and the answer.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where to write the snapshot (a path on the vnode's host, written by the vnode process).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub path: String,
}

/// A snapshot written. The VM stays paused: `PUT /vm/stop` then ends this vnode and keeps guest
/// RAM on the memory servers for `vnode restore`; `PUT /vm/resume` goes on here instead (the
/// snapshot is then stale: its guest RAM on the servers changes again).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    pub path: String,
    /// Size of the file.
    pub bytes: u64,
    /// `local` (guest RAM is in the file) or `remote` (it stays on the memory servers).
    pub ram: String,
    /// Dirty ExCache pages written to the memory servers first (0 with local RAM).
    pub flushed_pages: u64,
    /// From the request to the file being on disk, the pause included, in milliseconds.
    pub took_ms: u64,
}
