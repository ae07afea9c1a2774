//! One vCPU: its boot state, and the run loop that dispatches exits until the VM stops. The VM
//! pauses and stops its vCPUs through a shared [`VcpuControl`]: it sets what it wants, then kicks
//! each vCPU thread out of KVM_RUN with [`kick_signal`], whose handler sets the thread's
//! `kvm_run.immediate_exit` (so a kick that lands just before KVM_RUN is not lost either).

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{handle_exit, ioctl_err, ExitAction, KvmError};
use crate::devices::bus::IoBuses;
use crate::devices::{StopReason, StopSignal};
use crate::metrics::METRICS;

/// The ioctls a vCPU thread makes once the guest runs (`run` and the exits it handles): its
/// seccomp filter (`sandbox`) allows these and no other.
pub const RUN_TIME_IOCTLS: [u64; 5] = {
    use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};
    const KVMIO: u32 = 0xAE;
    let regs = std::mem::size_of::<kvm_regs>() as u32;
    let events = std::mem::size_of::<kvm_vcpu_events>() as u32;
    [
        ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0) as u64, // KVM_RUN
        ioctl_expr(_IOC_READ, KVMIO, 0x81, regs) as u64, // KVM_GET_REGS
        ioctl_expr(_IOC_WRITE, KVMIO, 0x82, regs) as u64, // KVM_SET_REGS
        ioctl_expr(_IOC_READ, KVMIO, 0x9f, events) as u64, // KVM_GET_VCPU_EVENTS
        ioctl_expr(_IOC_WRITE, KVMIO, 0xa0, events) as u64, // KVM_SET_VCPU_EVENTS
    ]
};

/// Where a vCPU starts: its general registers and a function that fills in its special registers.
pub struct VcpuBoot {
    pub regs: kvm_regs,
    pub sregs: fn(kvm_sregs) -> kvm_sregs,
    pub fpu: kvm_bindings::kvm_fpu,
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
/// KVM_INTERNAL_ERROR_EMULATION: the instruction emulator failed.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const BP_VECTOR: u8 = 3;

/// What the VM wants of its vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuWant {
    Run = 0,
    Pause = 1,
    Stop = 2,
}

/// Shared by the VM and its vCPU threads: what the VM wants, and how many vCPUs are parked.
#[derive(Default)]
pub struct VcpuControl {
    want: AtomicU8,
    parked: Mutex<usize>,
    cv: Condvar,
}

impl VcpuControl {
    pub fn want(&self) -> VcpuWant {
        match self.want.load(Ordering::SeqCst) {
            0 => VcpuWant::Run,
            1 => VcpuWant::Pause,
            _ => VcpuWant::Stop,
        }
    }

    /// Sets what the vCPUs must do and wakes parked ones; the caller kicks running ones.
    pub fn set(&self, want: VcpuWant) {
        let _g = self.parked.lock().expect("vcpu control lock poisoned");
        self.want.store(want as u8, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Parks the calling vCPU thread while the VM wants it paused.
    fn park(&self) {
        let mut parked = self.parked.lock().expect("vcpu control lock poisoned");
        *parked += 1;
        self.cv.notify_all();
        while self.want() == VcpuWant::Pause {
            parked = self.cv.wait(parked).expect("vcpu control lock poisoned");
        }
        *parked -= 1;
        self.cv.notify_all();
    }

    /// Waits up to `timeout` until `n` vCPUs are parked; `kick` runs every few milliseconds
    /// meanwhile (a vCPU can be deep in a page fault when the first kick lands).
    pub fn wait_parked(&self, n: usize, timeout: Duration, kick: impl Fn()) -> bool {
        let deadline = Instant::now() + timeout;
        let mut parked = self.parked.lock().expect("vcpu control lock poisoned");
        while *parked < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let slice = (deadline - now).min(Duration::from_millis(5));
            parked = self
                .cv
                .wait_timeout(parked, slice)
                .expect("vcpu control lock poisoned")
                .0;
            if *parked < n {
                drop(parked);
                kick();
                parked = self.parked.lock().expect("vcpu control lock poisoned");
            }
        }
        true
    }
}

thread_local! {
    /// This thread's vCPU run structure while it runs one, for the kick signal's handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own vCPU's kvm_run mapping, set while `Vcpu::run`
        // owns the vCPU and cleared before it returns; a one-byte volatile store is all KVM
        // needs to see to leave KVM_RUN (or not enter it) with EINTR.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN (SIGRTMIN).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick signal's handler; once per process, before vCPU threads start.
pub fn install_kick_handler() -> Result<(), KvmError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| {
        KvmError::Ioctl {
            op: "installing the vCPU kick signal handler",
            source: kvm_ioctls::Error::new(e.errno()),
        }
    })
}

pub struct Vcpu {
    pub(super) fd: VcpuFd,
    index: u32,
}

impl Vcpu {
    pub(super) fn new(fd: VcpuFd, index: u32) -> Self {
        Self { fd, index }
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// CPUID, MSRs, LAPIC LINT pins (virtual wire mode), and, for a vCPU that starts running at
    /// once, its registers. APs without `boot` wait for INIT/SIPI from the guest.
    pub fn configure(
        &self,
        cpuid: &[kvm_cpuid_entry2],
        msrs: &[(u32, u64)],
        boot: Option<&VcpuBoot>,
    ) -> Result<(), KvmError> {
        let cpuid = CpuId::from_entries(cpuid).map_err(|_| KvmError::Ioctl {
            op: "building CPUID",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))?;
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs_fam = Msrs::from_entries(&entries).map_err(|_| KvmError::Ioctl {
            op: "building MSRs",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = self
            .fd
            .set_msrs(&msrs_fam)
            .map_err(ioctl_err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            tracing::debug!(
                set,
                wanted = entries.len(),
                "KVM accepted only some boot MSRs"
            );
        }
        self.set_lint()?;
        if let Some(boot) = boot {
            let sregs = self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
            self.fd
                .set_sregs(&(boot.sregs)(sregs))
                .map_err(ioctl_err("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&boot.regs)
                .map_err(ioctl_err("KVM_SET_REGS"))?;
            self.fd
                .set_fpu(&boot.fpu)
                .map_err(ioctl_err("KVM_SET_FPU"))?;
            // With an in-kernel irqchip KVM parks every vCPU but the first in wait-for-SIPI;
            // a guest that asked all vCPUs to start at its entry gets them runnable.
            let runnable = kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            };
            self.fd
                .set_mp_state(runnable)
                .map_err(ioctl_err("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    fn set_lint(&self) -> Result<(), KvmError> {
        let mut lapic = self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = lapic.regs[reg + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *x as _;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(ioctl_err("KVM_SET_LAPIC"))
    }

    /// Runs the vCPU until the VM stops it (through `ctl`) or it stops the VM (through `stop`:
    /// fatal conditions), parking while `ctl` says pause.
    pub fn run(
        &mut self,
        buses: &IoBuses,
        mem: &GuestMemoryMmap,
        stop: &StopSignal,
        ctl: &VcpuControl,
    ) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|c| c.set(run));
        self.run_loop(buses, mem, stop, ctl);
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }

    fn run_loop(
        &mut self,
        buses: &IoBuses,
        mem: &GuestMemoryMmap,
        stop: &StopSignal,
        ctl: &VcpuControl,
    ) {
        loop {
            match ctl.want() {
                VcpuWant::Run => {}
                VcpuWant::Pause => {
                    self.settle(buses);
                    ctl.park();
                    continue;
                }
                VcpuWant::Stop => return,
            }
            if stop.reason().is_some() {
                return;
            }
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(exit, buses),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked: clear the kick before looking at what the VM wants.
                    self.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => {
                    stop.stop(StopReason::Fatal(format!(
                        "vCPU {}: KVM_RUN failed: {e}",
                        self.index
                    )));
                    return;
                }
            };
            let fatal = match action {
                ExitAction::Continue => continue,
                ExitAction::InternalError => match self.recover_internal_error(mem) {
                    Ok(()) => continue,
                    Err(msg) => msg,
                },
                ExitAction::Shutdown => format!("guest triple-faulted{}", self.where_am_i()),
                ExitAction::FailEntry(r) => {
                    format!("KVM could not enter the guest (reason {r:#x})")
                }
                ExitAction::Unhandled(what) => {
                    format!("unhandled VM exit {what}{}", self.where_am_i())
                }
            };
            stop.stop(StopReason::Fatal(format!("vCPU {}: {fatal}", self.index)));
            return;
        }
    }

    /// Completes what KVM still owes the guest for the last exit (the data of an IN into RAX,
    /// RIP past an OUT or MMIO access): KVM does it on the next KVM_RUN, which `immediate_exit`
    /// makes return before entering the guest. A parked vCPU's saved state is then whole: a
    /// snapshot taken now neither repeats nor loses that access.
    fn settle(&mut self, buses: &IoBuses) {
        self.fd.set_kvm_immediate_exit(1);
        // A string instruction may need several exits to complete.
        for _ in 0..64 {
            match self.fd.run() {
                Ok(exit) => {
                    let _ = handle_exit(exit, buses);
                }
                Err(_) => break, // EINTR: nothing owed any more
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    fn where_am_i(&self) -> String {
        match self.fd.get_regs() {
            Ok(r) => format!(" at rip {:#x}", r.rip),
            Err(_) => String::new(),
        }
    }

    /// KVM on PVM emulates guest supervisor code and its emulator lacks `int3` in long mode:
    /// it stops with an emulation failure. Deliver the #BP the instruction would have raised
    /// (trap semantics: RIP past the int3). On hardware KVM int3 never gets here.
    fn recover_internal_error(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member of the
        // exit union; reading a u32 from it is valid for any bit pattern.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let regs = self
            .fd
            .get_regs()
            .map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        let opcode = self
            .fd
            .translate_gva(regs.rip)
            .ok()
            .filter(|t| t.valid != 0)
            .and_then(|t| mem.read_obj::<u8>(GuestAddress(t.physical_address)).ok());
        if suberror != KVM_INTERNAL_ERROR_EMULATION || opcode != Some(0xcc) {
            return Err(format!(
                "KVM internal error (suberror {suberror}) at rip {:#x}, opcode {opcode:02x?}",
                regs.rip
            ));
        }
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
        events.exception.injected = 1;
        events.exception.nr = BP_VECTOR;
        events.exception.has_error_code = 0;
        events.exception.pending = 0;
        events.flags = 0;
        let mut regs = regs;
        regs.rip += 1;
        self.fd
            .set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        self.fd
            .set_vcpu_events(&events)
            .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))?;
        METRICS.int3_injected.inc();
        Ok(())
    }
}
