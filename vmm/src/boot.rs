//! Loading a guest: the kernel (ELF `vmlinux` or bzImage, via linux-loader), the initrd, the
//! command line, and the Linux boot parameters with the e820 map. The test guest uses the same
//! path: it is an ELF that reads the same boot parameters (docs/guest-abi.md).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{elf::Elf, load_cmdline, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::x86_64::layout::{
    e820_map, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START,
};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not an ELF or bzImage kernel")]
    NotAKernel(PathBuf),
    #[error("cannot load kernel {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM below {limit:#x}")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot copy initrd into guest RAM: {0}")]
    InitrdCopy(vm_memory::GuestMemoryError),
    #[error("kernel command line is longer than {CMDLINE_MAX_SIZE} bytes or not printable ASCII")]
    Cmdline,
    #[error("cannot write boot parameters: {0}")]
    BootParams(String),
}

/// The kind of kernel image, from its magic numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    Elf,
    BzImage,
}

/// What the vCPUs need to know about a loaded guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
    /// Every vCPU starts at `entry` (the guest's ELF carries the vNode SMP note).
    pub smp_entry: bool,
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::Read {
        path: path.to_owned(),
        source,
    }
}

/// Tells an ELF from a bzImage by their magic numbers.
pub fn kernel_kind(head: &[u8]) -> Option<KernelKind> {
    if head.len() >= 4 && head[..4] == *b"\x7fELF" {
        return Some(KernelKind::Elf);
    }
    if head.len() >= 0x206 && head[0x1fe..0x200] == [0x55, 0xaa] && head[0x202..0x206] == *b"HdrS" {
        return Some(KernelKind::BzImage);
    }
    None
}

/// Opens `path` and classifies it.
pub fn open_kernel(path: &Path) -> Result<(File, KernelKind), BootError> {
    let mut f = File::open(path).map_err(read_err(path))?;
    let mut head = vec![0u8; 0x206];
    let n = read_up_to(&mut f, &mut head).map_err(read_err(path))?;
    let kind = kernel_kind(&head[..n]).ok_or_else(|| BootError::NotAKernel(path.to_owned()))?;
    Ok((f, kind))
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Looks for the vNode note (name "vNode", type 1) in the ELF's PT_NOTE segments, wherever in
/// the file they are, and returns its flags. None for a file that is not such an ELF.
pub fn vnode_note_flags<R: Read + Seek>(f: &mut R) -> Option<u32> {
    /// Largest note segment read: notes are a few hundred bytes.
    const MAX_NOTES: u64 = 1 << 20;
    let mut at = |off: u64, len: u64| -> Option<Vec<u8>> {
        f.seek(SeekFrom::Start(off)).ok()?;
        let mut b = vec![0u8; usize::try_from(len).ok()?];
        f.read_exact(&mut b).ok()?;
        Some(b)
    };
    let le16 = |b: &[u8], o: usize| b.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let le32 = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let le64 = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let hdr = at(0, 64)?;
    let phoff = le64(&hdr, 0x20)?;
    let phentsize = u64::from(le16(&hdr, 0x36)?);
    let phnum = u64::from(le16(&hdr, 0x38)?);
    if phentsize < 56 {
        return None;
    }
    let phs = at(phoff, phentsize * phnum)?;
    for i in 0..phnum as usize {
        let ph = i * phentsize as usize;
        if le32(&phs, ph)? != 4 {
            continue; // not PT_NOTE
        }
        let (off, size) = (le64(&phs, ph + 8)?, le64(&phs, ph + 32)?);
        let seg = at(off, size.min(MAX_NOTES))?;
        let mut p = 0usize;
        while p + 12 <= seg.len() {
            let (namesz, descsz, ntype) = (
                le32(&seg, p)? as usize,
                le32(&seg, p + 4)? as usize,
                le32(&seg, p + 8)?,
            );
            let name = seg.get(p + 12..(p + 12).checked_add(namesz)?)?;
            let desc = p + 12 + namesz.div_ceil(4) * 4;
            if name == b"vNode\0" && ntype == 1 && descsz >= 4 {
                return le32(&seg, desc);
            }
            p = desc.checked_add(descsz.div_ceil(4) * 4)?;
        }
    }
    None
}

/// Loads the kernel and returns its entry point and the setup header to pass on.
fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<
    (
        BootInfo,
        u64,
        Option<linux_loader::loader::bootparam::setup_header>,
    ),
    BootError,
> {
    let (mut f, kind) = open_kernel(path)?;
    let load_err = |source| BootError::Load {
        path: path.to_owned(),
        source,
    };
    match kind {
        KernelKind::Elf => {
            let r =
                Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
            let smp_entry = vnode_note_flags(&mut f).is_some_and(|flags| flags & 1 != 0);
            let info = BootInfo {
                entry: r.kernel_load.0,
                smp_entry,
            };
            Ok((info, r.kernel_end, None))
        }
        KernelKind::BzImage => {
            let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let info = BootInfo {
                entry: r.kernel_load.0 + 0x200,
                smp_entry: false,
            };
            Ok((info, r.kernel_end, r.setup_header))
        }
    }
}

/// Copies the initrd to the top of low RAM (below the 32-bit MMIO gap) and returns (addr, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = File::open(path).map_err(read_err(path))?;
    let size = f.metadata().map_err(read_err(path))?.len();
    let low_end = mem.last_addr().0.min(MMIO_GAP_START - 1).min(addr_max) + 1;
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end);
    let Some(addr) = addr else {
        return Err(BootError::InitrdTooBig {
            path: path.to_owned(),
            size,
            limit: low_end,
        });
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(BootError::InitrdCopy)?;
    Ok((addr, size))
}

/// Loads kernel, initrd and command line, and writes the boot parameters (with `acpi_rsdp`,
/// where the ACPI RSDP is, when the VM has ACPI tables).
pub fn load_guest(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    acpi_rsdp: Option<u64>,
) -> Result<BootInfo, BootError> {
    let (info, kernel_end, setup) = load_kernel(mem, kernel)?;
    let mut params = boot_params::default();
    if let Some(hdr) = setup {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.loadflags |= 0x01; // LOADED_HIGH
    params.acpi_rsdp_addr = acpi_rsdp.unwrap_or(0);

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|_| BootError::Cmdline)?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline).map_err(|_| BootError::Cmdline)?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(|_| BootError::Cmdline)?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    if let Some(path) = initrd {
        let addr_max = match params.hdr.initrd_addr_max {
            0 => 0x37ff_ffff,
            m => u64::from(m),
        };
        let (addr, size) = load_initrd(mem, path, kernel_end, addr_max)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let map = e820_map(mem_size);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }
    params.e820_entries = map.len() as u8;

    let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem)
        .map_err(|e| BootError::BootParams(e.to_string()))?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_kernels_by_magic() {
        assert_eq!(kernel_kind(b"\x7fELF\x02\x01"), Some(KernelKind::Elf));
        let mut bz = vec![0u8; 0x210];
        bz[0x1fe] = 0x55;
        bz[0x1ff] = 0xaa;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(kernel_kind(&bz), Some(KernelKind::BzImage));
        assert_eq!(kernel_kind(b"#!/bin/sh\n"), None);
        assert_eq!(kernel_kind(b""), None);
    }

    /// A minimal ELF64 header + one PT_NOTE program header + the note.
    fn elf_with_note(name: &[u8], ntype: u32, flags: u32) -> Vec<u8> {
        let mut e = vec![0u8; 0x40 + 0x38];
        e[..4].copy_from_slice(b"\x7fELF");
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        e[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        let note_off = e.len() as u64;
        e[ph + 8..ph + 16].copy_from_slice(&note_off.to_le_bytes());
        let mut note = vec![];
        note.extend_from_slice(&(name.len() as u32).to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&ntype.to_le_bytes());
        note.extend_from_slice(name);
        while note.len() % 4 != 0 {
            note.push(0);
        }
        note.extend_from_slice(&flags.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        e.extend_from_slice(&note);
        e
    }

    #[test]
    fn finds_the_vnode_note() {
        let flags = |e: Vec<u8>| vnode_note_flags(&mut std::io::Cursor::new(e));
        assert_eq!(flags(elf_with_note(b"vNode\0", 1, 1)), Some(1));
        assert_eq!(flags(elf_with_note(b"Xen\0", 18, 1)), None);
        assert_eq!(flags(elf_with_note(b"vNode\0", 2, 1)), None);
    }

    #[test]
    fn finds_a_note_far_into_the_file() {
        // The note's segment 1 MiB in: past any fixed-size head a loader might read.
        let mut e = elf_with_note(b"vNode\0", 1, 1);
        let note = e.split_off(0x40 + 0x38);
        let far = 1u64 << 20;
        e[0x40 + 8..0x40 + 16].copy_from_slice(&far.to_le_bytes());
        e.resize(far as usize, 0);
        e.extend_from_slice(&note);
        assert_eq!(vnode_note_flags(&mut std::io::Cursor::new(e)), Some(1));
    }

    #[test]
    fn truncated_elf_has_no_note() {
        let e = elf_with_note(b"vNode\0", 1, 1);
        for cut in [0, 10, 0x40, 0x70, e.len() - 2] {
            let mut f = std::io::Cursor::new(&e[..cut]);
            assert_eq!(vnode_note_flags(&mut f), None, "cut at {cut}");
        }
    }
}
