//! The content function: what every 64-bit word of the test region holds after a given pass.
//!
//! `word(gpa, key(pass, seed))` depends on the word's guest-physical address, the pass that last
//! wrote it and the seed. For a fixed key it is a bijection of the address, so a page that holds
//! another page's data, stale data from an earlier pass, zeroes, or a single flipped bit all show
//! up as mismatches.

use crate::rng::mix64;

pub const PAGE_SIZE: usize = 4096;
const WORD: usize = 8;

/// The per-(pass, seed) key mixed into every word.
#[inline]
pub fn key(pass: u32, seed: u64) -> u64 {
    mix64(seed ^ mix64(0x7465_7374_6775_6573 ^ pass as u64))
}

/// The value of the word at `gpa` (8-byte aligned) for `key`.
#[inline(always)]
pub fn word(gpa: u64, key: u64) -> u64 {
    let x = (gpa ^ key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// The result of verifying memory: how many words differ, and the lowest address of one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mismatches {
    pub errors: u64,
    pub first_error_gpa: Option<u64>,
}

impl Mismatches {
    pub fn merge(&mut self, other: Mismatches) {
        self.errors += other.errors;
        self.first_error_gpa = match (self.first_error_gpa, other.first_error_gpa) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Fills `mem`, which holds guest-physical addresses `base_gpa..`, with the content of `pass`.
/// `mem.len()` and `base_gpa` should be multiples of 8; a trailing partial word is left alone.
pub fn fill_pages(mem: &mut [u8], base_gpa: u64, pass: u32, seed: u64) {
    let k = key(pass, seed);
    for (i, w) in mem.chunks_exact_mut(WORD).enumerate() {
        w.copy_from_slice(&word(base_gpa + (i * WORD) as u64, k).to_le_bytes());
    }
}

/// Checks `mem` (addresses `base_gpa..`) against the content of `pass`: mismatched words.
pub fn verify_pages(mem: &[u8], base_gpa: u64, pass: u32, seed: u64) -> Mismatches {
    let k = key(pass, seed);
    let mut bad = 0u64;
    for (i, w) in mem.chunks_exact(WORD).enumerate() {
        let got = u64::from_le_bytes(w.try_into().expect("chunks_exact gives 8 bytes"));
        bad += (got != word(base_gpa + (i * WORD) as u64, k)) as u64;
    }
    if bad == 0 {
        return Mismatches::default();
    }
    // Rare path: find the first bad word.
    let first = mem.chunks_exact(WORD).enumerate().find_map(|(i, w)| {
        let gpa = base_gpa + (i * WORD) as u64;
        let got = u64::from_le_bytes(w.try_into().expect("chunks_exact gives 8 bytes"));
        (got != word(gpa, k)).then_some(gpa)
    });
    Mismatches {
        errors: bad,
        first_error_gpa: first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_depend_on_address_pass_and_seed() {
        let k = key(0, 1);
        assert_ne!(word(0x20_0000, k), word(0x20_0008, k));
        assert_ne!(word(0x20_0000, k), word(0x20_0000, key(1, 1)));
        assert_ne!(word(0x20_0000, k), word(0x20_0000, key(0, 2)));
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000u64 {
            assert!(seen.insert(word(0x40_0000 + 8 * i, k)));
        }
    }

    #[test]
    fn fill_then_verify_finds_exactly_the_corruption() {
        let mut mem = vec![0u8; 4 * PAGE_SIZE];
        let base = 0x80_0000;
        fill_pages(&mut mem, base, 3, 42);
        assert_eq!(verify_pages(&mem, base, 3, 42), Mismatches::default());
        assert_eq!(verify_pages(&mem, base, 2, 42).errors, 2048);
        assert_eq!(verify_pages(&mem, base + 4096, 3, 42).errors, 2048);
        mem[5000] ^= 0x10;
        mem[9000] ^= 0x01;
        let m = verify_pages(&mem, base, 3, 42);
        assert_eq!(m.errors, 2);
        assert_eq!(m.first_error_gpa, Some(base + 5000 / 8 * 8));
    }

    #[test]
    fn merge_keeps_lowest_address() {
        let mut a = Mismatches::default();
        a.merge(Mismatches {
            errors: 1,
            first_error_gpa: Some(0x5000),
        });
        a.merge(Mismatches {
            errors: 2,
            first_error_gpa: Some(0x3000),
        });
        a.merge(Mismatches::default());
        assert_eq!(
            a,
            Mismatches {
                errors: 3,
                first_error_gpa: Some(0x3000)
            }
        );
    }
}
