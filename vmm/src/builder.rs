//! Builds a VM from a `VmConfig`, as an ordered list of `attach_*` steps.

use std::fs::File;
use std::io::{self, LineWriter};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{AcpiError, AcpiTables, MmioDevice};
use crate::arch::x86_64::cpuid::{boot_msrs, patch_cpuid, HostKind};
use crate::arch::x86_64::layout::BOOT_GDT_START;
use crate::arch::x86_64::regs::{
    boot_gdt_bytes, boot_page_tables, entry_regs, long_mode_sregs, reset_fpu,
};
use crate::boot::{load_guest, BootError, BootInfo};
use crate::config::{DiskSource, DiskSpec, NetSpec, SerialOut, VmConfig};
use crate::devices::acpi_sleep::{AcpiSleep, SLEEP_CONTROL_PORT, SLEEP_PORTS_LEN};
use crate::devices::bus::{BusError, IoBuses};
use crate::devices::debug_exit::{DebugExit, PhaseMarker, DEBUG_EXIT_PORT, PHASE_PORT};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::power_button::{PowerButton, POWER_BUTTON_GSI};
use crate::devices::serial::{SerialDevice, SerialWriter, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::virtio::block::{
    BackendError, Block, BlockBackend, FileBackend, NbdBackend, ReplicatedBackend,
};
use crate::devices::virtio::mmio::{
    MmioTransport, FIRST_GSI, MAX_DEVICES, MMIO_BASE, MMIO_LEN, QUEUE_NOTIFY,
};
use crate::devices::virtio::net::{Net, Tap, TapError};
use crate::devices::virtio::VirtioDevice;
use crate::devices::StopSignal;
use crate::kvm::{KvmError, Vcpu, VcpuBoot, Vm};
use crate::memory::guest::{local_memory, MemoryError};
use crate::memory::{remote_memory, RemoteMemError, RemoteMemory};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] AcpiError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    RemoteMemory(#[from] RemoteMemError),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("cannot open serial output {path}")]
    SerialOut {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("cannot start a device thread: {0}")]
    Thread(#[source] io::Error),
    #[error("cannot write boot structures into guest RAM: {0}")]
    GuestWrite(#[from] vm_memory::GuestMemoryError),
    #[error("--vcpus {0} is more than KVM allows here ({1})")]
    TooManyVcpus(u32, usize),
    #[error("disk {index}")]
    Disk {
        index: usize,
        #[source]
        source: BackendError,
    },
    #[error(
        "{0} virtio devices (--disk and --net), more than the {MAX_DEVICES} virtio-mmio slots"
    )]
    TooManyDevices(usize),
    #[error("--net tap={tap}")]
    Net {
        tap: String,
        #[source]
        source: TapError,
    },
}

/// A VM ready to run.
pub struct Vmm {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub vcpus: Vec<Vcpu>,
    pub buses: IoBuses,
    pub stop: StopSignal,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub boot: BootInfo,
    /// The ExCache, when guest RAM is remote.
    pub remote: Option<RemoteMemory>,
    /// The virtio-mmio transports, in slot order (disks, then nets): what a snapshot saves.
    pub virtio: Vec<Transport>,
    /// The ACPI power button a graceful shutdown presses.
    pub power_button: PowerButton,
}

/// A virtio-mmio transport as the buses and the snapshot share it.
pub type Transport = Arc<Mutex<MmioTransport>>;

/// Builds the VM: memory, KVM platform, devices, guest image, vCPUs.
pub fn build(config: &VmConfig) -> Result<Vmm, BuildError> {
    let (kernel, _) = crate::boot::open_kernel(&config.kernel)?; // fail fast on a bad kernel
    drop(kernel);
    let stop = StopSignal::new();
    let (mem, remote) = attach_memory(config, &stop)?;
    let mut vm = Vm::new(&config.kvm_device)?;
    if config.vcpus as usize > vm.max_vcpus() {
        return Err(BuildError::TooManyVcpus(config.vcpus, vm.max_vcpus()));
    }
    vm.setup_platform()?;
    vm.map_memory(&mem)?;
    let mut buses = IoBuses::default();
    let serial = attach_serial(&vm, &mut buses, &config.serial)?;
    attach_i8042(&mut buses, &stop)?;
    attach_debug_ports(&mut buses, &mem, &stop, config)?;
    let slots = config.disks.len() + config.nets.len();
    if slots > MAX_DEVICES {
        return Err(BuildError::TooManyDevices(slots));
    }
    let mut transports = Vec::new();
    let mut virtio = attach_disks(&vm, &mut buses, &mem, &config.disks, &mut transports)?;
    virtio.extend(attach_nets(
        &vm,
        &mut buses,
        &mem,
        virtio.len(),
        &config.nets,
        &mut transports,
    )?);
    let rsdp = attach_acpi(&mut buses, &mem, &stop, config.vcpus, &virtio)?;
    let power_button = attach_power_button(&vm)?;
    write_boot_tables(&mem)?;
    let boot = load_guest(
        &mem,
        config.mem_size,
        &config.kernel,
        config.initrd.as_deref(),
        &config.cmdline,
        Some(rsdp),
    )?;
    let vcpus = create_vcpus(&vm, config.vcpus, &boot)?;
    Ok(Vmm {
        vm,
        mem,
        vcpus,
        buses,
        stop,
        serial,
        boot,
        remote,
        virtio: transports,
        power_button,
    })
}

/// Guest RAM: local, or remote behind the ExCache (its fault server starts now, so loading the
/// guest below already goes through it).
fn attach_memory(
    config: &VmConfig,
    stop: &StopSignal,
) -> Result<(GuestMemoryMmap, Option<RemoteMemory>), BuildError> {
    match &config.remote_mem {
        None => Ok((local_memory(config.mem_size, config.mem_prealloc)?, None)),
        Some(rm) => {
            let remote = remote_memory(config.mem_size, rm, stop)?;
            Ok((remote.mem.clone(), Some(remote)))
        }
    }
}

pub(crate) fn attach_serial(
    vm: &Vm,
    buses: &mut IoBuses,
    out: &SerialOut,
) -> Result<Arc<Mutex<SerialDevice>>, BuildError> {
    let writer: SerialWriter = match out {
        SerialOut::Stdout => Box::new(LineWriter::new(io::stdout())),
        SerialOut::File(path) => {
            Box::new(LineWriter::new(File::create(path).map_err(|source| {
                BuildError::SerialOut {
                    path: path.clone(),
                    source,
                }
            })?))
        }
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&irq, COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(irq, writer)));
    buses.pio.insert(COM1_BASE, COM1_LEN, serial.clone())?;
    Ok(serial)
}

pub(crate) fn attach_i8042(buses: &mut IoBuses, stop: &StopSignal) -> Result<(), BuildError> {
    buses.pio.insert(
        I8042_BASE,
        I8042_LEN,
        Arc::new(Mutex::new(I8042::new(stop.clone()))),
    )?;
    Ok(())
}

pub(crate) fn attach_debug_ports(
    buses: &mut IoBuses,
    mem: &GuestMemoryMmap,
    stop: &StopSignal,
    config: &VmConfig,
) -> Result<(), BuildError> {
    buses.pio.insert(
        DEBUG_EXIT_PORT,
        1,
        Arc::new(Mutex::new(DebugExit::new(stop.clone()))),
    )?;
    let marker = PhaseMarker::new(mem.clone(), config.corrupt);
    buses
        .pio
        .insert(PHASE_PORT, 1, Arc::new(Mutex::new(marker)))?;
    Ok(())
}

/// One virtio-mmio slot per `--disk`, in order: the backend is opened (or connected) now, so a
/// bad path or an unreachable server fails the build with a one-line reason. Returns the slots
/// (for the ACPI DSDT) and adds the transports to `transports`.
pub(crate) fn attach_disks(
    vm: &Vm,
    buses: &mut IoBuses,
    mem: &GuestMemoryMmap,
    disks: &[DiskSpec],
    transports: &mut Vec<Transport>,
) -> Result<Vec<MmioDevice>, BuildError> {
    let mut slots = Vec::with_capacity(disks.len());
    for (index, spec) in disks.iter().enumerate() {
        let backend = open_disk(spec).map_err(|source| BuildError::Disk { index, source })?;
        let block = Block::new(index, backend, spec.read_only).map_err(BuildError::Thread)?;
        let slot = attach_virtio(vm, buses, mem, index, Box::new(block), transports)?;
        tracing::info!(index, base = slot.base, gsi = slot.gsi, source = ?spec.source, "virtio-blk attached");
        slots.push(slot);
    }
    Ok(slots)
}

/// One virtio-mmio slot per `--net`, from slot `first` on: the TAP is opened (or created) now,
/// so a bad name or a missing permission fails the build with a one-line reason.
pub(crate) fn attach_nets(
    vm: &Vm,
    buses: &mut IoBuses,
    mem: &GuestMemoryMmap,
    first: usize,
    nets: &[NetSpec],
    transports: &mut Vec<Transport>,
) -> Result<Vec<MmioDevice>, BuildError> {
    let mut slots = Vec::with_capacity(nets.len());
    for (index, spec) in nets.iter().enumerate() {
        let tap = Tap::open(&spec.tap).map_err(|source| BuildError::Net {
            tap: spec.tap.clone(),
            source,
        })?;
        let net = Net::new(index, tap, spec.mac).map_err(BuildError::Thread)?;
        let slot = attach_virtio(vm, buses, mem, first + index, Box::new(net), transports)?;
        tracing::info!(index, base = slot.base, gsi = slot.gsi, tap = %spec.tap, "virtio-net attached");
        slots.push(slot);
    }
    Ok(slots)
}

/// Puts `device` behind a virtio-mmio transport in slot `slot`, with its irqfd and its
/// queue-notify ioeventfd.
fn attach_virtio(
    vm: &Vm,
    buses: &mut IoBuses,
    mem: &GuestMemoryMmap,
    slot: usize,
    device: Box<dyn VirtioDevice>,
    transports: &mut Vec<Transport>,
) -> Result<MmioDevice, BuildError> {
    let base = MMIO_BASE + slot as u64 * MMIO_LEN;
    let gsi = FIRST_GSI + slot as u32;
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&irq, gsi)?;
    // Blocking: the device thread sleeps on it.
    let notify = EventFd::new(0).map_err(BuildError::EventFd)?;
    vm.register_ioevent(&notify, base + QUEUE_NOTIFY)?;
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device,
        mem.clone(),
        irq,
        notify,
    )));
    buses.mmio.insert(base, MMIO_LEN, transport.clone())?;
    transports.push(transport);
    Ok(MmioDevice {
        base,
        len: MMIO_LEN,
        gsi,
    })
}

fn open_disk(spec: &DiskSpec) -> Result<Arc<dyn BlockBackend>, BackendError> {
    Ok(match &spec.source {
        DiskSource::File(path) => Arc::new(FileBackend::open(path, spec.read_only)?),
        DiskSource::Nbd(uri) => Arc::new(NbdBackend::connect(
            uri,
            spec.read_only,
            spec.credential_file.as_deref(),
        )?),
        DiskSource::NbdReplicated { primary, backup } => Arc::new(ReplicatedBackend::connect(
            primary,
            backup,
            spec.read_only,
            spec.credential_file.as_deref(),
        )?),
    })
}

/// ACPI tables (arch/x86_64/acpi.rs) for the vCPUs and the virtio-mmio devices, and the sleep
/// registers they name (power-off); returns the RSDP's address for the boot parameters.
fn attach_acpi(
    buses: &mut IoBuses,
    mem: &GuestMemoryMmap,
    stop: &StopSignal,
    vcpus: u32,
    virtio: &[MmioDevice],
) -> Result<u64, BuildError> {
    attach_sleep_ports(buses, stop)?;
    let tables = AcpiTables::new(vcpus, virtio)?;
    tables.write_to(mem)?;
    tracing::info!(
        vcpus,
        devices = virtio.len(),
        rsdp = tables.rsdp_addr(),
        "ACPI tables"
    );
    Ok(tables.rsdp_addr())
}

/// The ACPI power button: an irqfd on the GSI of the DSDT's Generic Event Device.
pub(crate) fn attach_power_button(vm: &Vm) -> Result<PowerButton, BuildError> {
    let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?);
    vm.register_irqfd(&irq, POWER_BUTTON_GSI)?;
    Ok(PowerButton::new(irq))
}

/// The ACPI sleep registers (the guest's power-off).
pub(crate) fn attach_sleep_ports(buses: &mut IoBuses, stop: &StopSignal) -> Result<(), BuildError> {
    let sleep = Arc::new(Mutex::new(AcpiSleep::new(stop.clone())));
    buses
        .pio
        .insert(SLEEP_CONTROL_PORT, SLEEP_PORTS_LEN, sleep)?;
    Ok(())
}

fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), BuildError> {
    mem.write_slice(&boot_gdt_bytes(), GuestAddress(BOOT_GDT_START))?;
    for (addr, page) in boot_page_tables() {
        mem.write_slice(&page, GuestAddress(addr))?;
    }
    Ok(())
}

fn create_vcpus(vm: &Vm, count: u32, boot: &BootInfo) -> Result<Vec<Vcpu>, BuildError> {
    let host = HostKind::detect();
    tracing::info!(?host, "KVM host kind");
    let supported = vm.supported_cpuid()?;
    let msrs = boot_msrs();
    let mut vcpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let vcpu = vm.create_vcpu(index)?;
        let mut cpuid = supported.clone();
        patch_cpuid(&mut cpuid, index, count, host);
        let starts = index == 0 || boot.smp_entry;
        let smp = boot
            .smp_entry
            .then_some((u64::from(index), u64::from(count)));
        let vboot = starts.then(|| VcpuBoot {
            regs: entry_regs(boot.entry, smp),
            sregs: long_mode_sregs,
            fpu: reset_fpu(),
        });
        vcpu.configure(&cpuid, &msrs, vboot.as_ref())?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}
