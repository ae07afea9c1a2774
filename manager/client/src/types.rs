//! The manager's REST API types: what agents, servers, vnodectl and the manager exchange. Every
//! type here carries its OpenAPI schema (utoipa), so `docs/api/manager.openapi.json` is generated
//! from these definitions and cannot drift from them.

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// A size in bytes. JSON accepts a number of bytes or a string with a binary suffix
/// ("512M", "1G"): negative numbers, fractions of a byte and unknown suffixes are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, ToSchema)]
#[schema(value_type = u64)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
            Other(serde_json::Value),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(s) => vnode_common::size::parse_size(&s)
                .map(Size)
                .map_err(serde::de::Error::custom),
            Raw::Other(v) => Err(serde::de::Error::custom(format!(
                "invalid size {v}: use a whole number of bytes (not negative) or a string such as \"512M\""
            ))),
        }
    }
}

/// What a host is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum HostKind {
    /// Runs vNodes' vCPUs and ExCaches (a compute agent).
    Compute,
    /// Holds guest RAM regions (vnode-memd).
    Memory,
    /// Serves disks as NBD exports (a storage agent starting vnode-blkd).
    Storage,
}

impl std::fmt::Display for HostKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostKind::Compute => "compute",
            HostKind::Memory => "memory",
            HostKind::Storage => "storage",
        })
    }
}

/// How much of each resource a host offers (or has allocated). Only the fields that make sense
/// for the host's kind are non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct Capacity {
    /// vCPUs (compute hosts).
    #[serde(default)]
    pub vcpus: u32,
    /// Local memory for ExCaches, bytes (compute hosts).
    #[serde(default)]
    pub local_mem: Size,
    /// Remote memory for guest RAM regions, bytes (memory servers).
    #[serde(default)]
    pub mem: Size,
    /// Disk space for exports, bytes (storage servers).
    #[serde(default)]
    pub disk: Size,
}

/// `PUT /hosts/{id}`: a host registers (again after a restart: registration is idempotent).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisterHost {
    pub kind: HostKind,
    /// Where others reach it: a memory server's `IP:PORT`, a storage host's IP, a compute
    /// agent's IP.
    pub addr: String,
    pub capacity: Capacity,
}

/// A host as the manager sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub id: String,
    pub kind: HostKind,
    pub addr: String,
    pub capacity: Capacity,
    /// What the manager has placed on it.
    pub allocated: Capacity,
    /// Bytes in use as the server itself last reported (memory and storage servers).
    pub used: Option<u64>,
    /// False once it missed three heartbeats in a row.
    pub up: bool,
    /// Milliseconds since its last heartbeat (since the manager started, if none yet).
    pub last_seen_ms: u64,
    /// The vNodes it hosts (any part of).
    pub vnodes: Vec<u64>,
}

/// `POST /vnodes`: a vNode to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVnode {
    /// A unique name (default: vnode-ID).
    #[serde(default)]
    pub name: Option<String>,
    /// vCPUs, 1 to 64.
    pub vcpus: u32,
    /// Guest RAM, on memory servers (a primary and a backup).
    pub mem: Size,
    /// ExCache: how much guest RAM may be resident on the compute host (at most `mem`).
    pub local_mem: Size,
    /// Disk size; 0 or absent for no disk.
    #[serde(default)]
    pub disk_size: Size,
    /// The guest kernel, a path on the compute host.
    pub kernel: String,
    #[serde(default)]
    pub cmdline: String,
}

/// Where each part of a vNode lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Placement {
    /// The compute host running its vCPUs and ExCache.
    pub compute: String,
    /// Guest RAM regions. The memory path serves guest RAM as one region (region 0), so there is
    /// exactly one.
    pub regions: Vec<RegionPlacement>,
    pub disk: Option<DiskPlacement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RegionPlacement {
    pub region: u64,
    pub size: Size,
    pub primary: String,
    pub backup: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskPlacement {
    pub storage: String,
    pub export: String,
    pub size: Size,
}

/// A vNode's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VnodeState {
    /// Placed; its agent has not started it yet.
    Pending,
    Running,
    /// Its VMM exited (the guest's status is `exit_code`); compute and memory are released,
    /// the disk is kept until the vNode is deleted.
    Exited,
    /// Its VMM died (killed, or it could not start); resources released as for `exited`.
    Failed,
}

impl VnodeState {
    /// Whether the vNode still holds its compute and memory resources.
    pub fn is_active(self) -> bool {
        matches!(self, VnodeState::Pending | VnodeState::Running)
    }
}

/// A vNode as the manager sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VnodeView {
    pub id: u64,
    pub name: String,
    pub spec: CreateVnode,
    pub placement: Placement,
    pub state: VnodeState,
    pub exit_code: Option<i32>,
    /// Why it failed, or what is wrong now (a host it uses is down).
    pub message: Option<String>,
    /// The VMM's last counters read through its control API by its agent.
    #[schema(value_type = Object)]
    pub counters: Option<serde_json::Value>,
    /// The guest's serial console, a file on the compute host.
    pub console: Option<String>,
    /// Hosts it uses that are down now.
    pub hosts_down: Vec<String>,
}

/// What an agent says about one of its vNodes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VnodeReport {
    pub id: u64,
    pub state: VnodeState,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    #[schema(value_type = Object)]
    pub counters: Option<serde_json::Value>,
    pub console: Option<String>,
}

/// `POST /hosts/{id}/heartbeat`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    /// Bytes in use on a memory or storage server.
    #[serde(default)]
    pub used: Option<u64>,
    /// A compute agent's vNodes: running ones, and ones that ended since the last heartbeat.
    #[serde(default)]
    pub vnodes: Vec<VnodeReport>,
    /// A storage host's exports and where it serves each.
    #[serde(default)]
    pub exports: Vec<ServedExport>,
}

/// A vNode a compute agent must run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Assignment {
    pub id: u64,
    pub spec: CreateVnode,
    /// Guest RAM's memory servers, `ADDR` of the primary then of the backup.
    pub mem_servers: Vec<String>,
    /// The disk, as an `nbd://HOST:PORT/EXPORT` URL, once its storage host serves it.
    pub disk: Option<String>,
    /// This vNode's own memory credential (hex), never the cluster key.
    pub mem_credential: String,
    /// This vNode's own disk credential (hex).
    pub disk_credential: Option<String>,
}

/// An export a storage host must serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExportSpec {
    pub name: String,
    pub size: Size,
    /// The export's credential (hex), derived for this export only.
    pub credential: String,
}

/// What a storage host serves now: export name and the `HOST:PORT` of its NBD server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServedExport {
    pub name: String,
    pub addr: String,
}

/// The manager's answer to a heartbeat: what the host must run, keep and serve.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatReply {
    /// Milliseconds until the next heartbeat.
    pub interval_ms: u64,
    /// Compute hosts: the vNodes to run (others running there must be stopped).
    pub run: Vec<Assignment>,
    /// Memory servers: the vNodes whose regions must be kept (others' are freed).
    pub keep_vnodes: Vec<u64>,
    /// Storage hosts: the exports to serve (others are removed).
    pub exports: Vec<ExportSpec>,
}

/// Every error body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    /// When a follower refuses a write: the leader's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
}

/// `GET /leader`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeaderView {
    /// Whether this manager is the leader (always true with the SQLite store).
    pub leader: bool,
    /// The leader's URL, when known.
    pub leader_url: Option<String>,
    /// This manager's URL.
    pub me: String,
}

/// `GET /stats`: every vNode's ExCache counters and every server's usage.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterStats {
    pub vnodes: Vec<VnodeView>,
    pub hosts: Vec<HostView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_from_numbers_and_strings() {
        let s: Size = serde_json::from_str("4096").unwrap();
        assert_eq!(s, Size(4096));
        let s: Size = serde_json::from_str("\"512M\"").unwrap();
        assert_eq!(s, Size(512 << 20));
        for bad in ["-1", "1.5", "\"12Q\"", "true", "null", "\"-4K\""] {
            let e = serde_json::from_str::<Size>(bad).unwrap_err().to_string();
            assert!(e.contains("size"), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<CreateVnode>(
            r#"{"vcpus":1,"mem":"1G","local_mem":"1G","kernel":"k","vcpu":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("vcpu"), "{e}");
    }
}
