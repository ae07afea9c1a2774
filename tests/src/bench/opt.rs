//! Belady's OPT over the test guest's own page accesses: the fewest pages any demand-paged cache
//! of a given size must fault in. The sequence is the guest's, replayed through the library the
//! guest itself runs (`testguest::plan`), for one vCPU: the fill, the passes, then the ascending
//! verify sweep.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use testguest::cmdline::Pattern;
use testguest::plan::{fill_page, fill_permutation, Accesses};

/// OPT's misses in the passes and in the verify sweep (the fill's are not counted: the
/// benchmark's figures leave the fill out too; the fill still decides what is resident after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptMisses {
    pub passes: u64,
    pub verify: u64,
}

pub fn pattern(name: &str) -> Option<Pattern> {
    match name {
        "seq" => Some(Pattern::Seq),
        "random" => Some(Pattern::Random),
        "zipf" => Some(Pattern::Zipf),
        _ => None,
    }
}

/// The guest's accesses for `test=mem` with one vCPU, and where the passes and verify begin.
fn trace(
    pages: u64,
    pat: Pattern,
    seed: u64,
    writes: u32,
    passes: u32,
) -> (Vec<u32>, usize, usize) {
    let mut t = Vec::with_capacity((pages * (passes as u64 + 2)) as usize);
    let perm = fill_permutation(pages, seed);
    t.extend((0..pages).map(|pos| fill_page(pat, &perm, pos) as u32));
    let passes_at = t.len();
    let acc = Accesses::new(pages, 0, 1, pat, seed, writes);
    for pass in 1..=passes {
        t.extend(acc.pass(pass).map(|(p, _)| p as u32));
    }
    let verify_at = t.len();
    t.extend(0..pages as u32);
    (t, passes_at, verify_at)
}

/// The misses of OPT and of true LRU (what the best recency-based policy does, without OPT's
/// knowledge of the future) with room for `cap` pages, on the guest's accesses.
pub fn misses(
    pages: u64,
    pat: Pattern,
    seed: u64,
    writes: u32,
    passes: u32,
    cap: usize,
) -> (OptMisses, OptMisses) {
    let (t, passes_at, verify_at) = trace(pages, pat, seed, writes, passes);
    (
        simulate(&t, pages as usize, cap, passes_at, verify_at),
        simulate_lru(&t, pages as usize, cap, passes_at, verify_at),
    )
}

fn simulate_lru(
    t: &[u32],
    pages: usize,
    cap: usize,
    passes_at: usize,
    verify_at: usize,
) -> OptMisses {
    // Resident pages by last use; `last[p]` is the key of p's entry.
    let mut by_use = std::collections::BTreeMap::new();
    let mut last = vec![usize::MAX; pages];
    let mut out = OptMisses {
        passes: 0,
        verify: 0,
    };
    for (i, &p) in t.iter().enumerate() {
        let pu = p as usize;
        if last[pu] != usize::MAX {
            by_use.remove(&last[pu]);
        } else {
            if i >= verify_at {
                out.verify += 1;
            } else if i >= passes_at {
                out.passes += 1;
            }
            if by_use.len() == cap {
                if let Some((_, v)) = by_use.pop_first() {
                    last[v as usize] = usize::MAX;
                }
            }
            if cap == 0 {
                continue;
            }
        }
        by_use.insert(i, p);
        last[pu] = i;
    }
    out
}

fn simulate(t: &[u32], pages: usize, cap: usize, passes_at: usize, verify_at: usize) -> OptMisses {
    const NEVER: usize = usize::MAX;
    // next[i]: where t[i]'s page is used next.
    let mut next = vec![NEVER; t.len()];
    let mut seen = vec![NEVER; pages];
    for i in (0..t.len()).rev() {
        next[i] = seen[t[i] as usize];
        seen[t[i] as usize] = i;
    }
    // Resident pages keyed by their next use; stale heap entries are skipped on pop.
    let mut due = vec![NEVER; pages];
    let mut resident = vec![false; pages];
    let mut heap: BinaryHeap<(usize, Reverse<u32>)> = BinaryHeap::new();
    let (mut count, mut out) = (
        0usize,
        OptMisses {
            passes: 0,
            verify: 0,
        },
    );
    for (i, &p) in t.iter().enumerate() {
        let pu = p as usize;
        if !resident[pu] {
            if i >= verify_at {
                out.verify += 1;
            } else if i >= passes_at {
                out.passes += 1;
            }
            if count == cap {
                // Evict the page used furthest in the future.
                while let Some((when, Reverse(v))) = heap.pop() {
                    if resident[v as usize] && due[v as usize] == when {
                        resident[v as usize] = false;
                        count -= 1;
                        break;
                    }
                }
            }
            if cap == 0 {
                continue;
            }
            resident[pu] = true;
            count += 1;
        }
        due[pu] = next[i];
        heap.push((next[i], Reverse(p)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cyclic_sweeps_miss_all_but_the_cache_each_time() {
        // Three sweeps of 10 pages, room for 4: at most 4 pages are resident when a sweep
        // starts, so it misses at least 10 - 4 = 6; OPT attains that here.
        let t: Vec<u32> = (0..3).flat_map(|_| 0..10u32).collect();
        let m = simulate(&t, 10, 4, 10, 20);
        assert_eq!((m.passes, m.verify), (6, 6));
    }

    #[test]
    fn lru_misses_every_access_of_a_loop_larger_than_the_cache() {
        let t: Vec<u32> = (0..20).flat_map(|_| 0..5u32).collect();
        let m = simulate_lru(&t, 5, 4, 5, 95);
        assert_eq!((m.passes, m.verify), (90, 5));
        let m = simulate_lru(&t, 5, 5, 5, 95);
        assert_eq!((m.passes, m.verify), (0, 0));
    }

    #[test]
    fn everything_fits_no_misses_after_the_fill() {
        let t: Vec<u32> = (0..3).flat_map(|_| 0..10u32).collect();
        assert_eq!(
            simulate(&t, 10, 10, 10, 20),
            OptMisses {
                passes: 0,
                verify: 0
            }
        );
    }

    #[test]
    fn belady_beats_lru_on_a_loop() {
        // LRU misses every access of a loop one larger than the cache; OPT does not.
        let t: Vec<u32> = (0..20).flat_map(|_| 0..5u32).collect();
        let m = simulate(&t, 5, 4, 5, 95);
        assert!(m.passes < 90 / 2, "{m:?}");
    }

    #[test]
    fn the_guest_trace_has_the_guests_shape() {
        let (t, passes_at, verify_at) = trace(1000, Pattern::Zipf, 1, 50, 2);
        assert_eq!((passes_at, verify_at, t.len()), (1000, 3000, 4000));
        let mut fill = t[..1000].to_vec();
        fill.sort_unstable();
        assert_eq!(
            fill,
            (0..1000).collect::<Vec<u32>>(),
            "the fill writes every page once"
        );
        // Zipf: a skewed pass touches far fewer distinct pages than it makes accesses.
        let mut pass: Vec<u32> = t[1000..2000].to_vec();
        pass.sort_unstable();
        pass.dedup();
        assert!(pass.len() < 800, "{} distinct", pass.len());
    }
}
