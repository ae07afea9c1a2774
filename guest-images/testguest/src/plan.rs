//! How the work of a phase is split among N vCPUs.
//!
//! Fill and verify split the page order into N contiguous runs (`share`). The passes phase gives
//! vCPU k the pages with `page % N == k` (`OwnPages`), and maps every page the pattern picks to
//! one of those, so no two vCPUs ever access a page at the same time and the metadata needs no
//! locks, while each vCPU still sees the pattern's distribution.

use crate::cmdline::Pattern;
use crate::perm::Permutation;
use crate::rng::Rng;
use crate::zipf::{Zipf, DEFAULT_THETA};

/// Seeds of the fill permutation and of zipf's scrambling derive from the run's seed with these.
pub const FILL_PERM_SALT: u64 = 0x66696c6c;
pub const ZIPF_PERM_SALT: u64 = 0x7a697066;

/// The page the fill phase writes at position `pos` of its order (seq: ascending; random and
/// zipf: the keyed permutation `fill_permutation`).
pub fn fill_page(pattern: Pattern, perm: &Permutation, pos: u64) -> u64 {
    match pattern {
        Pattern::Seq => pos,
        Pattern::Random | Pattern::Zipf => perm.apply(pos),
    }
}

pub fn fill_permutation(pages: u64, seed: u64) -> Permutation {
    Permutation::new(pages, seed ^ FILL_PERM_SALT)
}

/// The passes phase's accesses of vCPU `k` of `n`: in each pass as many as it owns pages, each a
/// page (seq: its own in ascending order; random: uniform; zipf: a zipf(0.99) rank scrambled by a
/// permutation so hot pages are spread over R) mapped to one of its own, and whether it writes.
/// The guest runs exactly this sequence; host tools replay it (a cache simulation, say).
pub struct Accesses {
    own: OwnPages,
    pages: u64,
    pattern: Pattern,
    scramble: Permutation,
    zipf: Option<Zipf>,
    seed: u64,
    writes: u32,
    k: u32,
}

impl Accesses {
    pub fn new(pages: u64, k: u32, n: u32, pattern: Pattern, seed: u64, writes: u32) -> Self {
        Accesses {
            own: OwnPages::new(pages, k, n),
            pages,
            pattern,
            scramble: Permutation::new(pages, seed ^ ZIPF_PERM_SALT),
            zipf: (pattern == Pattern::Zipf).then(|| Zipf::new(pages, DEFAULT_THETA)),
            seed,
            writes,
            k,
        }
    }

    /// Accesses per pass.
    pub fn count(&self) -> u64 {
        self.own.count()
    }

    /// Pass `pass` (1-based): `(page, write)` in order.
    pub fn pass(&self, pass: u32) -> PassAccesses<'_> {
        PassAccesses {
            acc: self,
            rng: Rng::new(self.seed, (pass as u64) << 32 | self.k as u64),
            i: 0,
        }
    }
}

pub struct PassAccesses<'a> {
    acc: &'a Accesses,
    rng: Rng,
    i: u64,
}

impl Iterator for PassAccesses<'_> {
    type Item = (u64, bool);

    fn next(&mut self) -> Option<(u64, bool)> {
        let a = self.acc;
        if self.i >= a.own.count() {
            return None;
        }
        let p = match (&a.zipf, a.pattern) {
            (_, Pattern::Seq) => a.own.nth(self.i),
            (Some(z), _) => a.own.map(a.scramble.apply(z.sample(&mut self.rng))),
            _ => a.own.map(self.rng.below(a.pages)),
        };
        self.i += 1;
        Some((p, self.rng.percent(a.writes)))
    }
}

/// vCPU `k`'s run `[lo, hi)` of `0..total` split into `n` nearly equal runs.
pub fn share(total: u64, k: u32, n: u32) -> (u64, u64) {
    let at = |i: u64| (total as u128 * i as u128 / n as u128) as u64;
    (at(k as u64), at(k as u64 + 1))
}

/// The pages of `0..pages` that vCPU `k` of `n` owns in the passes phase.
#[derive(Clone, Copy, Debug)]
pub struct OwnPages {
    k: u64,
    n: u64,
    pages: u64,
}

impl OwnPages {
    pub fn new(pages: u64, k: u32, n: u32) -> Self {
        OwnPages {
            k: k as u64,
            n: n.max(1) as u64,
            pages,
        }
    }

    /// How many pages vCPU k owns (0 when `k >= pages`).
    pub fn count(&self) -> u64 {
        self.pages.saturating_sub(self.k).div_ceil(self.n)
    }

    /// The `i`-th owned page in ascending order (`i < count()`).
    pub fn nth(&self, i: u64) -> u64 {
        self.k + i * self.n
    }

    /// The owned page in the same group of `n` as `page` (`page < pages`, `count() > 0`):
    /// the one before it when the last group is short.
    pub fn map(&self, page: u64) -> u64 {
        let q = page - page % self.n + self.k;
        if q >= self.pages {
            q - self.n
        } else {
            q
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for (total, n) in [(0u64, 1u32), (1, 2), (10, 3), (230_400, 2), (7, 32)] {
            let mut next = 0;
            for k in 0..n {
                let (lo, hi) = share(total, k, n);
                assert_eq!(lo, next);
                next = hi;
            }
            assert_eq!(next, total);
        }
    }

    #[test]
    fn owned_pages_partition_and_map_home() {
        for (pages, n) in [(1u64, 1u32), (10, 3), (11, 4), (100, 7), (3, 5)] {
            let mut owner = vec![None; pages as usize];
            for k in 0..n {
                let own = OwnPages::new(pages, k, n);
                for i in 0..own.count() {
                    let p = own.nth(i) as usize;
                    assert!(owner[p].is_none());
                    owner[p] = Some(k);
                }
                if own.count() > 0 {
                    for p in 0..pages {
                        let q = own.map(p);
                        assert!(q < pages && q % n as u64 == k as u64, "{pages} {n} {k} {p}");
                        assert!(q.abs_diff(p) < 2 * n as u64);
                    }
                }
            }
            assert!(owner.iter().all(|o| o.is_some()));
        }
    }
}
