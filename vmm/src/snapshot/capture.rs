//! Taking a snapshot of a paused VM: KVM's VM and vCPU state, the serial port, each virtio
//! transport, and the configuration, into a [`Snapshot`]; then into a file, written beside its
//! final name and renamed into place, so a reader never sees half a snapshot under that name.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vm_memory::GuestMemoryMmap;

use super::file::{self, SnapshotFileError};
use super::{SavedConfig, Snapshot};
use crate::builder::Transport;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::persist::VirtioPersistError;
use crate::kvm::persist::{Skipped, VcpuStateHandle};
use crate::kvm::{KvmError, Vm};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("virtio slot {slot}")]
    Virtio {
        slot: usize,
        #[source]
        source: VirtioPersistError,
    },
    #[error("cannot write snapshot {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: SnapshotFileError,
    },
    #[error("cannot create snapshot {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a snapshot is taken from. The VM must be paused: vCPUs parked outside KVM_RUN with
/// their pending I/O completed, device threads parked with no request in flight.
pub struct Sources<'a> {
    pub vm: &'a Vm,
    pub vcpus: &'a [VcpuStateHandle],
    pub serial: &'a Mutex<SerialDevice>,
    pub virtio: &'a [Transport],
    pub config: &'a SavedConfig,
}

/// Reads the paused VM's state.
pub fn capture(src: &Sources<'_>) -> Result<Snapshot, CaptureError> {
    let msr_list = src.vm.msr_index_list()?;
    let mut skipped = Skipped::default();
    let mut vcpus = Vec::with_capacity(src.vcpus.len());
    for h in src.vcpus {
        vcpus.push(h.save_state(&msr_list, &mut skipped)?);
    }
    skipped.msrs.sort_unstable();
    skipped.msrs.dedup();
    skipped.parts.sort_unstable();
    skipped.parts.dedup();
    let vm = src.vm.save_state()?;
    let serial = src
        .serial
        .lock()
        .expect("serial lock poisoned")
        .save_state();
    let mut virtio = Vec::with_capacity(src.virtio.len());
    for (slot, t) in src.virtio.iter().enumerate() {
        let s = t
            .lock()
            .expect("virtio transport lock poisoned")
            .save_state()
            .map_err(|source| CaptureError::Virtio { slot, source })?;
        virtio.push(s);
    }
    if skipped != Skipped::default() {
        tracing::info!(?skipped, "vCPU state KVM would not save on this host");
    }
    Ok(Snapshot {
        vnode_version: env!("CARGO_PKG_VERSION").to_owned(),
        config: src.config.clone(),
        vm,
        vcpus,
        serial,
        virtio,
        skipped,
    })
}

/// Writes `snapshot` (with local guest RAM `ram`) to `path`, durably: into `path.partial`,
/// fsynced, then renamed. Returns the file's size.
pub fn write_file(
    path: &Path,
    snapshot: &Snapshot,
    ram: Option<&GuestMemoryMmap>,
) -> Result<u64, CaptureError> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let create = |source| CaptureError::Create {
        path: path.to_owned(),
        source,
    };
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(create)?;
    let write = |source| CaptureError::Write {
        path: path.to_owned(),
        source,
    };
    let result = file::write(&f, snapshot, ram)
        .and_then(|n| f.sync_all().map(|()| n).map_err(SnapshotFileError::from))
        .map_err(write);
    let size = match result {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, path).map_err(create)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(size)
}
