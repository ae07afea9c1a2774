//! The API's request and response bodies. `Counters` serializes to the same JSON object that
//! `vnode run --stats` prints at exit (`{"vmm": {...}, "excache": {...}}`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a VM is in its life. `created`: built, vCPUs not started yet; `running`; `paused`: every
/// vCPU is out of KVM_RUN and parked, devices process no queue; `shutting_down`: the guest was
/// asked to power off and is stopped at the deadline if it has not; `stopped`: vCPUs and devices
/// are stopped and vnode is exiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Created,
    Running,
    Paused,
    ShuttingDown,
    Stopped,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShuttingDown => "shutting_down",
            Self::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A running vnode: its state and a summary of its configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmInfo {
    /// The vNode id presented to memory servers (random unless `--vnode-id` was given); the
    /// process id when guest RAM is local.
    pub id: u64,
    pub state: VmState,
    pub config: VmConfigSummary,
    /// The socket this API is served on.
    pub api_socket: String,
    /// vnode's process id.
    pub pid: u32,
    /// vnode's version (`CARGO_PKG_VERSION`).
    pub version: String,
}

/// What the VM was configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmConfigSummary {
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub mem_size: u64,
    pub kernel: String,
    /// Guest RAM on memory servers behind the ExCache; absent for local guest RAM.
    pub excache: Option<ExCacheInfo>,
    pub disks: Vec<DiskInfo>,
    pub nets: Vec<NetInfo>,
}

/// The ExCache's configuration (its limit changes with `PUT /vm/excache`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExCacheInfo {
    /// How much guest RAM may be resident here, in bytes.
    pub local_mem: u64,
    /// Eviction policy: `fifo` or `clock`.
    pub policy: String,
    /// Memory servers (one, or primary and backup), or `local`.
    pub servers: Vec<String>,
    /// Largest prefetch window in pages.
    pub prefetch_max: u32,
}

/// One virtio-blk disk, in slot order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiskInfo {
    /// A file path or an NBD URI.
    pub source: String,
    pub read_only: bool,
}

/// One virtio-net device, in slot order after the disks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetInfo {
    pub tap: String,
    /// `52:54:00:xx:xx:xx`.
    pub mac: String,
}

/// Every counter of the VM: the ExCache's when guest RAM is remote (null otherwise), and the
/// VMM's. (`excache` first: the `--stats` line has always started with it.)
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Counters {
    pub excache: Option<ExCacheCounters>,
    /// One entry per replicated disk (`--disk URI,backup=URI`).
    #[serde(default)]
    pub replicated_disks: Vec<DiskReplication>,
    pub vmm: VmmCounters,
    /// The vNode id presented to memory servers (`0x` and 16 hex digits), when guest RAM is
    /// remote.
    pub vnode_id: Option<String>,
}

/// Guest RAM's replication when it is on a primary and a backup memory server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemReplication {
    pub region: u64,
    /// `healthy` (every replica healthy), `re-replicating` (a new copy is being filled while
    /// the guest runs) or `degraded` (one copy).
    pub state: String,
    pub replicas: Vec<MemReplica>,
    /// Replicas lost while another copy carried on.
    pub failovers: u64,
    /// When the current degraded period began (ms since the epoch); it lasts until a new copy
    /// is complete.
    pub degraded_since_unix_ms: Option<u64>,
    /// Time spent degraded so far, the current period included.
    pub degraded_ms: u64,
    /// New copies completed on spare servers (re-replications).
    #[serde(default)]
    pub rereplications: u64,
    /// Pages copied so far to the copy being filled (0 when none is).
    #[serde(default)]
    pub copied_pages: u64,
    /// Failed servers that may still hold a stale copy, freed when they answer again.
    #[serde(default)]
    pub stale_copies: Vec<String>,
}

/// One memory server holding guest RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemReplica {
    /// `primary` or `backup`.
    pub role: String,
    pub server: String,
    /// `healthy`, `copying` or `failed`.
    pub state: String,
    /// Why it failed, with its causes.
    pub failure: Option<String>,
}

/// One replicated disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskReplication {
    pub disk: String,
    /// `healthy`, `degraded`, or `failed` (no healthy replica).
    pub state: String,
    pub replicas: Vec<DiskReplica>,
    pub failovers: u64,
    /// Replicas brought back by a completed resync.
    pub resyncs: u64,
    pub degraded_since_unix_ms: Option<u64>,
    pub degraded_ms: u64,
}

/// One NBD export holding a replicated disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskReplica {
    pub uri: String,
    /// `healthy`, `copying` or `failed`.
    pub state: String,
    /// Bytes it lacks (dirty chunks x chunk size).
    pub dirty_bytes: u64,
    pub failure: Option<String>,
}

/// VM exits and device counters. Everything the guest can trigger is counted here.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmmCounters {
    pub exits_pio: u64,
    pub exits_mmio: u64,
    pub exits_hlt: u64,
    pub exits_other: u64,
    pub pio_unowned: u64,
    pub mmio_unowned: u64,
    pub int3_injected: u64,
    pub serial_errors: u64,
    /// virtio-blk requests completed (all disks), by outcome.
    pub blk_requests: u64,
    pub blk_bad_requests: u64,
    pub blk_io_errors: u64,
    pub blk_bytes_read: u64,
    pub blk_bytes_written: u64,
    pub blk_flushes: u64,
    /// Disks put in DEVICE_NEEDS_RESET by a chain they cannot answer.
    pub blk_broken: u64,
    /// Requests that waited in the ring because the bytes in flight were at their limit.
    #[serde(default)]
    pub blk_throttled: u64,
    /// virtio-net frames and bytes (bytes without the virtio-net header).
    pub net_tx_frames: u64,
    pub net_tx_bytes: u64,
    pub net_rx_frames: u64,
    pub net_rx_bytes: u64,
    pub net_tx_dropped: u64,
    pub net_rx_dropped: u64,
    pub net_bad_chains: u64,
    pub net_broken: u64,
}

/// The ExCache's counters. `hits` counts faults avoided by prefetching (reads of resident pages
/// never reach vnode, so they cannot be counted). Latencies are in microseconds and absent until
/// the first fault.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExCacheCounters {
    pub faults: u64,
    pub wp_faults: u64,
    pub hits: u64,
    pub zero_fills: u64,
    pub fetched: u64,
    pub evictions: u64,
    pub writebacks: u64,
    pub prefetched: u64,
    pub prefetch_used: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub fault_p50_us: Option<u64>,
    pub fault_p99_us: Option<u64>,
    pub fetch_fault_p50_us: Option<u64>,
    pub fetch_fault_p99_us: Option<u64>,
    /// Pages resident now, and the most ever resident at once.
    pub resident_pages: u64,
    pub max_resident_pages: u64,
    /// The ExCache's capacity in pages now.
    pub limit_pages: u64,
    pub time_us: PhaseTimesUs,
    /// Present when guest RAM is replicated on two memory servers.
    pub replication: Option<MemReplication>,
}

/// Where the fault thread's time went, in microseconds: serving faults in all, reclaiming between
/// faults (the reclaimer's write-backs and drops) in all, and within those two fetching,
/// installing (UFFDIO_COPY), waking the faulting thread, write-protecting victims, writing them
/// back and dropping them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PhaseTimesUs {
    pub serve: u64,
    pub fetch: u64,
    pub install: u64,
    pub wake: u64,
    pub protect: u64,
    pub writeback: u64,
    pub drop: u64,
    /// Time in the reclaimer between faults (absent from older VMMs' counters: 0).
    #[serde(default)]
    pub reclaim: u64,
}

/// A size: bytes as a number, or a string with binary units (`"64M"`, `"1.5G"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, vnode_common::size::SizeError> {
        match self {
            Self::Bytes(b) => Ok(*b),
            Self::Text(s) => vnode_common::size::parse_size(s),
        }
    }
}

impl From<u64> for Size {
    fn from(b: u64) -> Self {
        Self::Bytes(b)
    }
}

/// `PUT /vm/excache`: the ExCache's new capacity. Shrinking evicts down to it in the background
/// (the guest sees only misses); growing raises the limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExCacheResize {
    /// At least 1 MiB and at most the guest's RAM.
    pub local_mem: Size,
}

/// `PUT /vm/mem/spare`: a memory server that a lost replica of guest RAM is re-made on (at
/// once if one is lost now, else when one is). Guest RAM must be replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemSpare {
    /// `HOST:PORT` of a `vnode-memd` that accepts this vNode's credential.
    pub server: String,
}

/// The default time a guest gets to power off after the ACPI power button.
pub const DEFAULT_SHUTDOWN_DEADLINE_SECS: f64 = 30.0;

/// `PUT /vm/shutdown`: press the ACPI power button, and stop the VM if the guest has not powered
/// off after `deadline_secs`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Seconds (default 30; 0 stops at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_secs: Option<f64>,
}

/// Every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_snake_case() {
        let s = serde_json::to_string(&VmState::ShuttingDown).unwrap();
        assert_eq!(s, "\"shutting_down\"");
        assert_eq!(VmState::ShuttingDown.to_string(), "shutting_down");
    }

    #[test]
    fn resize_takes_bytes_or_text() {
        let r: ExCacheResize = serde_json::from_str(r#"{"local_mem":"64M"}"#).unwrap();
        assert_eq!(r.local_mem.bytes(), Ok(64 << 20));
        let r: ExCacheResize = serde_json::from_str(r#"{"local_mem":4096}"#).unwrap();
        assert_eq!(r.local_mem.bytes(), Ok(4096));
        let bad: ExCacheResize = serde_json::from_str(r#"{"local_mem":"lots"}"#).unwrap();
        assert!(bad.local_mem.bytes().is_err());
        assert!(serde_json::from_str::<ExCacheResize>(r#"{"local":1}"#).is_err());
    }

    #[test]
    fn counters_have_the_stats_line_shape() {
        let c = Counters {
            excache: Some(ExCacheCounters::default()),
            ..Counters::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["vmm"]["exits_pio"], 0);
        assert_eq!(v["excache"]["time_us"]["serve"], 0);
        let back: Counters = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }
}
