//! A small deterministic PRNG (SplitMix64): every run with the same seed makes the same choices.

/// SplitMix64 (Steele, Lea, Flood 2014): one add and a 64-bit mix per number.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

/// The SplitMix64 finaliser: a bijective mix of 64 bits.
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator whose stream is fixed by `seed` and a `stream` number (e.g. pass and vCPU).
    pub fn new(seed: u64, stream: u64) -> Self {
        Rng {
            state: mix64(seed ^ mix64(stream.wrapping_add(0x5851_f42d_4c95_7f2d))),
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in `[0, n)` (`n > 0`), by multiply-shift (bias below 2^-32 for the sizes used here).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `pct` percent (`pct` in 0..=100).
    pub fn percent(&mut self, pct: u32) -> bool {
        self.below(100) < pct as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_streams_differ() {
        let mut a = Rng::new(1, 0);
        let mut b = Rng::new(1, 0);
        let mut c = Rng::new(1, 1);
        let (x, y, z) = (a.next_u64(), b.next_u64(), c.next_u64());
        assert_eq!(x, y);
        assert_ne!(x, z);
    }

    #[test]
    fn below_and_percent_are_in_range() {
        let mut r = Rng::new(7, 3);
        let mut hits = 0;
        for _ in 0..100_000 {
            assert!(r.below(13) < 13);
            let u = r.unit_f64();
            assert!((0.0..1.0).contains(&u));
            hits += r.percent(30) as u32;
        }
        assert!((29_000..31_000).contains(&hits), "{hits}");
        assert!(!Rng::new(1, 1).percent(0));
        assert!(Rng::new(1, 1).percent(100));
    }
}
