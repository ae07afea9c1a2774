//! A dirty bitmap by block range: which chunks of a disk a replica lacks (written while it was
//! away) or has not yet made durable. One bit per [`CHUNK`] bytes: 16 KiB of bitmap per 8 GiB.

/// Bytes per bit: a resync copies whole chunks.
pub const CHUNK: u64 = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    /// Chunks of the disk: bits beyond are never set.
    chunks: u64,
    /// Bits set, kept so reports and "is it clean" cost nothing.
    count: u64,
}

impl Bitmap {
    /// A clean bitmap for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let chunks = size.div_ceil(CHUNK);
        Bitmap {
            words: vec![0; chunks.div_ceil(64) as usize],
            chunks,
            count: 0,
        }
    }

    /// The chunks `[offset, offset + len)` touches (empty for `len == 0`).
    pub fn chunks(offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / CHUNK..(offset + len).div_ceil(CHUNK)
    }

    pub fn set(&mut self, chunk: u64) {
        if chunk >= self.chunks {
            return;
        }
        let (w, b) = ((chunk / 64) as usize, chunk % 64);
        if let Some(word) = self.words.get_mut(w) {
            if *word & (1 << b) == 0 {
                *word |= 1 << b;
                self.count += 1;
            }
        }
    }

    pub fn set_range(&mut self, offset: u64, len: u64) {
        for c in Self::chunks(offset, len) {
            self.set(c);
        }
    }

    pub fn clear(&mut self, chunk: u64) {
        let (w, b) = ((chunk / 64) as usize, chunk % 64);
        if let Some(word) = self.words.get_mut(w) {
            if *word & (1 << b) != 0 {
                *word &= !(1 << b);
                self.count -= 1;
            }
        }
    }

    /// Sets every bit set in `other`.
    pub fn merge(&mut self, other: &Bitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            self.count += u64::from((*o & !*w).count_ones());
            *w |= o;
        }
    }

    /// Takes the bits, leaving this bitmap clean.
    pub fn take(&mut self) -> Bitmap {
        let words = vec![0; self.words.len()];
        Bitmap {
            words: std::mem::replace(&mut self.words, words),
            chunks: self.chunks,
            count: std::mem::take(&mut self.count),
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_clean(&self) -> bool {
        self.count == 0
    }

    /// The first set chunk for which `skip` is false.
    pub fn first_where(&self, mut skip: impl FnMut(u64) -> bool) -> Option<u64> {
        for (i, &w) in self.words.iter().enumerate() {
            let mut bits = w;
            while bits != 0 {
                let c = i as u64 * 64 + u64::from(bits.trailing_zeros());
                if !skip(c) {
                    return Some(c);
                }
                bits &= bits - 1;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_counts_merge_and_take() {
        let mut b = Bitmap::new(10 * CHUNK + 1);
        assert_eq!(Bitmap::chunks(CHUNK - 1, 2), 0..2);
        assert_eq!(Bitmap::chunks(5, 0), 0..0);
        b.set_range(CHUNK - 1, 2);
        b.set(10);
        b.set(11); // beyond the disk: ignored
        assert_eq!(b.count(), 3);
        assert_eq!(b.first_where(|c| c < 1), Some(1));
        let mut other = Bitmap::new(10 * CHUNK + 1);
        other.set(1);
        other.set(5);
        b.merge(&other);
        assert_eq!(b.count(), 4);
        b.clear(0);
        let t = b.take();
        assert!(b.is_clean());
        assert_eq!(t.count(), 3);
        assert_eq!(t.first_where(|_| false), Some(1));
    }
}
