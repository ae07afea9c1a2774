//! Local guest RAM: anonymous mappings laid out by `arch::x86_64::layout`.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::ram_ranges;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest RAM: {reason}")]
    Map { size: u64, reason: String },
    #[error("cannot preallocate {size} bytes of guest RAM (--mem-prealloc): {source}")]
    Prealloc {
        size: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Maps `mem_size` bytes of anonymous guest RAM: allocated lazily at the guest's first touch,
/// or all at once now with `prealloc` (MADV_POPULATE_WRITE), so that a first touch then costs
/// only KVM's mapping of a page the host already has.
pub fn local_memory(mem_size: u64, prealloc: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        size: mem_size,
        reason: e.to_string(),
    })?;
    if prealloc {
        for region in mem.iter() {
            let len = region.len() as usize;
            let host = region.as_ptr();
            // SAFETY: [host, host+len) is exactly the anonymous mapping this region owns;
            // MADV_POPULATE_WRITE only faults its pages in (writable, zero-filled), it does not
            // change the mapping or its contents.
            let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
            if rc != 0 {
                return Err(MemoryError::Prealloc {
                    size: mem_size,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(mem)
}
