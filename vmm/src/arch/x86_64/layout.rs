//! The guest-physical memory map. See docs/guest-abi.md for the parts a guest relies on.

/// GDT used at boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT used at boot (empty: limit 0).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux boot_params ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of vCPU 0.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT, PD (identity map of the first 1 GiB with 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted (Linux's COMMAND_LINE_SIZE on x86_64).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// The system BIOS area, reserved in e820: the ACPI RSDP at its start (inside the range Linux
/// scans for it) and the other ACPI tables after it (arch/x86_64/acpi.rs).
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// F000:FFF0, where Linux jumps in real mode to have "the BIOS" reset the machine; vNode puts a
/// stub there that pulses the i8042 reset line (acpi.rs).
pub const BIOS_RESET_VECTOR: u64 = 0xf_fff0;
/// Where high memory starts, and where a bzImage's protected-mode code is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: [MMIO_GAP_START, 4 GiB) holds devices, not RAM.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Device MMIO windows (virtio-mmio) are allocated from here upwards.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// KVM's in-kernel IOAPIC and the local APICs, inside the MMIO gap.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// The KVM TSS and identity-map pages, inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// The smallest guest RAM accepted: room for the boot structures and a kernel.
pub const MIN_MEM_SIZE: u64 = 32 << 20;

/// The RAM ranges (start, length) of a guest with `mem_size` bytes of RAM: below the MMIO gap
/// first, the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// The e820 map given to the guest: (start, length, type), type 1 = RAM, 2 = reserved.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, 1),
        (EBDA_START, 0x400, 2),
        (ACPI_START, ACPI_END - ACPI_START, 2),
    ];
    for (start, len) in ram_ranges(mem_size) {
        if start == 0 {
            map.push((HIMEM_START, len - HIMEM_START, 1));
        } else {
            map.push((start, len, 1));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
    }

    #[test]
    fn big_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
        let total: u64 = r.iter().map(|(_, l)| l).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn e820_reserves_the_ebda_and_skips_legacy_hole() {
        let m = e820_map(64 << 20);
        assert_eq!(m[0], (0, EBDA_START, 1));
        assert_eq!(m[2], (ACPI_START, ACPI_END - ACPI_START, 2));
        assert_eq!(m[3], (HIMEM_START, (64 << 20) - HIMEM_START, 1));
    }
}
