//! Zipf-distributed ranks over `0..n` (rank 0 the hottest), by the method of Gray et al.,
//! "Quickly generating billion-record synthetic databases" (SIGMOD 1994), as used by YCSB.
//!
//! Setting up needs zeta(n, theta) = sum 1/i^theta: summed exactly for the first 2^20 terms and
//! by the Euler-Maclaurin integral beyond, so set-up stays fast for any region size.

use crate::math::powf;
use crate::rng::Rng;

pub const DEFAULT_THETA: f64 = 0.99;

#[derive(Clone, Debug)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
    half_pow_theta: f64,
}

const EXACT_TERMS: u64 = 1 << 20;

/// zeta(n, theta) = sum_{i=1..n} i^-theta.
pub fn zeta(n: u64, theta: f64) -> f64 {
    let exact = n.min(EXACT_TERMS);
    let mut sum = 0.0;
    for i in 1..=exact {
        sum += powf(i as f64, -theta);
    }
    if n > exact {
        let a = exact as f64 + 0.5;
        let b = n as f64 + 0.5;
        sum += (powf(b, 1.0 - theta) - powf(a, 1.0 - theta)) / (1.0 - theta);
    }
    sum
}

impl Zipf {
    /// A sampler over `0..n` (`n >= 1`) with skew `theta` in (0, 1).
    pub fn new(n: u64, theta: f64) -> Self {
        let n = n.max(1);
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2, theta);
        let eta = (1.0 - powf(2.0 / n as f64, 1.0 - theta)) / (1.0 - zeta2 / zetan);
        Zipf {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta,
            half_pow_theta: powf(0.5, theta),
        }
    }

    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// A rank in `0..n`.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit_f64();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + self.half_pow_theta {
            return 1.min(self.n - 1);
        }
        let r = (self.n as f64 * powf(self.eta * u - self.eta + 1.0, self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeta_matches_direct_sum() {
        let direct: f64 = (1..=3_000_000u64).map(|i| (i as f64).powf(-0.99)).sum();
        let z = zeta(3_000_000, 0.99);
        assert!((z - direct).abs() / direct < 1e-9, "{z} {direct}");
    }

    #[test]
    fn zipf_distribution_sanity() {
        let n = 100_000u64;
        let z = Zipf::new(n, DEFAULT_THETA);
        let mut rng = Rng::new(1, 0);
        let samples = 1_000_000;
        let mut counts = vec![0u64; n as usize];
        for _ in 0..samples {
            let r = z.sample(&mut rng);
            assert!(r < n);
            counts[r as usize] += 1;
        }
        // P(rank 0) = 1/zeta(n): about 8% for n = 1e5, theta = 0.99.
        let p0 = counts[0] as f64 / samples as f64;
        let expect0 = 1.0 / zeta(n, 0.99);
        assert!(
            (p0 - expect0).abs() < 0.1 * expect0,
            "p0 {p0} expected {expect0}"
        );
        // Rank 1 about 2^-0.99 as often as rank 0, and the head is heavy: the hottest 1% of
        // ranks take more than half of the accesses.
        let ratio = counts[1] as f64 / counts[0] as f64;
        assert!((0.4..0.6).contains(&ratio), "ratio {ratio}");
        let head: u64 = counts[..1000].iter().sum();
        assert!(head as f64 > 0.5 * samples as f64, "head {head}");
        // ...and the tail is still reached.
        let tail: u64 = counts[50_000..].iter().sum();
        assert!(tail > 0);
        // Monotone on average: the first decile is hotter than the last.
        let first: u64 = counts[..10_000].iter().sum();
        let last: u64 = counts[90_000..].iter().sum();
        assert!(first > 5 * last);
    }

    #[test]
    fn tiny_n() {
        let z = Zipf::new(1, 0.99);
        let mut rng = Rng::new(3, 3);
        for _ in 0..1000 {
            assert_eq!(z.sample(&mut rng), 0);
        }
        let z = Zipf::new(2, 0.99);
        for _ in 0..1000 {
            assert!(z.sample(&mut rng) < 2);
        }
    }
}
