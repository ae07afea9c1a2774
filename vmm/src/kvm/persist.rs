//! Saving and restoring what KVM holds for a VM: per vCPU its registers, special registers, FPU
//! (and XSAVE/XCRs where the host has them), MSRs, LAPIC, MP state, pending events, debug
//! registers and the CPUID it runs with; VM-wide the in-kernel PIC pair, IOAPIC, PIT and the
//! KVM clock. The state types are plain serde data (the snapshot file holds them); the save and
//! restore functions are the only code that reads or writes this state through kvm-ioctls.
//!
//! Ordering follows what KVM needs. Save: MP state first (reading it makes KVM accept pending
//! INIT/SIPI, which may change the LAPIC and registers), events last. Restore: CPUID before
//! anything (KVM checks MSRs and XSAVE against it), LAPIC before MSRs (the TSC deadline MSR
//! writes into the LAPIC timer), events last.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::{ioctl_err, KvmError};

/// Most MSRs asked for in one KVM_GET_MSRS / KVM_SET_MSRS call.
const MSR_CHUNK: usize = 64;

/// The ioctls a snapshot makes on a running VM (on the API thread, with the vCPUs parked):
/// every KVM_GET_* of [`save_vcpu`] and [`save_vm`], and KVM_GET_MSR_INDEX_LIST on the KVM
/// descriptor. The API thread's seccomp filter (`sandbox`) allows these and no other KVM ioctl.
pub const SNAPSHOT_IOCTLS: [u64; 16] = {
    use std::mem::size_of;
    use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};
    const KVMIO: u32 = 0xAE;
    const RW: u32 = _IOC_READ | _IOC_WRITE;
    const fn r(nr: u32, size: usize) -> u64 {
        ioctl_expr(_IOC_READ, KVMIO, nr, size as u32) as u64
    }
    const fn rw(nr: u32, size: usize) -> u64 {
        ioctl_expr(RW, KVMIO, nr, size as u32) as u64
    }
    use kvm_bindings::{kvm_cpuid2, kvm_msr_list, kvm_msrs};
    [
        rw(0x02, size_of::<kvm_msr_list>()),   // KVM_GET_MSR_INDEX_LIST
        rw(0x62, size_of::<kvm_irqchip>()),    // KVM_GET_IRQCHIP
        r(0x7c, size_of::<kvm_clock_data>()),  // KVM_GET_CLOCK
        r(0x9f, size_of::<kvm_pit_state2>()),  // KVM_GET_PIT2
        r(0x81, size_of::<kvm_regs>()),        // KVM_GET_REGS
        r(0x83, size_of::<kvm_sregs>()),       // KVM_GET_SREGS
        rw(0x88, size_of::<kvm_msrs>()),       // KVM_GET_MSRS
        r(0x8c, size_of::<kvm_fpu>()),         // KVM_GET_FPU
        r(0x8e, size_of::<kvm_lapic_state>()), // KVM_GET_LAPIC
        rw(0x91, size_of::<kvm_cpuid2>()),     // KVM_GET_CPUID2
        r(0x98, size_of::<kvm_mp_state>()),    // KVM_GET_MP_STATE
        r(0x9f, size_of::<kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
        r(0xa1, size_of::<kvm_debugregs>()),   // KVM_GET_DEBUGREGS
        r(0xa4, size_of::<kvm_xsave>()),       // KVM_GET_XSAVE
        r(0xa6, size_of::<kvm_xcrs>()),        // KVM_GET_XCRS
        ioctl_expr(_IOC_NONE, KVMIO, 0xa3, 0) as u64, // KVM_GET_TSC_KHZ
    ]
};

/// The legacy FPU/SSE state (KVM_GET_FPU), for hosts without XSAVE.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The 4 KiB XSAVE area (KVM_GET_XSAVE) as 1024 words; None where KVM_GET_XSAVE fails.
    pub xsave: Option<Vec<u32>>,
    /// None where KVM_GET_XCRS fails (no XSAVE on the host).
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value) of every MSR in KVM's index list that could be read.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    /// The guest TSC frequency, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// The VM-wide in-kernel devices and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// What could not be saved or restored, for the log and the snapshot's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// MSRs in KVM's list that KVM_GET_MSRS (or, at restore, KVM_SET_MSRS) refused.
    pub msrs: Vec<u32>,
    /// Optional pieces that are not there ("xsave", "xcrs", "tsc_khz").
    pub parts: Vec<String>,
}

/// Reads `indices` in chunks, skipping each MSR that KVM refuses (KVM_GET_MSRS stops at the
/// first it cannot read and returns how many it read).
fn read_msrs(
    fd: &VcpuFd,
    indices: &[u32],
    skipped: &mut Skipped,
) -> Result<Vec<(u32, u64)>, KvmError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| fam_err("building MSRs"))?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl_err("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < chunk.len() {
            skipped.msrs.push(chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(out)
}

/// Writes `msrs` in chunks, skipping each MSR that KVM refuses.
fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)], skipped: &mut Skipped) -> Result<(), KvmError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let fam = Msrs::from_entries(&entries).map_err(|_| fam_err("building MSRs"))?;
        let n = fd.set_msrs(&fam).map_err(ioctl_err("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            skipped.msrs.push(chunk[n].0);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(())
}

fn fam_err(op: &'static str) -> KvmError {
    KvmError::Ioctl {
        op,
        source: kvm_ioctls::Error::new(libc::E2BIG),
    }
}

/// Saves one vCPU. It must not be in KVM_RUN (the VM is paused). `msr_list` is KVM's
/// KVM_GET_MSR_INDEX_LIST.
pub(super) fn save_vcpu(
    fd: &VcpuFd,
    index: u32,
    msr_list: &[u32],
    skipped: &mut Skipped,
) -> Result<VcpuState, KvmError> {
    let mp_state = fd.get_mp_state().map_err(ioctl_err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(ioctl_err("KVM_GET_FPU"))?);
    let xsave = optional(fd.get_xsave(), "xsave", skipped).map(|x| x.region.to_vec());
    let xcrs = optional(fd.get_xcrs(), "xcrs", skipped);
    let debug_regs = fd
        .get_debug_regs()
        .map_err(ioctl_err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
    let tsc_khz = optional(fd.get_tsc_khz(), "tsc_khz", skipped);
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl_err("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(fd, msr_list, skipped)?;
    let events = fd
        .get_vcpu_events()
        .map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        index,
        cpuid,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

fn optional<T>(r: Result<T, kvm_ioctls::Error>, what: &str, skipped: &mut Skipped) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::debug!(what, "not saved: {e}");
            skipped.parts.push(what.to_owned());
            None
        }
    }
}

/// Restores one freshly created vCPU (never run) from `s`.
pub(super) fn restore_vcpu(
    fd: &VcpuFd,
    s: &VcpuState,
    skipped: &mut Skipped,
) -> Result<(), KvmError> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| fam_err("building CPUID"))?;
    fd.set_cpuid2(&cpuid).map_err(ioctl_err("KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(ioctl_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(ioctl_err("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(ioctl_err("KVM_SET_SREGS"))?;
    match &s.xsave {
        Some(words) => {
            let mut x = kvm_xsave::default();
            if words.len() != x.region.len() {
                return Err(KvmError::BadState("XSAVE area is not 4 KiB"));
            }
            x.region.copy_from_slice(words);
            // SAFETY: `x` is a whole 4 KiB kvm_xsave with no trailing components (KVM_SET_XSAVE
            // reads exactly that much; larger areas need KVM_SET_XSAVE2, never used here).
            unsafe { fd.set_xsave(&x) }.map_err(ioctl_err("KVM_SET_XSAVE"))?
        }
        None => fd
            .set_fpu(&kvm_fpu::from(&s.fpu))
            .map_err(ioctl_err("KVM_SET_FPU"))?,
    }
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(ioctl_err("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&s.debug_regs)
        .map_err(ioctl_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(ioctl_err("KVM_SET_LAPIC"))?;
    write_msrs(fd, &s.msrs, skipped)?;
    fd.set_vcpu_events(&s.events)
        .map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))?;
    if let Some(khz) = s.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!(khz, "cannot set the guest TSC frequency: {e}");
                skipped.parts.push("tsc_khz".into());
            }
        }
    }
    Ok(())
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut c)
        .map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Saves the in-kernel irqchip, PIT and clock. The vCPUs must be paused.
pub(super) fn save_vm(fd: &VmFd) -> Result<VmState, KvmError> {
    Ok(VmState {
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(ioctl_err("KVM_GET_PIT2"))?,
        clock: fd.get_clock().map_err(ioctl_err("KVM_GET_CLOCK"))?,
    })
}

/// Restores a VM whose platform (irqchip, PIT) was just created.
pub(super) fn restore_vm(fd: &VmFd, s: &VmState) -> Result<(), KvmError> {
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        fd.set_irqchip(chip).map_err(ioctl_err("KVM_SET_IRQCHIP"))?;
    }
    fd.set_pit2(&s.pit).map_err(ioctl_err("KVM_SET_PIT2"))?;
    // Only the clock value is restored: the flags KVM_GET_CLOCK reports (TSC_STABLE, REALTIME
    // with its host timestamps) describe the old host's clock, not a request.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(ioctl_err("KVM_SET_CLOCK"))?;
    Ok(())
}

impl super::Vm {
    /// The MSRs KVM can save and restore (KVM_GET_MSR_INDEX_LIST).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, KvmError> {
        Ok(self
            .kvm
            .get_msr_index_list()
            .map_err(ioctl_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec())
    }

    /// Saves the irqchip, PIT and clock (vCPUs paused).
    pub fn save_state(&self) -> Result<VmState, KvmError> {
        save_vm(&self.fd)
    }

    /// Restores the irqchip, PIT and clock after `setup_platform`.
    pub fn restore_state(&self, s: &VmState) -> Result<(), KvmError> {
        restore_vm(&self.fd, s)
    }
}

/// A second handle on a vCPU whose thread owns the [`super::Vcpu`], to save its state while
/// that thread is parked (the VM paused). KVM serializes vCPU ioctls on its own lock, and a
/// parked vCPU is not in KVM_RUN, so reading its state from another thread is safe.
pub struct VcpuStateHandle {
    fd: VcpuFd,
    index: u32,
}

impl VcpuStateHandle {
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Saves the vCPU (the VM is paused and its pending I/O completed: see `Vcpu::run`).
    pub fn save_state(
        &self,
        msr_list: &[u32],
        skipped: &mut Skipped,
    ) -> Result<VcpuState, KvmError> {
        save_vcpu(&self.fd, self.index, msr_list, skipped)
    }
}

impl super::Vm {
    /// A state handle on `vcpu` (a duplicate of its descriptor).
    pub fn state_handle(&self, vcpu: &super::Vcpu) -> Result<VcpuStateHandle, KvmError> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: dup of a descriptor this process owns; the result is checked below.
        let fd = unsafe { libc::dup(vcpu.fd.as_raw_fd()) };
        if fd < 0 {
            return Err(KvmError::Ioctl {
                op: "dup of a vCPU descriptor",
                source: kvm_ioctls::Error::last(),
            });
        }
        // SAFETY: `fd` is a fresh duplicate nothing else owns; VcpuFd takes it over (and maps
        // its own view of the vCPU's run structure, which this handle never uses).
        let fd = unsafe { self.fd.create_vcpu_from_rawfd(fd) }
            .map_err(ioctl_err("mapping a vCPU's run structure"))?;
        Ok(VcpuStateHandle {
            fd,
            index: vcpu.index(),
        })
    }
}

impl super::Vcpu {
    /// Saves this vCPU (not in KVM_RUN: the VM is paused).
    pub fn save_state(
        &self,
        msr_list: &[u32],
        skipped: &mut Skipped,
    ) -> Result<VcpuState, KvmError> {
        save_vcpu(&self.fd, self.index(), msr_list, skipped)
    }

    /// Restores a freshly created vCPU, instead of `configure`.
    pub fn restore_state(&self, s: &VcpuState, skipped: &mut Skipped) -> Result<(), KvmError> {
        restore_vcpu(&self.fd, s, skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::regs::{entry_regs, long_mode_sregs, reset_fpu};
    use crate::kvm::{Vcpu, VcpuBoot, Vm};
    use std::path::Path;

    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

    fn vm() -> Vm {
        let vm = Vm::new(Path::new("/dev/kvm")).expect("open /dev/kvm");
        vm.setup_platform().expect("platform");
        vm
    }

    fn json<T: Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).expect("serializable")
    }

    fn booted_vcpu(vm: &Vm) -> Vcpu {
        let vcpu = vm.create_vcpu(0).expect("vcpu");
        let cpuid = vm.supported_cpuid().expect("cpuid");
        let boot = VcpuBoot {
            regs: entry_regs(0x10_0000, None),
            sregs: long_mode_sregs,
            fpu: reset_fpu(),
        };
        vcpu.configure(&cpuid, &[(MSR_KERNEL_GS_BASE, 0xdead_b000)], Some(&boot))
            .expect("configure");
        let mut regs = vcpu.fd.get_regs().expect("regs");
        regs.rax = 0x1234_5678_9abc_def0;
        regs.r15 = 42;
        vcpu.fd.set_regs(&regs).expect("set regs");
        vcpu
    }

    fn list_for_thread() -> Vec<u32> {
        vm().msr_index_list().expect("msr list")
    }

    #[test]
    fn vcpu_and_vm_state_move_into_a_new_vm() {
        let vm1 = vm();
        let vcpu1 = booted_vcpu(&vm1);
        let list = vm1.msr_index_list().expect("msr list");
        assert!(!list.is_empty());
        let mut skipped = Skipped::default();
        let saved = vcpu1.save_state(&list, &mut skipped).expect("save vcpu");
        let saved_vm = vm1.save_state().expect("save vm");
        assert!(saved.msrs.contains(&(MSR_KERNEL_GS_BASE, 0xdead_b000)));
        // Through the snapshot file's encoding and back.
        let saved: VcpuState =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let saved_vm: VmState =
            serde_json::from_str(&serde_json::to_string(&saved_vm).unwrap()).unwrap();

        let handle = vm1.state_handle(&vcpu1).expect("state handle");
        let from_handle = std::thread::spawn(move || {
            handle.save_state(&list_for_thread(), &mut Skipped::default())
        })
        .join()
        .unwrap()
        .expect("save through the handle, from another thread");
        assert_eq!(json(&from_handle.regs), json(&saved.regs));
        assert_eq!(json(&from_handle.lapic), json(&saved.lapic));

        let vm2 = vm();
        let vcpu2 = vm2.create_vcpu(0).expect("vcpu");
        let mut restore_skipped = Skipped::default();
        vcpu2
            .restore_state(&saved, &mut restore_skipped)
            .expect("restore vcpu");
        vm2.restore_state(&saved_vm).expect("restore vm");
        let again = vcpu2
            .save_state(&list, &mut Skipped::default())
            .expect("save");
        assert_eq!(again.regs.rax, 0x1234_5678_9abc_def0);
        assert_eq!(json(&again.regs), json(&saved.regs));
        assert_eq!(json(&again.sregs), json(&saved.sregs));
        assert_eq!(json(&again.lapic), json(&saved.lapic));
        assert_eq!(json(&again.mp_state), json(&saved.mp_state));
        assert_eq!(json(&again.cpuid), json(&saved.cpuid));
        assert_eq!(again.fpu, saved.fpu);
        assert_eq!(again.xsave, saved.xsave);
        assert!(again.msrs.contains(&(MSR_KERNEL_GS_BASE, 0xdead_b000)));
        let vm_again = vm2.save_state().expect("save vm");
        assert_eq!(json(&vm_again.ioapic), json(&saved_vm.ioapic));
        assert_eq!(json(&vm_again.pic_master), json(&saved_vm.pic_master));
        assert!(vm_again.clock.clock >= saved_vm.clock.clock);
        eprintln!(
            "msrs: {} listed, {} saved; skipped at save {:?}, at restore {:?}",
            list.len(),
            saved.msrs.len(),
            skipped,
            restore_skipped
        );
    }
}
