//! Snapshots of a running vNode: its vCPU, VM and device state and its configuration, written
//! to a file (`file` has the format) and restored in a new `vnode` process on the same memory
//! and storage servers (`restore`). Guest RAM stays on the memory servers when it is remote (the
//! snapshot flushes the ExCache's dirty pages there first and the region is kept when the VM
//! stops); local guest RAM goes into the file.
pub mod capture;
pub mod file;
pub mod restore;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{DiskSource, DiskSpec, NetSpec, VmConfig};
use crate::devices::persist::SerialSnapshot;
use crate::devices::virtio::persist::MmioSnapshot;
use crate::kvm::persist::{Skipped, VcpuState, VmState};

/// Where guest RAM was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SavedMemory {
    /// In this process: its pages are in the snapshot file.
    Local,
    /// On memory servers, as region 0 of `vnode_id` (the restored VMM attaches to it).
    Remote {
        servers: Vec<String>,
        vnode_id: u64,
        local_mem: u64,
        policy: String,
        prefetch_max: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// A file path or an NBD URI, as given to `--disk`.
    pub source: String,
    pub read_only: bool,
    /// Where the export's credential is (a path, not the credential: a restore reads it anew).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNet {
    pub tap: String,
    pub mac: [u8; 6],
}

/// The VM's configuration: what a restore must recreate (no secrets: those come from the
/// restoring process's environment, as for `vnode run`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    pub mem_size: u64,
    pub vcpus: u32,
    /// What the guest was booted from (informational: a restore loads no kernel).
    pub kernel: PathBuf,
    pub cmdline: String,
    pub memory: SavedMemory,
    pub disks: Vec<SavedDisk>,
    pub nets: Vec<SavedNet>,
}

/// Everything a snapshot file's header holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// The vnode that wrote it (informational; the file format version is what is checked).
    pub vnode_version: String,
    pub config: SavedConfig,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    /// One per virtio-mmio slot, in slot order (disks, then nets).
    pub virtio: Vec<MmioSnapshot>,
    /// What KVM would not let this host save (MSRs it refused, XSAVE where absent).
    pub skipped: Skipped,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("a VM whose RAM is in the in-process page store (--mem-server local) cannot be snapshotted: that store dies with the process")]
    LocalPageStore,
    #[error("snapshot names ExCache policy {0:?}, which this vnode does not know")]
    Policy(String),
}

fn policy_name(p: crate::memory::excache::Policy) -> String {
    format!("{p:?}").to_lowercase()
}

impl SavedConfig {
    /// The part of `c` a restore needs.
    pub fn from_config(c: &VmConfig) -> Result<Self, SnapshotError> {
        let memory = match &c.remote_mem {
            None => SavedMemory::Local,
            Some(rm) if rm.servers == ["local"] => return Err(SnapshotError::LocalPageStore),
            Some(rm) => SavedMemory::Remote {
                servers: rm.servers.clone(),
                vnode_id: rm.auth.vnode_id(),
                local_mem: rm.local_mem,
                policy: policy_name(rm.policy),
                prefetch_max: rm.prefetch_max,
            },
        };
        let disks = c
            .disks
            .iter()
            .map(|d| SavedDisk {
                source: match &d.source {
                    DiskSource::File(p) => p.display().to_string(),
                    DiskSource::Nbd(uri) => uri.clone(),
                    DiskSource::NbdReplicated { primary, backup } => {
                        format!("{primary},backup={backup}")
                    }
                },
                read_only: d.read_only,
                credential_file: d.credential_file.clone(),
            })
            .collect();
        let nets = c
            .nets
            .iter()
            .map(|n| SavedNet {
                tap: n.tap.clone(),
                mac: n.mac,
            })
            .collect();
        Ok(Self {
            mem_size: c.mem_size,
            vcpus: c.vcpus,
            kernel: c.kernel.clone(),
            cmdline: c.cmdline.clone(),
            memory,
            disks,
            nets,
        })
    }

    /// The disks and NICs to recreate, in slot order.
    pub fn devices(&self) -> (Vec<DiskSpec>, Vec<NetSpec>) {
        let disks = self
            .disks
            .iter()
            .map(|d| DiskSpec {
                source: if let Some((primary, backup)) = d.source.split_once(",backup=") {
                    DiskSource::NbdReplicated {
                        primary: primary.to_owned(),
                        backup: backup.to_owned(),
                    }
                } else if d.source.contains("://") {
                    DiskSource::Nbd(d.source.clone())
                } else {
                    DiskSource::File(PathBuf::from(&d.source))
                },
                read_only: d.read_only,
                credential_file: d.credential_file.clone(),
            })
            .collect();
        let nets = self
            .nets
            .iter()
            .map(|n| NetSpec {
                tap: n.tap.clone(),
                mac: n.mac,
            })
            .collect();
        (disks, nets)
    }

    /// The remote-memory configuration to attach with, given this process's key (`None` only
    /// for a snapshot of local RAM; checked by the caller).
    pub fn remote_mem(
        &self,
        key: Option<&remote_mem::VnodeKey>,
        spin: bool,
    ) -> Result<Option<crate::memory::RemoteMemConfig>, SnapshotError> {
        let SavedMemory::Remote {
            servers,
            vnode_id,
            local_mem,
            policy,
            prefetch_max,
        } = &self.memory
        else {
            return Ok(None);
        };
        Ok(Some(crate::memory::RemoteMemConfig {
            servers: servers.clone(),
            local_mem: *local_mem,
            policy: policy
                .parse()
                .map_err(|_| SnapshotError::Policy(policy.clone()))?,
            prefetch_max: *prefetch_max,
            auth: match key {
                Some(k) => k.auth(*vnode_id),
                None => remote_mem::ClientAuth::insecure(*vnode_id),
            },
            spin,
            reclaim: true,
            spares: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SerialOut;
    use crate::memory::excache::Policy;
    use crate::memory::RemoteMemConfig;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "test=mem".into(),
            mem_size: 256 << 20,
            vcpus: 2,
            serial: SerialOut::Stdout,
            kvm_device: "/dev/kvm".into(),
            corrupt: None,
            disks: vec![
                DiskSpec {
                    source: DiskSource::Nbd("nbd://127.0.0.1:1/x".into()),
                    read_only: false,
                    credential_file: Some("/run/x.cred".into()),
                },
                DiskSpec {
                    source: DiskSource::File("/d.img".into()),
                    read_only: true,
                    credential_file: None,
                },
            ],
            nets: vec![NetSpec {
                tap: "vn0".into(),
                mac: [0x52, 0x54, 0, 1, 2, 3],
            }],
            remote_mem: Some(RemoteMemConfig {
                servers: vec!["127.0.0.1:5".into()],
                local_mem: 64 << 20,
                policy: Policy::Fifo,
                prefetch_max: 8,
                auth: remote_mem::ClientAuth::vnode(
                    77,
                    vnode_common::cred::Credential::from_bytes(
                        *b"not saved, not saved, not saved!",
                    ),
                ),
                spin: false,
                reclaim: true,
                spares: Vec::new(),
            }),
            mem_prealloc: false,
        }
    }

    #[test]
    fn configuration_round_trips_without_the_secret() {
        let c = config();
        let saved = SavedConfig::from_config(&c).unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        assert!(!json.contains("not saved"), "no secret in the file: {json}");
        let back: SavedConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let (disks, nets) = back.devices();
        assert_eq!(disks, c.disks);
        assert_eq!(nets, c.nets);
        let key = remote_mem::VnodeKey::ClusterKey(
            vnode_common::secret::Secret::from_bytes(b"s".to_vec()).unwrap(),
        );
        let rm = back.remote_mem(Some(&key), false).unwrap().unwrap();
        assert_eq!(
            (rm.auth.vnode_id(), rm.local_mem, rm.policy),
            (77, 64 << 20, Policy::Fifo)
        );
        assert_eq!(rm.servers, vec!["127.0.0.1:5".to_string()]);
    }

    #[test]
    fn the_in_process_page_store_cannot_be_saved() {
        let mut c = config();
        c.remote_mem.as_mut().unwrap().servers = vec!["local".into()];
        assert!(matches!(
            SavedConfig::from_config(&c),
            Err(SnapshotError::LocalPageStore)
        ));
        c.remote_mem = None;
        let saved = SavedConfig::from_config(&c).unwrap();
        assert_eq!(saved.memory, SavedMemory::Local);
        assert!(saved.remote_mem(None, false).unwrap().is_none());
    }
}
