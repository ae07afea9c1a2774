//! What the guest learns from vnode's boot_params ("zero page", docs/guest-abi.md): the e820 RAM
//! map and the command line. Read from user mode through the identity map.

use testguest::region::MAX_SEGMENTS;

const E820_ENTRIES: u64 = 0x1e8;
const E820_TABLE: u64 = 0x2d0;
const E820_MAX: usize = 128;
const CMD_LINE_PTR: u64 = 0x228;
const CMDLINE_MAX: usize = 2048;
const E820_RAM: u32 = 1;

pub struct BootInfo {
    ram: [(u64, u64); MAX_SEGMENTS],
    nram: usize,
    cmdline: &'static [u8],
}

/// Reads a `T` at guest-physical address `gpa` (identity-mapped, user-accessible).
///
/// # Safety
/// `gpa..gpa + size_of::<T>()` must be mapped RAM that nothing writes concurrently.
unsafe fn read<T: Copy>(gpa: u64) -> T {
    // SAFETY: the caller guarantees the range is mapped and stable; no alignment is assumed.
    unsafe { core::ptr::read_unaligned(gpa as *const T) }
}

impl BootInfo {
    pub fn read(boot_params: u64) -> BootInfo {
        let mut info = BootInfo {
            ram: [(0, 0); MAX_SEGMENTS],
            nram: 0,
            cmdline: &[],
        };
        // SAFETY: vnode puts boot_params (4 KiB) in RAM below 1 MiB and never changes it; the
        // guest's page tables map it, and the guest does not write it.
        let entries = unsafe { read::<u8>(boot_params + E820_ENTRIES) } as usize;
        for i in 0..entries.min(E820_MAX) {
            let e = boot_params + E820_TABLE + 20 * i as u64;
            // SAFETY: as above; the e820 table lies inside boot_params.
            let (addr, size, kind) =
                unsafe { (read::<u64>(e), read::<u64>(e + 8), read::<u32>(e + 16)) };
            if kind == E820_RAM && size > 0 && info.nram < MAX_SEGMENTS {
                info.ram[info.nram] = (addr, size);
                info.nram += 1;
            }
        }
        // SAFETY: as above.
        let ptr = unsafe { read::<u32>(boot_params + CMD_LINE_PTR) } as u64;
        if ptr != 0 {
            let mut len = 0;
            // SAFETY: vnode writes a NUL-terminated command line of at most 2048 bytes at `ptr`
            // in low RAM, which is mapped and never written after boot.
            while len < CMDLINE_MAX && unsafe { read::<u8>(ptr + len as u64) } != 0 {
                len += 1;
            }
            // SAFETY: the `len` bytes just read are mapped, immutable for the guest's lifetime.
            info.cmdline = unsafe { core::slice::from_raw_parts(ptr as *const u8, len) };
        }
        info
    }

    /// The e820 RAM ranges, (start, length).
    pub fn ram(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ram[..self.nram].iter().copied()
    }

    pub fn ram_bytes(&self) -> u64 {
        self.ram().map(|(_, len)| len).sum()
    }

    /// The end of the highest RAM range.
    pub fn ram_top(&self) -> u64 {
        self.ram().map(|(s, l)| s + l).max().unwrap_or(0)
    }

    pub fn cmdline(&self) -> &'static [u8] {
        self.cmdline
    }
}
