//! A KVM VM: platform devices in the kernel (irqchip, PIT), memory slots, irqfds, vCPUs.

use std::fs::OpenOptions;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::path::Path;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{ioctl_err, KvmError, Vcpu};
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

pub struct Vm {
    pub(super) kvm: Kvm,
    pub(super) fd: VmFd,
    /// Kept so the memory behind the KVM slots outlives the VM.
    mem: Option<GuestMemoryMmap>,
}

impl Vm {
    /// Opens the KVM device at `path` and creates a VM.
    pub fn new(path: &Path) -> Result<Self, KvmError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| KvmError::Open {
                path: path.to_owned(),
                source,
            })?;
        // SAFETY: the descriptor was just opened and is owned by nobody else; Kvm takes it over.
        let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
        let version = kvm.get_api_version();
        if version < 0 {
            return Err(KvmError::NotKvm {
                path: path.to_owned(),
                source: kvm_ioctls::Error::new(-version),
            });
        }
        if version != 12 {
            return Err(KvmError::ApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(|source| KvmError::NotKvm {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { kvm, fd, mem: None })
    }

    /// The in-kernel platform: TSS and identity-map pages, PIC+IOAPIC+LAPICs, PIT.
    pub fn setup_platform(&self) -> Result<(), KvmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(ioctl_err("KVM_CREATE_PIT2"))?;
        Ok(())
    }

    /// Gives every region of `mem` to the guest, one memory slot each.
    pub fn map_memory(&mut self, mem: &GuestMemoryMmap) -> Result<(), KvmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("a mapped region has a host address");
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes; `self.mem` keeps a
            // reference to it for as long as the VM exists, so KVM never sees it unmapped.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        self.mem = Some(mem.clone());
        Ok(())
    }

    /// Raises `gsi` whenever `evt` is written.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(ioctl_err("KVM_IRQFD"))
    }

    /// Writes `evt` whenever the guest writes to MMIO address `addr` (any value), without an
    /// exit to userspace.
    pub fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), KvmError> {
        self.fd
            .register_ioevent(
                evt,
                &kvm_ioctls::IoEventAddress::Mmio(addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(ioctl_err("KVM_IOEVENTFD"))
    }

    /// The CPUID entries KVM can give a guest.
    pub fn supported_cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>, KvmError> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(cpuid.as_slice().to_vec())
    }

    /// The largest number of vCPUs KVM recommends for one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    pub fn create_vcpu(&self, index: u32) -> Result<Vcpu, KvmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        Ok(Vcpu::new(fd, index))
    }
}
