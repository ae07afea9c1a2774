//! How the work of a phase is split among N vCPUs.
//!
//! Fill and verify split the page order into N contiguous runs (`share`). The passes phase gives
//! vCPU k the pages with `page % N == k` (`OwnPages`), and maps every page the pattern picks to
//! one of those, so no two vCPUs ever access a page at the same time and the metadata needs no
//! locks, while each vCPU still sees the pattern's distribution.

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
