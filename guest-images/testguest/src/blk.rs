//! `test=blk`'s pure parts: what each disk sector holds, and the order requests visit the disk.
//!
//! Sector content is the memory test's content function over the disk's byte offsets with a
//! fixed pass, so it depends on the sector and the seed only: a sector holding another sector's
//! data, stale data or zeroes fails verification.

use crate::cmdline::Pattern;
use crate::content::{fill_pages, verify_pages, Mismatches};
use crate::perm::Permutation;

pub const SECTOR: u64 = 512;
/// Sectors per request: one 4 KiB buffer.
pub const CHUNK_SECTORS: u64 = 8;
/// The content function's "pass" for disk sectors.
const BLK_PASS: u32 = 0x62_6c6b;
const ORDER_SALT: u64 = 0x626c_6b6f;

/// Fills `buf` with the content of the sectors from `first_sector` on.
pub fn fill_sectors(buf: &mut [u8], first_sector: u64, seed: u64) {
    fill_pages(buf, first_sector * SECTOR, BLK_PASS, seed);
}

/// Mismatched 64-bit words of `buf` against sectors `first_sector..`; the first error is a byte
/// offset on the disk.
pub fn verify_sectors(buf: &[u8], first_sector: u64, seed: u64) -> Mismatches {
    verify_pages(buf, first_sector * SECTOR, BLK_PASS, seed)
}

/// The chunks of a `sectors`-sector test, visited in pattern order.
pub struct ChunkOrder {
    sectors: u64,
    perm: Option<Permutation>,
}

impl ChunkOrder {
    pub fn new(sectors: u64, pattern: Pattern, seed: u64) -> Self {
        let n = sectors.div_ceil(CHUNK_SECTORS);
        let perm = (pattern != Pattern::Seq).then(|| Permutation::new(n, seed ^ ORDER_SALT));
        ChunkOrder { sectors, perm }
    }

    pub fn len(&self) -> u64 {
        self.sectors.div_ceil(CHUNK_SECTORS)
    }

    pub fn is_empty(&self) -> bool {
        self.sectors == 0
    }

    /// The `i`-th chunk visited: (first sector, sector count).
    pub fn chunk(&self, i: u64) -> (u64, u64) {
        let c = self.perm.as_ref().map_or(i, |p| p.apply(i));
        let first = c * CHUNK_SECTORS;
        (first, CHUNK_SECTORS.min(self.sectors - first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_cover_every_sector_once() {
        for pattern in [Pattern::Seq, Pattern::Random] {
            let o = ChunkOrder::new(1000, pattern, 5);
            let mut seen = vec![false; 1000];
            for i in 0..o.len() {
                let (first, n) = o.chunk(i);
                for s in first..first + n {
                    assert!(!seen[s as usize]);
                    seen[s as usize] = true;
                }
            }
            assert!(seen.iter().all(|&s| s));
        }
        assert_eq!(ChunkOrder::new(20, Pattern::Seq, 1).chunk(2), (16, 4));
    }

    #[test]
    fn content_depends_on_sector_and_seed() {
        let mut a = vec![0u8; 1024];
        fill_sectors(&mut a, 10, 1);
        assert_eq!(verify_sectors(&a, 10, 1).errors, 0);
        assert_eq!(verify_sectors(&a, 11, 1).errors, 128);
        assert_eq!(verify_sectors(&a[512..], 11, 1).errors, 0);
        assert_eq!(verify_sectors(&a, 10, 2).errors, 128);
    }
}
