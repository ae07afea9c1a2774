//! The ExCache's bookkeeping, as plain code: which guest pages are resident, dirty or stored on
//! the memory server, which page to evict next (FIFO, or CLOCK as an LRU approximation), and what
//! to prefetch. The fault server (`fault.rs`) drives it; nothing here touches memory or sockets.
//!
//! Reference bits for CLOCK come from what the fault path can see: a page is referenced when it
//! is faulted in and whenever the guest writes it after a write-protected install (the
//! write-protect fault). Reads of a resident page are invisible to userspace on this host (no
//! page_idle tracking), so CLOCK here gives written and recently faulted pages a second chance.

use std::collections::VecDeque;

/// Eviction policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Fifo,
    Clock,
}

impl Policy {
    /// The name `--excache-policy` takes.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Fifo => "fifo",
            Policy::Clock => "clock",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fifo" => Ok(Policy::Fifo),
            "clock" => Ok(Policy::Clock),
            other => Err(format!(
                "unknown ExCache policy {other:?}: use fifo or clock"
            )),
        }
    }
}

const RESIDENT: u8 = 1;
const DIRTY: u8 = 2;
const ON_SERVER: u8 = 4;
const REFERENCED: u8 = 8;
/// Chosen as a victim and being written back: still mapped, no longer resident for the policy.
const EVICTING: u8 = 16;
/// Written by the guest while its write-back was in flight: must be sent again before dropping.
const REDIRTY: u8 = 32;
const EMPTY: u32 = u32::MAX;

/// A page chosen for eviction: its index and whether its content must be written back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Victim {
    pub page: u32,
    pub dirty: bool,
}

pub struct ExCache {
    state: Vec<u8>,
    limit: usize,
    resident: usize,
    /// Victims whose write-back is in flight: still mapped, so they count against the limit.
    evicting: usize,
    max_resident: usize,
    policy: Policy,
    fifo: VecDeque<u32>,
    ring: Vec<u32>,
    free_slots: Vec<u32>,
    hand: usize,
}

impl ExCache {
    /// A cache for `pages` guest pages holding at most `limit` of them.
    pub fn new(pages: usize, limit: usize, policy: Policy) -> Self {
        assert!(limit > 0, "an ExCache holds at least one page");
        let ring = match policy {
            Policy::Clock => vec![EMPTY; limit],
            Policy::Fifo => Vec::new(),
        };
        let free_slots = match policy {
            Policy::Clock => (0..limit as u32).rev().collect(),
            Policy::Fifo => Vec::new(),
        };
        Self {
            state: vec![0; pages],
            limit,
            resident: 0,
            evicting: 0,
            max_resident: 0,
            policy,
            fifo: VecDeque::with_capacity(limit),
            ring,
            free_slots,
            hand: 0,
        }
    }

    pub fn pages(&self) -> usize {
        self.state.len()
    }
    pub fn limit(&self) -> usize {
        self.limit
    }
    pub fn resident(&self) -> usize {
        self.resident
    }
    pub fn max_resident(&self) -> usize {
        self.max_resident
    }
    /// Victims whose write-back is still in flight (mapped, counted against the limit).
    pub fn evicting(&self) -> usize {
        self.evicting
    }
    pub fn is_resident(&self, page: u32) -> bool {
        self.state[page as usize] & RESIDENT != 0
    }
    /// The page is mapped: resident, or a victim whose write-back is in flight.
    pub fn is_present(&self, page: u32) -> bool {
        self.state[page as usize] & (RESIDENT | EVICTING) != 0
    }
    pub fn is_evicting(&self, page: u32) -> bool {
        self.state[page as usize] & EVICTING != 0
    }
    pub fn is_dirty(&self, page: u32) -> bool {
        self.state[page as usize] & DIRTY != 0
    }
    /// The server holds this page's latest content (else it was never written back: zero).
    pub fn on_server(&self, page: u32) -> bool {
        self.state[page as usize] & ON_SERVER != 0
    }

    /// Marks every page as held by the server: guest RAM taken over from another VMM (a
    /// restore), whose pages were all written back there. Faults then fetch instead of
    /// zero-filling (a page never written comes back as zeros from the server).
    pub fn assume_all_on_server(&mut self) {
        for s in &mut self.state {
            *s |= ON_SERVER;
        }
    }

    /// How many pages must be evicted before `incoming` more can be installed.
    pub fn room_needed(&self, incoming: usize) -> usize {
        (self.resident + self.evicting + incoming).saturating_sub(self.limit)
    }

    /// Pages that can be installed now without evicting.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.resident + self.evicting)
    }

    /// Records a newly installed page.
    pub fn insert(&mut self, page: u32, dirty: bool) {
        let s = &mut self.state[page as usize];
        assert!(*s & RESIDENT == 0, "page {page} installed twice");
        assert!(*s & EVICTING == 0, "page {page} installed while mapped");
        assert!(
            self.resident + self.evicting < self.limit,
            "ExCache over its limit"
        );
        *s |= RESIDENT | REFERENCED | if dirty { DIRTY } else { 0 };
        self.resident += 1;
        self.max_resident = self.max_resident.max(self.resident + self.evicting);
        match self.policy {
            Policy::Fifo => self.fifo.push_back(page),
            Policy::Clock => {
                let slot = self
                    .free_slots
                    .pop()
                    .expect("a free slot while under the limit");
                self.ring[slot as usize] = page;
            }
        }
    }

    /// The guest wrote a resident page.
    pub fn mark_dirty(&mut self, page: u32) {
        self.state[page as usize] |= DIRTY | REFERENCED;
    }

    /// Changes the capacity to `limit` pages, which must hold what is resident now (the fault
    /// server shrinks by evicting first, batch by batch).
    pub fn set_limit(&mut self, limit: usize) {
        assert!(
            limit > 0 && limit >= self.resident + self.evicting,
            "ExCache limit {limit} below its {} mapped pages",
            self.resident + self.evicting
        );
        if self.policy == Policy::Clock && limit > self.ring.len() {
            let old = self.ring.len();
            self.ring.resize(limit, EMPTY);
            self.free_slots.extend(old as u32..limit as u32);
        }
        self.limit = limit;
    }

    /// A dirty page's content was written to the server and the page write-protected again.
    pub fn mark_clean(&mut self, page: u32) {
        let s = &mut self.state[page as usize];
        if *s & (RESIDENT | DIRTY) == RESIDENT | DIRTY {
            *s = (*s & !DIRTY) | ON_SERVER;
        }
    }

    /// Resident pages whose content is newer than the server's, in page order.
    pub fn dirty_resident(&self) -> Vec<u32> {
        (0..self.state.len() as u32)
            .filter(|p| self.state[*p as usize] & (RESIDENT | DIRTY) == RESIDENT | DIRTY)
            .collect()
    }

    /// Chooses `n` victims and forgets them as resident. A dirty victim's content is on the
    /// server once the caller has written it back, which it must do before dropping the page.
    pub fn evict(&mut self, n: usize) -> Vec<Victim> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n && self.resident > 0 {
            let page = match self.policy {
                Policy::Fifo => self.fifo.pop_front().expect("resident pages are queued"),
                Policy::Clock => self.clock_victim(),
            };
            let s = &mut self.state[page as usize];
            let dirty = *s & DIRTY != 0;
            *s &= !(RESIDENT | DIRTY | REFERENCED);
            if dirty {
                *s |= ON_SERVER;
            }
            self.resident -= 1;
            out.push(Victim { page, dirty });
        }
        out
    }

    /// Chooses up to `n` victims as [`ExCache::evict`] does, but a dirty victim stays mapped,
    /// marked evicting, until [`ExCache::written_back`] says its write-back landed.
    pub fn evict_async(&mut self, n: usize) -> Vec<Victim> {
        let out = self.evict(n);
        for v in out.iter().filter(|v| v.dirty) {
            self.state[v.page as usize] |= EVICTING;
            self.evicting += 1;
        }
        out
    }

    /// The guest wrote an evicting page: its write-back in flight is stale, so the page must be
    /// sent again before it may be dropped. True if the page was evicting.
    pub fn redirty(&mut self, page: u32) -> bool {
        let s = &mut self.state[page as usize];
        if *s & EVICTING == 0 {
            return false;
        }
        *s |= REDIRTY;
        true
    }

    /// The write-back of an evicting page was acknowledged: true if the page may now be dropped
    /// (no longer evicting), false if the guest wrote it meanwhile and it must be sent again.
    pub fn written_back(&mut self, page: u32) -> bool {
        let s = &mut self.state[page as usize];
        assert!(
            *s & EVICTING != 0,
            "page {page} written back but not evicting"
        );
        if *s & REDIRTY != 0 {
            *s &= !REDIRTY;
            return false;
        }
        *s &= !EVICTING;
        self.evicting -= 1;
        true
    }

    fn clock_victim(&mut self) -> u32 {
        loop {
            let slot = self.hand;
            self.hand = (self.hand + 1) % self.ring.len();
            let page = self.ring[slot];
            if page == EMPTY {
                continue;
            }
            let s = &mut self.state[page as usize];
            if *s & REFERENCED != 0 {
                *s &= !REFERENCED;
                continue;
            }
            self.ring[slot] = EMPTY;
            self.free_slots.push(slot as u32);
            return page;
        }
    }
}

/// Runs of consecutive pages in a sorted list, as (first page, length).
pub fn runs(sorted: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &p in sorted {
        match out.last_mut() {
            Some((start, len)) if *start + *len == p => *len += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// Detects sequential and strided fault streams and sizes a prefetch window for them:
/// the window doubles each time the stream continues right after the last prefetched page,
/// and collapses when the stream breaks.
pub struct Prefetcher {
    last: Option<i64>,
    stride: i64,
    expect: Option<i64>,
    window: u32,
    pending: u32,
    min: u32,
    max: u32,
}

/// Pages to fetch beside a fault: `count` pages at `first`, `first + stride`, ...
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefetch {
    pub first: i64,
    pub stride: i64,
    pub count: u32,
    /// Pages of the previous window the stream went through (prefetches that were used).
    pub used: u32,
}

impl Prefetcher {
    pub fn new(min: u32, max: u32) -> Self {
        Self {
            last: None,
            stride: 0,
            expect: None,
            window: min,
            pending: 0,
            min,
            max,
        }
    }

    /// Called on each missing-page fault; returns what to prefetch with it.
    pub fn on_fault(&mut self, page: i64) -> Prefetch {
        let mut used = 0;
        let streaming = if self.expect == Some(page) {
            used = self.pending;
            self.window = (self.window.saturating_mul(2)).clamp(self.min, self.max);
            true
        } else if self.stride != 0 && self.last.is_some_and(|l| page - l == self.stride) {
            true
        } else {
            self.stride = self.last.map_or(0, |l| page - l);
            self.window = self.min;
            false
        };
        self.last = Some(page);
        if !streaming || self.max == 0 {
            self.expect = None;
            self.pending = 0;
            return Prefetch {
                first: page,
                stride: self.stride,
                count: 0,
                used,
            };
        }
        let count = self.window;
        self.pending = count;
        self.expect = Some(page + self.stride * (i64::from(count) + 1));
        Prefetch {
            first: page + self.stride,
            stride: self.stride,
            count,
            used,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_evicts_in_insertion_order_and_tracks_dirt() {
        let mut c = ExCache::new(10, 3, Policy::Fifo);
        c.insert(4, false);
        c.insert(1, true);
        c.insert(7, false);
        assert_eq!(c.room_needed(1), 1);
        assert_eq!(
            c.evict(2),
            vec![
                Victim {
                    page: 4,
                    dirty: false
                },
                Victim {
                    page: 1,
                    dirty: true
                }
            ]
        );
        assert!(!c.is_resident(1) && c.on_server(1));
        assert!(!c.on_server(4), "a clean never-written page stays zero");
        assert_eq!((c.resident(), c.max_resident()), (1, 3));
    }

    #[test]
    fn clock_gives_referenced_pages_a_second_chance() {
        let mut c = ExCache::new(10, 3, Policy::Clock);
        for p in [0, 1, 2] {
            c.insert(p, false);
        }
        // First sweep clears every reference bit, then 0 goes.
        assert_eq!(c.evict(1)[0].page, 0);
        c.insert(3, false);
        c.mark_dirty(1); // 1 is written: referenced again
        let v = c.evict(1)[0];
        assert_eq!(
            v,
            Victim {
                page: 2,
                dirty: false
            }
        );
        c.insert(4, false);
        let v = c.evict(1)[0];
        assert_eq!(
            v,
            Victim {
                page: 1,
                dirty: true
            },
            "1's second chance is used up"
        );
    }

    #[test]
    fn never_exceeds_limit_under_random_churn() {
        for policy in [Policy::Fifo, Policy::Clock] {
            let mut c = ExCache::new(1000, 64, policy);
            let mut x = 12345u64;
            for _ in 0..20_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = (x % 1000) as u32;
                if c.is_resident(p) {
                    if x & 1 == 0 {
                        c.mark_dirty(p);
                    }
                    continue;
                }
                let n = c.room_needed(1);
                assert_eq!(c.evict(n).len(), n);
                c.insert(p, x & 2 == 0);
                assert!(c.resident() <= 64);
            }
            assert_eq!(c.max_resident(), 64);
        }
    }

    #[test]
    fn runs_merge_consecutive_pages() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        assert_eq!(runs(&[]), vec![]);
    }

    #[test]
    fn sequential_stream_grows_the_window() {
        let mut p = Prefetcher::new(4, 64);
        assert_eq!(p.on_fault(100).count, 0);
        assert_eq!(p.on_fault(101).count, 0, "one step is not a stream yet");
        let a = p.on_fault(102);
        assert_eq!((a.first, a.stride, a.count), (103, 1, 4));
        let b = p.on_fault(107);
        assert_eq!((b.first, b.count, b.used), (108, 8, 4));
        let c = p.on_fault(116);
        assert_eq!((c.count, c.used), (16, 8));
    }

    #[test]
    fn strided_and_broken_streams() {
        let mut p = Prefetcher::new(2, 8);
        p.on_fault(0);
        p.on_fault(10);
        let a = p.on_fault(20);
        assert_eq!((a.first, a.stride, a.count), (30, 10, 2));
        let b = p.on_fault(5);
        assert_eq!(b.count, 0);
        let c = p.on_fault(5000);
        assert_eq!(c.count, 0);
    }

    #[test]
    fn disabled_prefetch_never_fetches() {
        let mut p = Prefetcher::new(0, 0);
        for i in 0..10 {
            assert_eq!(p.on_fault(i).count, 0);
        }
    }

    #[test]
    fn limit_grows_and_shrinks_with_both_policies() {
        for policy in [Policy::Fifo, Policy::Clock] {
            let mut c = ExCache::new(64, 4, policy);
            for p in 0..4 {
                c.insert(p, p % 2 == 0);
            }
            c.set_limit(8);
            for p in 4..8 {
                c.insert(p, false);
            }
            assert_eq!(c.room_needed(1), 1);
            assert_eq!(c.evict(6).len(), 6);
            c.set_limit(2);
            assert_eq!(c.room_needed(1), 1);
            assert_eq!(c.evict(1).len(), 1);
            c.insert(9, true);
            assert_eq!((c.resident(), c.limit()), (2, 2));
        }
    }

    #[test]
    fn evicting_pages_count_against_the_limit_until_written_back() {
        let mut c = ExCache::new(16, 4, Policy::Fifo);
        for p in 0..4 {
            c.insert(p, p != 1);
        }
        let v = c.evict_async(2);
        assert_eq!(v.iter().map(|v| v.page).collect::<Vec<_>>(), vec![0, 1]);
        // 0 is dirty and stays mapped; 1 was clean and is gone at once.
        assert!(c.is_present(0) && c.is_evicting(0) && !c.is_resident(0));
        assert!(!c.is_present(1));
        assert_eq!((c.resident(), c.evicting(), c.room()), (2, 1, 1));
        assert_eq!(c.room_needed(2), 1);
        // Written during its write-back: sent again, not dropped.
        assert!(c.redirty(0));
        assert!(!c.redirty(1), "a dropped page is not evicting");
        assert!(!c.written_back(0));
        assert!(c.is_evicting(0));
        assert!(c.written_back(0));
        assert!(!c.is_present(0) && c.on_server(0));
        assert_eq!((c.evicting(), c.room()), (0, 2));
        c.insert(0, false);
        c.insert(1, false);
        assert_eq!(c.max_resident(), 4);
    }

    #[test]
    fn flushed_pages_are_clean_and_on_the_server() {
        let mut c = ExCache::new(16, 8, Policy::Clock);
        c.insert(3, true);
        c.insert(5, false);
        c.mark_dirty(5);
        c.insert(7, false);
        assert_eq!(c.dirty_resident(), vec![3, 5]);
        c.mark_clean(3);
        c.mark_clean(7);
        assert_eq!(c.dirty_resident(), vec![5]);
        assert!(c.on_server(3) && !c.on_server(7));
        assert!(c.is_resident(3) && !c.is_dirty(3));
    }
}
