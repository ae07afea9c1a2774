//! The fault server: one named thread that serves every userfaultfd fault on guest RAM, from any
//! thread (vCPUs, device threads, the loader). Missing pages are fetched from the `PageSource`
//! (with a prefetch window on streams) or zero-filled locally when never written; installs are
//! write-protected so the first write is seen and the page marked dirty; when the ExCache is full,
//! victims are evicted (dirty ones write-protected, written back, then dropped). This thread never
//! touches a page that is not resident, so it never faults itself.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde_json::json;
use userfaultfd::EventBuffer;
use vmm_sys_util::eventfd::EventFd;
use vnode_common::metrics::LatencyHistogram;

use super::excache::{runs, ExCache, Prefetcher};
use super::source::{PageSource, SourceError, MAX_BATCH};
use super::uffd::{Fault, GuestUffd, UffdError, PAGE};
use crate::devices::{StopReason, StopSignal};
use crate::metrics::Counter;

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("fault at {0:#x} is outside guest RAM")]
    Outside(usize),
}

/// The ExCache's counters. `hits` counts faults avoided by prefetching (reads of resident pages
/// do not reach userspace, so they cannot be counted).
#[derive(Default)]
pub struct ExCacheStats {
    pub faults: Counter,
    pub wp_faults: Counter,
    pub zero_fills: Counter,
    pub fetched: Counter,
    pub evictions: Counter,
    pub writebacks: Counter,
    pub prefetched: Counter,
    pub prefetch_used: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub max_resident_pages: Counter,
    pub limit_pages: Counter,
    /// Where the fault thread's time goes, in nanoseconds (reported in microseconds).
    pub time: PhaseTimes,
    /// Service time of every missing-page fault, and of those whose page came from the source
    /// (the others are zero-filled here: no round trip, whatever the source). Lock-free, so
    /// recording costs the fault path two atomic adds.
    pub latency_us: LatencyHistogram,
    pub fetch_latency_us: LatencyHistogram,
}

/// The fault thread's time by phase: serving faults in all, and within that fetching pages from
/// the source, installing them (UFFDIO_COPY), waking the thread that faulted (UFFDIO_WAKE),
/// write-protecting dirty victims, writing them back (copy out and send), and dropping victims
/// (MADV_DONTNEED). The rest of `serve` is bookkeeping and WP-fault handling.
#[derive(Default)]
pub struct PhaseTimes {
    pub serve: Counter,
    pub fetch: Counter,
    pub install: Counter,
    pub wake: Counter,
    pub protect: Counter,
    pub writeback: Counter,
    pub drop: Counter,
}

impl PhaseTimes {
    fn to_json(&self) -> serde_json::Value {
        let us = |c: &Counter| c.get() / 1000;
        json!({
            "serve": us(&self.serve),
            "fetch": us(&self.fetch),
            "install": us(&self.install),
            "wake": us(&self.wake),
            "protect": us(&self.protect),
            "writeback": us(&self.writeback),
            "drop": us(&self.drop),
        })
    }
}

/// Runs `f`, adding its duration in nanoseconds to `c`.
fn timed<T>(c: &Counter, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    c.add(t.elapsed().as_nanos() as u64);
    r
}

/// Pages evicted at once when the ExCache is full (at most an eighth of its capacity).
const EVICT_BATCH: usize = 32;
/// A fault thread that has served nothing for this long pings its memory servers, well
/// inside vnode-memd's default 15-minute idle timeout.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);

impl ExCacheStats {
    /// All counters as JSON, with fault service latency p50/p99 in microseconds.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "faults": self.faults.get(),
            "wp_faults": self.wp_faults.get(),
            "hits": self.prefetch_used.get(),
            "zero_fills": self.zero_fills.get(),
            "fetched": self.fetched.get(),
            "evictions": self.evictions.get(),
            "writebacks": self.writebacks.get(),
            "prefetched": self.prefetched.get(),
            "prefetch_used": self.prefetch_used.get(),
            "bytes_in": self.bytes_in.get(),
            "bytes_out": self.bytes_out.get(),
            "fault_p50_us": self.latency_us.percentile_us(0.5),
            "fault_p99_us": self.latency_us.percentile_us(0.99),
            "fetch_fault_p50_us": self.fetch_latency_us.percentile_us(0.5),
            "fetch_fault_p99_us": self.fetch_latency_us.percentile_us(0.99),
            "max_resident_pages": self.max_resident_pages.get(),
            "limit_pages": self.limit_pages.get(),
            "time_us": self.time.to_json(),
            "replication": super::source::replication_json(),
        })
    }
}

/// The running VM's ExCache counters, if it has an ExCache.
pub static EXCACHE_STATS: OnceLock<Arc<ExCacheStats>> = OnceLock::new();

pub struct FaultServer {
    uffd: GuestUffd,
    base: usize,
    cache: ExCache,
    prefetcher: Prefetcher,
    source: Box<dyn PageSource>,
    stats: Arc<ExCacheStats>,
    zero: Vec<u8>,
    buf: Vec<u8>,
    wb_buf: Vec<u8>,
    spin: bool,
}

impl FaultServer {
    pub fn new(
        uffd: GuestUffd,
        base: *mut u8,
        cache: ExCache,
        prefetcher: Prefetcher,
        source: Box<dyn PageSource>,
        stats: Arc<ExCacheStats>,
    ) -> Self {
        stats.limit_pages.add(cache.limit() as u64);
        Self {
            uffd,
            base: base as usize,
            cache,
            prefetcher,
            source,
            stats,
            zero: vec![0; PAGE],
            buf: vec![0; MAX_BATCH * PAGE],
            wb_buf: vec![0; MAX_BATCH * PAGE],
            spin: false,
        }
    }

    /// Busy-poll for faults instead of sleeping in poll().
    pub fn with_spin(mut self, spin: bool) -> Self {
        self.spin = spin;
        self
    }

    /// Serves faults until `stop_evt` is written or an error ends the VM.
    pub fn run(mut self, stop_evt: EventFd, vm_stop: StopSignal) {
        let mut events = EventBuffer::new(64);
        let mut faults = Vec::with_capacity(64);
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: std::os::unix::io::AsRawFd::as_raw_fd(&stop_evt),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut last_activity = std::time::Instant::now();
        loop {
            // Spinning polls without sleeping (timeout 0): it saves the wake-up of a sleeping
            // thread on every fault at the price of a busy core. A sleeping poll wakes every
            // KEEPALIVE to keep the servers' connections alive through a quiet guest.
            let timeout = if self.spin {
                0
            } else {
                KEEPALIVE.as_millis() as libc::c_int
            };
            // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if r < 0 {
                continue; // EINTR
            }
            if r > 0 {
                last_activity = std::time::Instant::now();
            } else if last_activity.elapsed() >= KEEPALIVE {
                last_activity = std::time::Instant::now();
                if let Err(e) = self.source.keepalive() {
                    let msg = format!("guest memory from {}: {e}", self.source.describe());
                    tracing::error!("{msg}");
                    vm_stop.stop(StopReason::Fatal(msg));
                    return;
                }
            }
            if fds[1].revents != 0 {
                // The VM has stopped: its guest RAM is garbage now, so give it back.
                if let Err(e) = self.source.release() {
                    tracing::warn!("cannot free guest RAM on {}: {e}", self.source.describe());
                }
                return;
            }
            if r == 0 {
                std::hint::spin_loop();
                continue;
            }
            let result = self
                .uffd
                .read_faults(&mut events, &mut faults)
                .map_err(FaultError::from)
                .and_then(|_| faults.iter().try_for_each(|f| self.serve(*f)));
            if let Err(e) = result {
                let msg = format!("guest memory from {}: {e}", self.source.describe());
                tracing::error!("{msg}");
                vm_stop.stop(StopReason::Fatal(msg));
                return;
            }
        }
    }

    fn page_of(&self, addr: usize) -> Result<u32, FaultError> {
        let off = addr
            .checked_sub(self.base)
            .ok_or(FaultError::Outside(addr))?;
        let page = off / PAGE;
        if page >= self.cache.pages() {
            return Err(FaultError::Outside(addr));
        }
        Ok(page as u32)
    }

    fn addr_of(&self, page: u32) -> usize {
        self.base + page as usize * PAGE
    }

    fn serve(&mut self, fault: Fault) -> Result<(), FaultError> {
        let start = Instant::now();
        match fault {
            Fault::WriteProtect { addr } => {
                let page = self.page_of(addr)?;
                self.stats.wp_faults.inc();
                if self.cache.is_resident(page) {
                    self.cache.mark_dirty(page);
                    self.uffd.unprotect(addr, PAGE)?;
                } else {
                    // Evicted since the fault was raised: the writer retries and faults as missing.
                    self.uffd.wake(addr, PAGE)?;
                }
            }
            Fault::Missing { addr, write } => {
                let page = self.page_of(addr)?;
                if self.cache.is_resident(page) {
                    self.uffd.wake(addr, PAGE)?; // installed by a prefetch or an earlier event
                    return Ok(());
                }
                self.stats.faults.inc();
                let fetched = self.cache.on_server(page);
                self.fill(page, write)?;
                if fetched {
                    self.stats.fetch_latency_us.record(start.elapsed());
                }
            }
        }
        let took = start.elapsed();
        self.stats.time.serve.add(took.as_nanos() as u64);
        self.stats.latency_us.record(took);
        Ok(())
    }

    /// Installs `page` (and a prefetch window on a stream), evicting first if the cache is full.
    fn fill(&mut self, page: u32, write: bool) -> Result<(), FaultError> {
        let plan = self.prefetcher.on_fault(i64::from(page));
        self.stats.prefetch_used.add(u64::from(plan.used));
        let max_extra = (self.cache.limit() / 4).min(MAX_BATCH - 1);
        let mut extra: Vec<u32> = (0..i64::from(plan.count))
            .map(|k| plan.first + k * plan.stride)
            .take_while(|p| *p >= 0 && (*p as usize) < self.cache.pages())
            .map(|p| p as u32)
            .filter(|p| !self.cache.is_resident(*p))
            .take(max_extra)
            .collect();
        extra.dedup();
        self.make_room(1 + extra.len())?;

        // Fetch what the server holds, in one batch: the faulting page first.
        let fetch: Vec<u64> = std::iter::once(page)
            .chain(extra.iter().copied())
            .filter(|p| self.cache.on_server(*p))
            .map(u64::from)
            .collect();
        if !fetch.is_empty() {
            let buf = &mut self.buf[..fetch.len() * PAGE];
            timed(&self.stats.time.fetch, || {
                self.source.read_pages(&fetch, buf)
            })?;
            self.stats.fetched.add(fetch.len() as u64);
            self.stats.bytes_in.add((fetch.len() * PAGE) as u64);
        }
        // Prefetched pages inherit the fault's intent: a write stream gets them writable.
        let mut next = 0;
        for (i, p) in std::iter::once(page)
            .chain(extra.iter().copied())
            .enumerate()
        {
            let src = if self.cache.on_server(p) {
                next += 1;
                self.buf[(next - 1) * PAGE..].as_ptr()
            } else {
                self.stats.zero_fills.inc();
                self.zero.as_ptr()
            };
            let dst = self.addr_of(p);
            let t = Instant::now();
            // SAFETY: `src` points at a full page inside `buf` or `zero`; the destination is a
            // page of the registered guest RAM. No wake-up here: it is timed apart below.
            let installed = unsafe { self.uffd.copy_page(dst, src, !write, false) };
            self.stats.time.install.add(t.elapsed().as_nanos() as u64);
            if i == 0 && matches!(installed, Ok(true)) {
                timed(&self.stats.time.wake, || self.uffd.wake(dst, PAGE))?;
            }
            let installed = installed?;
            if installed {
                self.cache.insert(p, write);
            } else {
                // Already present although the cache did not know it: track it, and take it for
                // dirty, so eviction writes it back rather than losing what it holds.
                tracing::warn!(page = p, "page was already present when installing it");
                self.cache.insert(p, true);
                if i == 0 {
                    self.uffd.wake(self.addr_of(p), PAGE)?;
                }
            }
            if i > 0 {
                self.stats.prefetched.inc();
            }
        }
        self.stats.max_resident_pages.add(
            (self.cache.max_resident() as u64).saturating_sub(self.stats.max_resident_pages.get()),
        );
        Ok(())
    }

    /// Evicts until `incoming` pages fit: dirty victims are write-protected, written back in
    /// batches, and only then dropped, so a page's latest content is always somewhere.
    fn make_room(&mut self, incoming: usize) -> Result<(), FaultError> {
        let needed = self.cache.room_needed(incoming);
        if needed == 0 {
            return Ok(());
        }
        // Evict a batch at a time: contiguous victims (FIFO on a stream) then cost one
        // write-protect and one MADV_DONTNEED per run instead of per page, and each of those
        // makes KVM zap its own mappings of the range.
        let victims = self
            .cache
            .evict(needed.max(EVICT_BATCH.min(self.cache.limit() / 8)));
        self.stats.evictions.add(victims.len() as u64);
        let mut dirty: Vec<u32> = victims.iter().filter(|v| v.dirty).map(|v| v.page).collect();
        dirty.sort_unstable();
        for chunk in dirty.chunks(MAX_BATCH) {
            let t = Instant::now();
            for (start, len) in runs(chunk) {
                self.uffd
                    .protect(self.addr_of(start), len as usize * PAGE)?;
            }
            let t = {
                let now = Instant::now();
                self.stats.time.protect.add((now - t).as_nanos() as u64);
                now
            };
            for (i, p) in chunk.iter().enumerate() {
                let addr = self.addr_of(*p);
                // SAFETY: the page is resident (it was until this eviction, and only this thread
                // drops pages) and write-protected, so reading it neither faults nor races a writer.
                let page = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE) };
                self.wb_buf[i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
            }
            let pages: Vec<u64> = chunk.iter().map(|p| u64::from(*p)).collect();
            self.source
                .write_pages(&pages, &self.wb_buf[..chunk.len() * PAGE])?;
            self.stats.time.writeback.add(t.elapsed().as_nanos() as u64);
            self.stats.writebacks.add(chunk.len() as u64);
            self.stats.bytes_out.add((chunk.len() * PAGE) as u64);
        }
        let mut all: Vec<u32> = victims.iter().map(|v| v.page).collect();
        all.sort_unstable();
        let ranges: Vec<(usize, usize)> = runs(&all)
            .into_iter()
            .map(|(start, len)| (self.addr_of(start), len as usize * PAGE))
            .collect();
        timed(&self.stats.time.drop, || self.uffd.drop_ranges(&ranges))?;
        Ok(())
    }
}
