//! ACPI tables, so an unmodified Linux finds its CPUs and its virtio-mmio devices by itself.
//!
//! Debian's cloud kernel has neither the MP table parser (`X86_MPPARSE`) nor virtio-mmio
//! command-line devices: it learns the CPUs from the MADT and the devices from the DSDT. vNode
//! writes, in the BIOS area that e820 reserves (layout.rs `ACPI_START..ACPI_END`):
//!
//! ```text
//!   RSDP (rev 2, at ACPI_START: boot_params.acpi_rsdp_addr, and Linux's scan finds it too)
//!    └─ XSDT ─┬─ FACP (FADT, hardware-reduced: no PM blocks, no SCI, no FACS)
//!             │    └─ DSDT: \_S5, \_SB.COM1 (PNP0501), \_SB.VRnn ("LNRO0005", virtio-mmio)
//!             └─ APIC (MADT): a local APIC per vCPU, KVM's IOAPIC
//! ```
//!
//! Hardware-reduced ACPI (as Firecracker and QEMU's microvm) means Linux uses no legacy PIC and
//! no PIT/HPET timer. Without COM1 in the DSDT the 8250 driver still finds the port by legacy
//! probing ("ttyS0 at I/O 0x3f8 (irq = 4)"), but its interrupt never works: kernel messages
//! (polled) come out, user space's writes to the console never do (seen under the sandbox: no
//! initramfs output at all). So the DSDT names COM1 with its IRQ, as QEMU's microvm does; Linux
//! then maps it through the IOAPIC. The i8042 is left to legacy probing (it serves the reset line).
//! The MADT has no interrupt source override: KVM's default routing (vNode sets no other) wires
//! ISA IRQ n to IOAPIC pin n, PIT included, so the identity map Linux assumes without overrides
//! is the true one (a PC's IRQ0 -> GSI 2 override would point Linux at a pin nothing drives).
//!
//! Rebooting: with hardware-reduced ACPI and no EFI, Linux's default reboot method is EFI, then
//! "the BIOS" (a real-mode jump to F000:FFF0), then others; it never reaches the keyboard
//! controller, and a jump into zeroed RAM spins forever. So vNode also writes, at that reset
//! vector, the few bytes of real-mode code a BIOS would run: pulse the i8042 reset line (which ends
//! the VM, devices/i8042.rs). The FADT's reset register points at the same line, for `reboot=acpi`.
//!
//! Powering off: the FADT's sleep control/status registers are devices/acpi_sleep.rs, and the
//! DSDT's `\_S5` gives the soft-off sleep type, so `poweroff` ends the VM. The other way round,
//! a graceful shutdown presses the DSDT's power button through a Generic Event Device
//! (devices/power_button.rs), as hardware-reduced ACPI has no fixed-feature button.
//!
//! Building is pure ([`AcpiTables::new`]), so tests check the bytes without guest memory.

use acpi_tables::aml::{
    self, Arg, Device, EISAName, Equal, If, Interrupt, Memory32Fixed, Method, Name, Notify,
    Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{ACPI_START, BIOS_RESET_VECTOR, IOAPIC_START, LAPIC_START};
use crate::devices::acpi_sleep::{S5_SLEEP_TYPE, SLEEP_CONTROL_PORT};
use crate::devices::i8042::I8042_BASE;
use crate::devices::power_button::POWER_BUTTON_GSI;
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};

const OEM_ID: [u8; 6] = *b"VNODE ";
const OEM_REVISION: u32 = 1;
/// Every table starts on this boundary.
const TABLE_ALIGN: u64 = 16;

/// FADT IAPC_BOOT_ARCH flags (ACPI 6.5 table 5.11).
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_MSI: u16 = 1 << 3;
const IAPC_NO_ASPM: u16 = 1 << 4;
/// "CMOS RTC not present": Linux then registers no rtc_cmos device, so it does not spend
/// guest-seconds probing ports 0x70/0x71, which nothing emulates (guest-images/README.md).
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;

/// The i8042 command port and its "pulse reset line" command.
const I8042_COMMAND: u16 = I8042_BASE as u16 + 4;
const I8042_RESET: u8 = 0xfe;

/// Real-mode code at the BIOS reset vector: `mov al, 0xfe; out 0x64, al; 1: hlt; jmp 1b`.
const RESET_STUB: [u8; 7] = [
    0xb0,
    I8042_RESET,
    0xe6,
    I8042_COMMAND as u8,
    0xf4,
    0xeb,
    0xfd,
];
const _: () = assert!(BIOS_RESET_VECTOR + RESET_STUB.len() as u64 <= super::layout::ACPI_END);

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("{0} vCPUs: the MADT's xAPIC entries hold at most 255")]
    TooManyCpus(u32),
    #[error("{0} virtio-mmio devices: more than the DSDT names them for (256)")]
    TooManyDevices(usize),
    #[error("virtio-mmio device at {0:#x} is not in the 32-bit address space")]
    DeviceAbove4G(u64),
    #[error("ACPI tables need {need:#x} bytes, the BIOS area has {room:#x}")]
    TooBig { need: u64, room: u64 },
    #[error("cannot write ACPI tables into guest RAM: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device as the guest must see it: its register window and its interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// The tables, each with the guest-physical address it goes to.
#[derive(Debug)]
pub struct AcpiTables {
    rsdp_addr: u64,
    tables: Vec<(u64, Vec<u8>)>,
}

/// Hands out table addresses in the BIOS area.
struct Placer {
    next: u64,
    tables: Vec<(u64, Vec<u8>)>,
}

impl Placer {
    fn place(&mut self, bytes: Vec<u8>) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let end = addr + bytes.len() as u64;
        if end > BIOS_RESET_VECTOR {
            return Err(AcpiError::TooBig {
                need: end - ACPI_START,
                room: BIOS_RESET_VECTOR - ACPI_START,
            });
        }
        self.next = end;
        self.tables.push((addr, bytes));
        Ok(addr)
    }
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

impl AcpiTables {
    /// The tables for `vcpus` vCPUs (APIC IDs 0..vcpus, as cpuid.rs numbers them) and `devices`.
    pub fn new(vcpus: u32, devices: &[MmioDevice]) -> Result<Self, AcpiError> {
        // The RSDP goes first, at ACPI_START; it is 36 bytes.
        let mut placer = Placer {
            next: ACPI_START + Rsdp::len() as u64,
            tables: Vec::new(),
        };
        let dsdt = placer.place(dsdt(devices)?)?;
        let fadt = placer.place(fadt(dsdt))?;
        let madt = placer.place(madt(vcpus)?)?;
        let mut xsdt = XSDT::new(OEM_ID, *b"VNODEXSD", OEM_REVISION);
        xsdt.add_entry(fadt);
        xsdt.add_entry(madt);
        let xsdt = placer.place(aml_bytes(&xsdt))?;
        let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt));
        placer.tables.insert(0, (ACPI_START, rsdp));
        Ok(Self {
            rsdp_addr: ACPI_START,
            tables: placer.tables,
        })
    }

    /// Where the RSDP is: for `boot_params.acpi_rsdp_addr`.
    pub fn rsdp_addr(&self) -> u64 {
        self.rsdp_addr
    }

    /// Every table (the RSDP first) with its guest-physical address.
    pub fn tables(&self) -> &[(u64, Vec<u8>)] {
        &self.tables
    }

    /// Writes the tables and the reset stub at the BIOS reset vector.
    pub fn write_to(&self, mem: &GuestMemoryMmap) -> Result<(), AcpiError> {
        for (addr, bytes) in &self.tables {
            mem.write_slice(bytes, GuestAddress(*addr))?;
        }
        mem.write_slice(&RESET_STUB, GuestAddress(BIOS_RESET_VECTOR))?;
        Ok(())
    }
}

/// An ISA `IRQNoFlags() {irq}` descriptor: edge-triggered, active high (the crate has only the
/// extended interrupt descriptor).
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22); // small resource, IRQ descriptor, 2 bytes
        sink.word(1 << self.0);
    }
}

/// COM1, the 16550 the console is on (devices/serial.rs).
fn com1(body: &mut Vec<u8>) {
    let io = IO::new(COM1_BASE as u16, COM1_BASE as u16, 1, COM1_LEN as u8);
    let irq = IrqNoFlags(COM1_IRQ as u8);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &aml::ONE);
    let crs = Name::new("_CRS".into(), &crs);
    Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(body);
}

/// The power button `PWRB` (a control-method button, PNP0C0C) and the Generic Event Device that
/// presses it: when [`POWER_BUTTON_GSI`] fires, Linux's GED driver calls `_EVT(gsi)`, which
/// notifies PWRB with 0x80 (button pressed).
fn power_button(body: &mut Vec<u8>) {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    let uid = Name::new("_UID".into(), &aml::ZERO);
    Device::new("PWRB".into(), vec![&hid, &uid]).to_aml_bytes(body);

    let irq = Interrupt::new(true, true, false, false, POWER_BUTTON_GSI);
    let crs = ResourceTemplate::new(vec![&irq]);
    // A single name segment: ACPI's search rules find it in the parent scope, \_SB.
    let pwrb = Path::new("PWRB");
    let pressed = Notify::new(&pwrb, &0x80u8);
    let is_button = Equal::new(&Arg(0), &POWER_BUTTON_GSI);
    let on_button = If::new(&is_button, vec![&pressed]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&on_button]);
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let crs = Name::new("_CRS".into(), &crs);
    Device::new("GED_".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(body);
}

/// The DSDT: COM1, the power button and its GED, and each virtio-mmio slot as a `LNRO0005` device with its window and its
/// edge-triggered, active-high interrupt (vNode raises it through an irqfd, a pulse).
fn dsdt(devices: &[MmioDevice]) -> Result<Vec<u8>, AcpiError> {
    if devices.len() > 256 {
        return Err(AcpiError::TooManyDevices(devices.len()));
    }
    let mut body = Vec::new();
    com1(&mut body);
    power_button(&mut body);
    for (i, d) in devices.iter().enumerate() {
        let base = u32::try_from(d.base).map_err(|_| AcpiError::DeviceAbove4G(d.base))?;
        let len = u32::try_from(d.len).map_err(|_| AcpiError::DeviceAbove4G(d.base))?;
        let window = Memory32Fixed::new(true, base, len);
        let irq = Interrupt::new(true, true, false, false, d.gsi);
        let crs = ResourceTemplate::new(vec![&window, &irq]);
        let uid = i as u32;
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let uid = Name::new("_UID".into(), &uid);
        let cca = Name::new("_CCA".into(), &aml::ONE);
        let crs = Name::new("_CRS".into(), &crs);
        let name = format!("VR{i:02X}");
        Device::new(name.as_str().into(), vec![&hid, &uid, &cca, &crs]).to_aml_bytes(&mut body);
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VNODEDSD", OEM_REVISION);
    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &0u8]);
    sdt.append_slice(&aml_bytes(&Name::new("_S5_".into(), &s5)));
    sdt.append_slice(&Scope::raw("\\_SB_".into(), body));
    Ok(sdt.as_slice().to_vec())
}

/// The FADT: hardware-reduced (no fixed power/sleep buttons either), pointing at the DSDT, with
/// the i8042 reset as its reset register and devices/acpi_sleep.rs as its sleep registers.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"VNODEFAC", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    b.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        I8042_COMMAND.into(),
    );
    b.reset_value = I8042_RESET;
    let port = |p: u64| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, p);
    b.sleep_control_reg = port(SLEEP_CONTROL_PORT);
    b.sleep_status_reg = port(SLEEP_CONTROL_PORT + 1);
    // The i8042 stays announced: vNode emulates it for the reset line (devices/i8042.rs).
    b.iapc_boot_arch =
        (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_MSI | IAPC_NO_ASPM | IAPC_NO_CMOS_RTC).into();
    aml_bytes(&b.finalize())
}

/// The MADT: one enabled local APIC per vCPU (ACPI processor UID = APIC ID = vCPU index) and
/// KVM's IOAPIC with its 24 pins from GSI 0.
fn madt(vcpus: u32) -> Result<Vec<u8>, AcpiError> {
    // APIC ID 0xff is the broadcast ID, so 255 xAPIC CPUs at most.
    if vcpus > 255 {
        return Err(AcpiError::TooManyCpus(vcpus));
    }
    let mut sdt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"VNODEAPI", OEM_REVISION);
    sdt.write_u32(36, LAPIC_START as u32);
    sdt.write_u32(40, MADT_PCAT_COMPAT);
    for i in 0..vcpus as u8 {
        sdt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            i,
            i,
            EnabledStatus::Enabled,
        )));
    }
    sdt.append_slice(&aml_bytes(&IoApic::new(0, IOAPIC_START as u32, 0)));
    Ok(sdt.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(n: usize) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + i as u64 * 0x1000,
                len: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect()
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn find<'a>(t: &'a AcpiTables, sig: &[u8; 4]) -> (u64, &'a [u8]) {
        let (addr, bytes) = t
            .tables()
            .iter()
            .find(|(_, b)| &b[..4] == sig)
            .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(sig)));
        (*addr, bytes)
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn every_checksum_sums_to_zero_and_lengths_match() {
        let t = AcpiTables::new(4, &devices(3)).unwrap();
        let (rsdp_addr, rsdp) = &t.tables()[0];
        assert_eq!(*rsdp_addr, t.rsdp_addr());
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "revision 2");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        for (addr, b) in &t.tables()[1..] {
            let sig = String::from_utf8_lossy(&b[..4]);
            assert_eq!(u32_at(b, 4) as usize, b.len(), "{sig} length");
            assert_eq!(sum(b), 0, "{sig} checksum");
            assert_eq!(addr % TABLE_ALIGN, 0, "{sig} alignment");
            assert!(*addr >= ACPI_START && addr + b.len() as u64 <= BIOS_RESET_VECTOR);
        }
    }

    #[test]
    fn tables_are_linked_and_do_not_overlap() {
        let t = AcpiTables::new(2, &devices(1)).unwrap();
        let (xsdt, x) = find(&t, b"XSDT");
        assert_eq!(u64_at(&t.tables()[0].1, 24), xsdt, "RSDP -> XSDT");
        let (fadt, f) = find(&t, b"FACP");
        let (madt, _) = find(&t, b"APIC");
        let (dsdt, _) = find(&t, b"DSDT");
        assert_eq!(x.len(), 36 + 16);
        assert_eq!((u64_at(x, 36), u64_at(x, 44)), (fadt, madt));
        assert_eq!(u64_at(f, 140), dsdt, "FADT X_DSDT");
        assert_eq!(u32_at(f, 112) & (1 << 20), 1 << 20, "hardware-reduced");
        assert_eq!(
            u32_at(f, 112) & (1 << 10),
            1 << 10,
            "reset register supported"
        );
        assert_eq!(
            &f[116..120],
            &[1, 8, 0, 1],
            "reset register: 8-bit port I/O"
        );
        assert_eq!(
            (u64_at(f, 120), f[128]),
            (0x64, 0xfe),
            "reset: 0xfe to port 0x64"
        );
        assert_eq!(&f[244..248], &[1, 8, 0, 1], "sleep control: 8-bit port I/O");
        assert_eq!(
            (u64_at(f, 248), u64_at(f, 260)),
            (0x600, 0x601),
            "sleep ports"
        );
        let iapc = u16::from_le_bytes([f[109], f[110]]);
        assert_eq!(iapc & IAPC_NO_CMOS_RTC, IAPC_NO_CMOS_RTC);
        assert_eq!(iapc & IAPC_8042, IAPC_8042);
        let mut spans: Vec<_> = t
            .tables()
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:x?}");
    }

    #[test]
    fn madt_has_one_local_apic_per_vcpu_and_the_ioapic() {
        for n in [1, 2, 8, 255] {
            let t = AcpiTables::new(n, &[]).unwrap();
            let (_, m) = find(&t, b"APIC");
            assert_eq!(u32_at(m, 36), 0xfee0_0000);
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut o = 44;
            while o < m.len() {
                let (kind, len) = (m[o], m[o + 1] as usize);
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(u32_at(m, o + 4), 1, "enabled");
                        lapics.push((m[o + 2], m[o + 3]));
                    }
                    1 => ioapics.push((m[o + 2], u32_at(m, o + 4), u32_at(m, o + 8))),
                    other => panic!("unexpected MADT entry type {other}"),
                }
                o += len;
            }
            assert_eq!(o, m.len());
            let want: Vec<_> = (0..n as u8).map(|i| (i, i)).collect();
            assert_eq!(lapics, want, "{n} vCPUs");
            assert_eq!(ioapics, vec![(0, 0xfec0_0000, 0)]);
        }
        assert!(matches!(
            AcpiTables::new(256, &[]),
            Err(AcpiError::TooManyCpus(256))
        ));
    }

    /// The bytes of `Memory32Fixed(ReadWrite, base, len)` followed by `Interrupt(edge, high) {gsi}`.
    fn crs_bytes(base: u32, len: u32, gsi: u32) -> Vec<u8> {
        let mut v = vec![0x86, 9, 0, 1];
        v.extend_from_slice(&base.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&[0x89, 6, 0, 0b0011, 1]);
        v.extend_from_slice(&gsi.to_le_bytes());
        v
    }

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn dsdt_names_every_virtio_mmio_device() {
        let devs = devices(19);
        let t = AcpiTables::new(1, &devs).unwrap();
        let (_, d) = find(&t, b"DSDT");
        assert_eq!(count(d, b"LNRO0005\0"), 19);
        assert_eq!(count(d, b"_SB_"), 1);
        for (i, dev) in devs.iter().enumerate() {
            let crs = crs_bytes(dev.base as u32, 0x1000, dev.gsi);
            assert_eq!(count(d, &crs), 1, "device {i}");
            assert_eq!(count(d, format!("VR{i:02X}").as_bytes()), 1);
        }
    }

    /// ASL without its `//` and `/* */` comments, on one line, words one space apart.
    fn without_comments(dsl: &str) -> String {
        let mut text: String = dsl
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ");
        while let Some(start) = text.find("/*") {
            let end = text[start..]
                .find("*/")
                .map_or(text.len(), |e| start + e + 2);
            text.replace_range(start..end, " ");
        }
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// ACPICA's own disassembler (Debian's acpica-tools, what Linux's interpreter is built
    /// from) reads the DSDT without a complaint and finds the power button and its GED.
    #[test]
    fn iasl_decompiles_the_power_button_and_its_ged() {
        let t = AcpiTables::new(2, &devices(2)).unwrap();
        let (_, d) = find(&t, b"DSDT");
        let dir = std::env::temp_dir().join(format!("vnode-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join("dsdt.aml");
        std::fs::write(&aml, d).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .output()
            .expect("iasl (acpica-tools, scripts/setup.sh) runs");
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).expect("iasl wrote dsdt.dsl");
        std::fs::remove_dir_all(&dir).unwrap();
        let flat = without_comments(&dsl);
        for want in [
            r#"Device (PWRB) { Name (_HID, EisaId ("PNP0C0C") )"#,
            r#"Device (GED) { Name (_HID, "ACPI0013" )"#,
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000003, }",
            "Method (_EVT, 1, Serialized) { If ((Arg0 == 0x03)) { Notify (PWRB, 0x80) } }",
        ] {
            assert!(flat.contains(want), "{want:?} not in:\n{dsl}");
        }
        assert!(!log.contains("Error") && !log.contains("Warning"), "{log}");
    }

    #[test]
    fn dsdt_names_com1_with_its_ports_and_irq() {
        let t = AcpiTables::new(1, &[]).unwrap();
        let (_, d) = find(&t, b"DSDT");
        assert_eq!(count(d, b"COM1"), 1);
        // EisaId("PNP0501") as a DWord, then IO(Decode16, 0x3f8, 0x3f8, 1, 8), IRQNoFlags {4}.
        assert_eq!(count(d, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
        let crs = [0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8, 0x22, 0x10, 0];
        assert_eq!(count(d, &crs), 1);
        assert_eq!(count(d, b"LNRO0005"), 0);
        // Name (_S5, Package (2) {5, 0})
        let s5 = [0x08, b'_', b'S', b'5', b'_', 0x12, 5, 2, 0x0a, 5, 0];
        assert_eq!(count(d, &s5), 1);
    }

    #[test]
    fn devices_must_be_below_4g() {
        let dev = MmioDevice {
            base: 1 << 32,
            len: 0x1000,
            gsi: 5,
        };
        assert!(matches!(
            AcpiTables::new(1, &[dev]),
            Err(AcpiError::DeviceAbove4G(_))
        ));
    }

    #[test]
    fn written_tables_land_in_guest_ram() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let t = AcpiTables::new(2, &devices(2)).unwrap();
        t.write_to(&mem).unwrap();
        let mut rsdp = [0u8; 8];
        mem.read_slice(&mut rsdp, GuestAddress(t.rsdp_addr()))
            .unwrap();
        assert_eq!(&rsdp, b"RSD PTR ");
        for (addr, bytes) in t.tables() {
            let mut back = vec![0u8; bytes.len()];
            mem.read_slice(&mut back, GuestAddress(*addr)).unwrap();
            assert_eq!(&back, bytes);
        }
        let mut stub = [0u8; 16];
        mem.read_slice(&mut stub, GuestAddress(BIOS_RESET_VECTOR))
            .unwrap();
        assert_eq!(stub[..7], [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
    }
}
