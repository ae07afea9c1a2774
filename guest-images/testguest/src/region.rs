//! The test region R: the RAM pages at or above `base`, in ascending address order, possibly in
//! several pieces when the e820 map has holes (vnode puts its 32-bit MMIO gap at 3 GiB).
//! Pages are numbered 0..P across the pieces; `gpa(page)` maps a number to its address.

use crate::content::PAGE_SIZE;

pub const MAX_SEGMENTS: usize = 16;
const PAGE: u64 = PAGE_SIZE as u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// (first gpa, pages), ascending.
    segs: [(u64, u64); MAX_SEGMENTS],
    nsegs: usize,
    pages: u64,
}

impl Region {
    /// All whole pages of the RAM ranges `(start, len)` at or above `base`.
    pub fn above(ram: impl Iterator<Item = (u64, u64)>, base: u64) -> Region {
        let mut r = Region {
            segs: [(0, 0); MAX_SEGMENTS],
            nsegs: 0,
            pages: 0,
        };
        for (start, len) in ram {
            let end = start.saturating_add(len) & !(PAGE - 1);
            let start = start.max(base).next_multiple_of(PAGE);
            if end <= start || r.nsegs == MAX_SEGMENTS {
                continue;
            }
            // Insert in address order.
            let mut i = r.nsegs;
            while i > 0 && r.segs[i - 1].0 > start {
                r.segs[i] = r.segs[i - 1];
                i -= 1;
            }
            r.segs[i] = (start, (end - start) / PAGE);
            r.nsegs += 1;
            r.pages += (end - start) / PAGE;
        }
        r
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn bytes(&self) -> u64 {
        self.pages * PAGE
    }

    /// Keeps only the first `pages` pages.
    pub fn truncate(&mut self, pages: u64) {
        let mut left = pages.min(self.pages);
        self.pages = left;
        for i in 0..self.nsegs {
            let take = self.segs[i].1.min(left);
            self.segs[i].1 = take;
            left -= take;
            if take == 0 {
                self.nsegs = i;
                break;
            }
        }
    }

    /// The address of page `page` (`page < pages()`).
    #[inline]
    pub fn gpa(&self, page: u64) -> u64 {
        let mut p = page;
        for &(start, n) in &self.segs[..self.nsegs] {
            if p < n {
                return start + p * PAGE;
            }
            p -= n;
        }
        panic!("page {page} outside the region");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_below_base_and_spans_holes() {
        let ram = [
            (0x1_0000_0000u64, 0x4000),
            (0, 0x9fc00),
            (0x10_0000, 0xbff0_0000),
        ];
        let mut r = Region::above(ram.into_iter(), 0x80_0000);
        assert_eq!(r.pages(), (0xc000_0000 - 0x80_0000) / 4096 + 4);
        assert_eq!(r.gpa(0), 0x80_0000);
        let last_low = (0xc000_0000 - 0x80_0000) / 4096 - 1;
        assert_eq!(r.gpa(last_low), 0xc000_0000 - 4096);
        assert_eq!(r.gpa(last_low + 1), 0x1_0000_0000);
        assert_eq!(r.gpa(last_low + 4), 0x1_0000_3000);
        r.truncate(10);
        assert_eq!((r.pages(), r.bytes()), (10, 40960));
        assert_eq!(r.gpa(9), 0x80_0000 + 9 * 4096);
    }

    #[test]
    #[should_panic]
    fn gpa_outside_panics() {
        let mut r = Region::above([(0u64, 1 << 30)].into_iter(), 1 << 21);
        r.truncate(3);
        r.gpa(3);
    }
}
