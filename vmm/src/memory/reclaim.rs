//! The reclaimer: eviction off the fault path. Between rounds of faults, the fault thread keeps the
//! ExCache's free room between a low and a high watermark: it chooses victims a batch at a time,
//! drops the clean ones at once, write-protects the dirty ones, copies them out and sends them to
//! the page source without waiting, with several batches in flight on the connection. A batch's
//! pages are dropped only once the source has acknowledged it; until then they stay mapped
//! (evicting), so the guest reads them without a fault. A guest write to an evicting page is
//! caught by its write protection: the page is unprotected, marked re-dirtied, and sent again
//! after its batch lands instead of being dropped. So a page's latest content is always mapped
//! here or stored on the servers.
//!
//! The fault path evicts only when the reclaimer fell behind: it first waits for batches in
//! flight, then evicts synchronously as before.

use super::{FaultError, FaultServer};
use crate::memory::excache::runs;
use crate::memory::source::WriteToken;
use crate::memory::stats::timed;
use crate::memory::uffd::PAGE;

/// Pages per write-back batch (one request to the memory server).
const RECLAIM_BATCH: usize = 256;
/// Write-back batches in flight at most.
const MAX_INFLIGHT: usize = 8;
/// The high watermark's largest value in pages: free room the reclaimer works towards.
const HIGH_MAX: usize = 2048;

/// Dirty victims written back together, awaiting the source's acknowledgement.
pub(super) struct Batch {
    token: WriteToken,
    /// Sorted page numbers.
    pages: Vec<u64>,
    data: Vec<u8>,
}

/// The watermarks for an ExCache of `limit` pages, as (low, high) free pages: below low the
/// reclaimer completes write-backs to free room; below high it sends more.
fn watermarks(limit: usize) -> (usize, usize) {
    let high = (limit / 16).clamp(1, HIGH_MAX);
    (high / 2, high)
}

impl FaultServer {
    /// Write-backs in flight or waiting to be sent again.
    pub(super) fn reclaim_pending(&self) -> bool {
        !self.inflight.is_empty() || !self.resend.is_empty()
    }

    /// One step of reclaim between rounds of faults (`idle`: none came this round): collects
    /// acknowledged batches when the pipeline is full, room is short or there is nothing else to
    /// do, then sends batches until the room after them reaches the high watermark.
    pub(super) fn reclaim(&mut self, idle: bool) -> Result<(), FaultError> {
        if !self.reclaimer {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let (low, high) = watermarks(self.cache.limit());
        if !self.inflight.is_empty()
            && (idle || self.inflight.len() >= MAX_INFLIGHT || self.cache.room() < low)
        {
            self.complete_oldest()?;
            while self.cache.room() < low && !self.inflight.is_empty() {
                self.complete_oldest()?;
            }
        }
        while self.inflight.len() < MAX_INFLIGHT {
            let after = self.cache.limit().saturating_sub(self.cache.resident());
            let fresh = high.saturating_sub(after);
            if fresh == 0 && self.resend.is_empty() {
                break;
            }
            if !self.submit_batch(fresh.min(RECLAIM_BATCH))? {
                break;
            }
        }
        self.stats.time.reclaim.add(t.elapsed().as_nanos() as u64);
        Ok(())
    }

    /// Lands every write-back in flight and every page to send again.
    pub(super) fn finish_reclaim(&mut self) -> Result<(), FaultError> {
        while self.reclaim_pending() {
            if self.inflight.is_empty() {
                self.submit_batch(0)?;
            } else {
                self.complete_oldest()?;
            }
        }
        Ok(())
    }

    /// Chooses up to `fresh` victims, drops the clean ones and sends the dirty ones, with the
    /// pages to send again, as one batch. False when there was nothing to do.
    fn submit_batch(&mut self, fresh: usize) -> Result<bool, FaultError> {
        let take = self.resend.len().min(RECLAIM_BATCH);
        let mut pages: Vec<u32> = self.resend.drain(..take).collect();
        let victims = self
            .cache
            .evict_async(fresh.min(RECLAIM_BATCH - pages.len()));
        if pages.is_empty() && victims.is_empty() {
            return Ok(false);
        }
        self.stats.evictions.add(victims.len() as u64);
        let mut clean: Vec<u32> = Vec::new();
        for v in &victims {
            if v.dirty {
                pages.push(v.page);
            } else {
                clean.push(v.page);
            }
        }
        clean.sort_unstable();
        self.drop_pages(&clean)?;
        if pages.is_empty() {
            self.note_residency();
            return Ok(true);
        }
        pages.sort_unstable();
        let t = std::time::Instant::now();
        for (start, len) in runs(&pages) {
            self.uffd
                .protect(self.addr_of(start), len as usize * PAGE)?;
        }
        self.stats.time.protect.add(t.elapsed().as_nanos() as u64);
        let t = std::time::Instant::now();
        let mut data = self.spare.pop().unwrap_or_default();
        data.resize(pages.len() * PAGE, 0);
        for (i, p) in pages.iter().enumerate() {
            let addr = self.addr_of(*p);
            // SAFETY: the page is mapped (evicting pages are dropped only by this thread, after
            // their batch is acknowledged) and write-protected, so reading it neither faults nor
            // races a writer.
            let page = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE) };
            data[i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
        }
        let pages: Vec<u64> = pages.into_iter().map(u64::from).collect();
        let token = self.source.submit_write(&pages, &data)?;
        self.stats.time.writeback.add(t.elapsed().as_nanos() as u64);
        self.inflight.push_back(Batch { token, pages, data });
        self.note_residency();
        Ok(true)
    }

    /// Waits for the oldest batch in flight, then drops its pages but those written meanwhile,
    /// which wait to be sent again.
    pub(super) fn complete_oldest(&mut self) -> Result<(), FaultError> {
        let Some(b) = self.inflight.pop_front() else {
            return Ok(());
        };
        let token = b.token;
        let (pages, data) = (b.pages, b.data);
        timed(&self.stats.time.writeback, || {
            self.source.complete_write(token, &pages, &data)
        })?;
        self.stats.writebacks.add(pages.len() as u64);
        self.stats.bytes_out.add((pages.len() * PAGE) as u64);
        let mut gone = Vec::with_capacity(pages.len());
        for p in pages {
            let p = p as u32;
            if self.cache.written_back(p) {
                gone.push(p);
            } else {
                self.resend.push(p);
            }
        }
        self.drop_pages(&gone)?;
        self.spare.push(data);
        self.note_residency();
        Ok(())
    }

    /// Drops `sorted` pages from guest RAM (their content is on the servers, or zero).
    fn drop_pages(&mut self, sorted: &[u32]) -> Result<(), FaultError> {
        if sorted.is_empty() {
            return Ok(());
        }
        let ranges: Vec<(usize, usize)> = runs(sorted)
            .into_iter()
            .map(|(start, len)| (self.addr_of(start), len as usize * PAGE))
            .collect();
        timed(&self.stats.time.drop, || self.uffd.drop_ranges(&ranges))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermarks_leave_room_and_stay_ordered() {
        assert_eq!(watermarks(256), (8, 16));
        assert_eq!(watermarks(65_536), (1024, 2048));
        assert_eq!(watermarks(1 << 22), (1024, 2048));
        assert_eq!(watermarks(1), (0, 1));
    }
}
