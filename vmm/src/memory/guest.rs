//! Local guest RAM: anonymous mappings laid out by `arch::x86_64::layout`.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::ram_ranges;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest RAM: {reason}")]
    Map { size: u64, reason: String },
}

/// Maps `mem_size` bytes of anonymous, lazily allocated guest RAM.
pub fn local_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map {
        size: mem_size,
        reason: e.to_string(),
    })
}
