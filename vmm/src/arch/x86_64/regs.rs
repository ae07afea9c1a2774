//! Boot-time CPU state for the 64-bit Linux boot protocol: the boot GDT, identity-mapped page
//! tables, and the register values a vCPU starts with. Pure values: `builder` writes the tables
//! into guest memory and hands the registers to `kvm`.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDPT_START, PD_START, PML4_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Builds a GDT entry from flags, base and limit, as the CPU reads it.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Decodes a GDT entry into the segment KVM wants, for selector index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// The boot page tables as (guest address, 4 KiB page) pairs: PML4 -> PDPT -> PD mapping the
/// first 1 GiB with 2 MiB pages. Linux replaces them at once; the test guest builds its own.
pub fn boot_page_tables() -> Vec<(u64, Vec<u8>)> {
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPT_START | 0x03).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    pdpt[..8].copy_from_slice(&(PD_START | 0x03).to_le_bytes());
    let mut pd = vec![0u8; 4096];
    for i in 0..512u64 {
        let entry = (i << 21) | 0x83; // present, writable, 2 MiB page
        pd[i as usize * 8..i as usize * 8 + 8].copy_from_slice(&entry.to_le_bytes());
    }
    vec![(PML4_START, pml4), (PDPT_START, pdpt), (PD_START, pd)]
}

/// The boot GDT as bytes, to be written at `BOOT_GDT_START`.
pub fn boot_gdt_bytes() -> Vec<u8> {
    BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Special registers for 64-bit entry: long mode, paging with the boot tables, flat segments.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry. `smp` is Some((index, count)) for guests that asked every vCPU to
/// start at the entry point (docs/guest-abi.md).
pub fn entry_regs(entry: u64, smp: Option<(u64, u64)>) -> kvm_regs {
    let mut regs = kvm_regs {
        rip: entry,
        rsi: ZERO_PAGE_START,
        rflags: 0x2,
        ..Default::default()
    };
    match smp {
        Some((index, count)) if index > 0 => {
            regs.rdi = index;
            regs.rdx = count;
        }
        Some((_, count)) => {
            regs.rdx = count;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
        None => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    regs
}

/// The FPU state of a CPU after reset (x87 control word, SSE control/status).
pub fn reset_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.type_),
            (0x08, 1, 0, 1, 0xb)
        );
        assert_eq!(cs.limit, 0xfffff);
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((ds.selector, ds.db, ds.type_, ds.unusable), (0x10, 1, 3, 0));
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let tables = boot_page_tables();
        let pd = &tables[2].1;
        let last = u64::from_le_bytes(pd[511 * 8..512 * 8].try_into().unwrap());
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn ap_entry_gets_index_and_count() {
        let r = entry_regs(0x200000, Some((1, 2)));
        assert_eq!(
            (r.rip, r.rdi, r.rdx, r.rsi, r.rsp),
            (0x200000, 1, 2, ZERO_PAGE_START, 0)
        );
        let b = entry_regs(0x1000000, None);
        assert_eq!((b.rsp, b.rdi), (BOOT_STACK_POINTER, 0));
    }
}
