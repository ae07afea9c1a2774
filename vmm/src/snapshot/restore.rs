//! Builds a VM from a snapshot instead of booting one: the same ordered list of `attach_*` steps
//! as `builder::build`, with saved state put back where the boot steps would load a kernel and
//! write boot tables. Guest RAM is local (filled from the file) or the region the snapshotted
//! VMM left on its memory servers (attached, not allocated). The result runs like a built VM.

use std::path::PathBuf;

use vm_memory::GuestMemoryMmap;

use super::file::{SnapshotFileError, SnapshotReader};
use super::{SavedMemory, Snapshot, SnapshotError};
use crate::boot::BootInfo;
use crate::builder::{
    attach_debug_ports, attach_disks, attach_i8042, attach_nets, attach_power_button,
    attach_serial, attach_sleep_ports, BuildError, Transport, Vmm,
};
use crate::config::{SerialOut, VmConfig};
use crate::devices::bus::IoBuses;
use crate::devices::persist::DevicePersistError;
use crate::devices::virtio::persist::VirtioPersistError;
use crate::devices::StopSignal;
use crate::kvm::persist::Skipped;
use crate::kvm::{KvmError, Vm};
use crate::memory::guest::local_memory;
use crate::memory::{remote_memory_with, RemoteMemory};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    File(#[from] SnapshotFileError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Device(#[from] DevicePersistError),
    #[error("virtio slot {slot}")]
    Virtio {
        slot: usize,
        #[source]
        source: VirtioPersistError,
    },
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
    #[error("no memory credential: give the vNode's credential (--mem-credential-file) or the cluster key (--mem-secret-file, VNODE_SECRET)")]
    NoSecret,
}

/// What the restoring process decides for itself.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub serial: SerialOut,
    pub kvm_device: PathBuf,
    /// The key this vNode proves to its memory servers (required when guest RAM is remote): its
    /// credential for the snapshot's vNode id, or the cluster key.
    pub mem_key: Option<remote_mem::VnodeKey>,
    pub excache_spin: bool,
}

/// The configuration of the VM to rebuild: the snapshot's, with this process's choices.
pub fn restored_config(s: &Snapshot, opts: &RestoreOptions) -> Result<VmConfig, RestoreError> {
    let c = &s.config;
    if s.vcpus.len() != c.vcpus as usize {
        return Err(RestoreError::Inconsistent(format!(
            "{} vCPU states for {} vCPUs",
            s.vcpus.len(),
            c.vcpus
        )));
    }
    if s.virtio.len() != c.disks.len() + c.nets.len() {
        return Err(RestoreError::Inconsistent(format!(
            "{} virtio states for {} disks and {} NICs",
            s.virtio.len(),
            c.disks.len(),
            c.nets.len()
        )));
    }
    if matches!(c.memory, SavedMemory::Remote { .. }) && opts.mem_key.is_none() {
        return Err(RestoreError::NoSecret);
    }
    let (disks, nets) = c.devices();
    Ok(VmConfig {
        kernel: c.kernel.clone(),
        initrd: None,
        cmdline: c.cmdline.clone(),
        mem_size: c.mem_size,
        vcpus: c.vcpus,
        serial: opts.serial.clone(),
        kvm_device: opts.kvm_device.clone(),
        corrupt: None,
        disks,
        nets,
        remote_mem: c.remote_mem(opts.mem_key.as_ref(), opts.excache_spin)?,
        mem_prealloc: false,
    })
}

/// Guest RAM: local RAM filled from the file, or the snapshotted VMM's region attached.
fn restore_memory(
    config: &VmConfig,
    reader: SnapshotReader,
    stop: &StopSignal,
) -> Result<(GuestMemoryMmap, Option<RemoteMemory>), RestoreError> {
    match &config.remote_mem {
        None => {
            let mem = local_memory(config.mem_size, false).map_err(BuildError::from)?;
            let pages = reader.load_ram(&mem)?;
            tracing::info!(pages, "guest RAM loaded from the snapshot");
            Ok((mem, None))
        }
        Some(rm) => {
            // The file must end where the header said (an empty RAM section): it is checked
            // whole before this, so only the header could be inconsistent.
            let remote =
                remote_memory_with(config.mem_size, rm, stop, true).map_err(BuildError::from)?;
            Ok((remote.mem.clone(), Some(remote)))
        }
    }
}

fn restore_virtio(transports: &[Transport], s: &Snapshot) -> Result<(), RestoreError> {
    for (slot, (t, saved)) in transports.iter().zip(&s.virtio).enumerate() {
        t.lock()
            .expect("virtio transport lock poisoned")
            .restore_state(saved)
            .map_err(|source| RestoreError::Virtio { slot, source })?;
    }
    Ok(())
}

/// Rebuilds the snapshotted VM, ready to run: memory, KVM platform and its saved state, devices
/// with theirs, then the vCPUs with theirs.
pub fn restore(
    s: &Snapshot,
    reader: SnapshotReader,
    opts: &RestoreOptions,
) -> Result<Vmm, RestoreError> {
    let config = restored_config(s, opts)?;
    let stop = StopSignal::new();
    let mut vm = Vm::new(&config.kvm_device)?;
    vm.setup_platform()?;
    let (mem, remote) = restore_memory(&config, reader, &stop)?;
    vm.map_memory(&mem)?;
    let mut buses = IoBuses::default();
    let serial = attach_serial(&vm, &mut buses, &config.serial)?;
    serial
        .lock()
        .expect("serial lock poisoned")
        .restore_state(&s.serial)?;
    attach_i8042(&mut buses, &stop)?;
    attach_debug_ports(&mut buses, &mem, &stop, &config)?;
    let mut transports = Vec::new();
    let disks = attach_disks(&vm, &mut buses, &mem, &config.disks, &mut transports)?;
    attach_nets(
        &vm,
        &mut buses,
        &mem,
        disks.len(),
        &config.nets,
        &mut transports,
    )?;
    attach_sleep_ports(&mut buses, &stop)?;
    let power_button = attach_power_button(&vm)?;
    vm.restore_state(&s.vm)?;
    let mut skipped = Skipped::default();
    let mut vcpus = Vec::with_capacity(s.vcpus.len());
    for state in &s.vcpus {
        let vcpu = vm.create_vcpu(state.index)?;
        vcpu.restore_state(state, &mut skipped)?;
        vcpus.push(vcpu);
    }
    if skipped != Skipped::default() {
        tracing::warn!(?skipped, "KVM refused part of the saved vCPU state");
    }
    restore_virtio(&transports, s)?;
    Ok(Vmm {
        vm,
        mem,
        vcpus,
        buses,
        stop,
        serial,
        boot: BootInfo {
            entry: 0,
            smp_entry: false,
        },
        remote,
        virtio: transports,
        power_button,
    })
}
