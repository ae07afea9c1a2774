//! Port I/O from user mode (IOPL 3): COM1 output and vnode's debug ports (docs/guest-abi.md).

use core::arch::asm;

const COM1: u16 = 0x3f8;
const COM1_LSR: u16 = 0x3fd;
const LSR_THR_EMPTY: u8 = 0x20;
const DEBUG_EXIT: u16 = 0xf4;
const PHASE_MARKER: u16 = 0xf5;

fn outb(port: u16, v: u8) {
    // SAFETY: the guest runs with IOPL 3 and these are vnode's UART and debug ports; an `out`
    // touches no guest memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

fn outl(port: u16, v: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`; reading the UART's LSR has no side effect on memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Writes bytes to COM1, polling the line status register before each one.
pub fn serial_write(bytes: &[u8]) {
    for &b in bytes {
        while inb(COM1_LSR) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, b);
    }
}

/// Tells vnode a phase is done (`--debug-corrupt` acts on these).
pub fn phase_marker(phase: u32) {
    outl(PHASE_MARKER, phase);
}

/// Ends the VM: vnode exits with `status`.
pub fn exit(status: u8) -> ! {
    outl(DEBUG_EXIT, status as u32);
    // vnode stops the VM on the exit port; should it not, spin rather than run on.
    loop {
        core::hint::spin_loop();
    }
}

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}
