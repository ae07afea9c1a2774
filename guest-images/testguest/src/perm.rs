//! A keyed pseudo-random permutation of `0..n`: the page order of the `random` and `zipf` fills,
//! and the scrambling that spreads zipf's hot ranks over the region.
//!
//! A 4-round Feistel network over the smallest even-bit-width power of two `>= n`, with cycle
//! walking to stay inside `0..n` (at most 4x the domain, so under 4 rounds-trips expected).
//! Evaluating one index costs a few multiplies and needs no memory, so it works for any `n`.

use crate::rng::mix64;

#[derive(Clone, Debug)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    pub fn new(n: u64, seed: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let mut keys = [0; 4];
        for (i, k) in keys.iter_mut().enumerate() {
            *k = mix64(seed ^ mix64(0x7065_726d_0000_0000 + i as u64));
        }
        Permutation { n, half_bits, keys }
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn round(&self, mut x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = mix64(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        x = (l << self.half_bits) | r;
        x
    }

    /// The image of `i` (`i < n`).
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mut x = self.round(i);
        while x >= self.n {
            x = self.round(x);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_covers_every_page() {
        for n in [1u64, 2, 3, 5, 17, 64, 1000, 4097, 65_536, 230_000] {
            let p = Permutation::new(n, n * 7 + 1);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i);
                assert!(j < n);
                assert!(!seen[j as usize], "n={n}: {j} twice");
                seen[j as usize] = true;
            }
        }
    }

    #[test]
    fn permutation_is_not_the_identity() {
        let p = Permutation::new(100_000, 1);
        let fixed = (0..100_000).filter(|&i| p.apply(i) == i).count();
        assert!(fixed < 100, "{fixed} fixed points");
    }
}
