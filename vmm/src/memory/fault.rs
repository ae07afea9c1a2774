//! The fault server: one named thread that serves every userfaultfd fault on guest RAM, from any
//! thread (vCPUs, device threads, the loader). Missing pages are fetched from the `PageSource`
//! (with a prefetch window on streams) or zero-filled locally when never written; installs are
//! write-protected so the first write is seen and the page marked dirty. Eviction runs beside the
//! faults, between them (`reclaim.rs`): it keeps free room between two watermarks with write-backs
//! in flight, so a fault normally only fetches, installs and wakes. When the ExCache is full anyway,
//! a fault evicts first (dirty victims write-protected, written back, then dropped). This thread
//! never touches a page that is not mapped, so it never faults itself.

use std::collections::VecDeque;
use std::os::unix::io::AsRawFd;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use userfaultfd::EventBuffer;
use vmm_sys_util::eventfd::EventFd;

use remote_mem::Repair;

use super::excache::{runs, ExCache, Prefetcher};
use super::source::{PageSource, SourceError, MAX_BATCH};
use super::stats::{timed, ExCacheStats};
use super::uffd::{Fault, GuestUffd, UffdError, PAGE};
use crate::devices::{StopReason, StopSignal};
use reclaim::Batch;

#[path = "reclaim.rs"]
mod reclaim;

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("fault at {0:#x} is outside guest RAM")]
    Outside(usize),
}

/// Pages evicted at once when the ExCache is full (at most an eighth of its capacity).
const EVICT_BATCH: usize = 32;
/// A fault thread that has served nothing for this long pings its memory servers, well
/// inside vnode-memd's default 15-minute idle timeout.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(60);
/// Pages evicted per round of a background shrink, between rounds of faults.
const SHRINK_BATCH: usize = 1024;
/// Pages written back per call to the source (a shrink's round, or a flush).
const WRITEBACK_BATCH: usize = SHRINK_BATCH;

/// What the VM asks of its fault thread.
pub enum FaultCmd {
    /// The ExCache's new capacity in pages: growing raises the limit; shrinking evicts down to
    /// it in the background, batch by batch, so the guest sees only misses. Replies once the
    /// new limit is in force (a shrink has started).
    SetLimit(usize, Sender<()>),
    /// Write every dirty resident page back to the servers; the reply says how many.
    FlushDirty(Sender<Result<usize, String>>),
    /// Serve every fault already raised, then reply: after a pause, the faults the vCPUs left
    /// behind when they were kicked out of KVM_RUN are done before the pause returns.
    Drain(Sender<()>),
    /// Stop serving faults, freeing guest RAM's region on the servers or keeping it (a
    /// snapshot or migration hands it over).
    Stop { free_region: bool },
    /// A memory server a lost replica of guest RAM can be re-made on; the reply says whether
    /// it was taken (guest RAM must be replicated).
    AddSpare(String, Sender<Result<(), String>>),
}

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
    /// Whether the reclaimer runs between faults.
    reclaimer: bool,
    /// The capacity asked for; below `cache.limit()` while a shrink is under way.
    target: usize,
    /// Write-backs of evicting pages in flight, oldest first (`reclaim.rs`).
    inflight: VecDeque<Batch>,
    /// Evicting pages the guest wrote while their write-back was in flight: sent again.
    resend: Vec<u32>,
    /// Write-back buffers of completed batches, for the next ones.
    spare: Vec<Vec<u8>>,
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
        stats.limit_pages.set(cache.limit() as u64);
        let cache_limit = cache.limit();
        Self {
            uffd,
            base: base as usize,
            cache,
            prefetcher,
            source,
            stats,
            zero: vec![0; PAGE],
            buf: vec![0; MAX_BATCH * PAGE],
            wb_buf: vec![0; WRITEBACK_BATCH * PAGE],
            spin: false,
            reclaimer: true,
            target: cache_limit,
            inflight: VecDeque::new(),
            resend: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Evict between faults with write-backs in flight (else only on the fault path).
    pub fn with_reclaim(mut self, on: bool) -> Self {
        self.reclaimer = on;
        self
    }

    /// Busy-poll for faults instead of sleeping in poll().
    pub fn with_spin(mut self, spin: bool) -> Self {
        self.spin = spin;
        self
    }

    /// Serves faults and commands until a `Stop` command or an error ends the VM. `doorbell`
    /// is written after each command sent on `cmds`.
    pub fn run(mut self, cmds: Receiver<FaultCmd>, doorbell: EventFd, vm_stop: StopSignal) {
        if let Err(e) = self.serve_until_stopped(&cmds, &doorbell) {
            let msg = format!("guest memory from {}: {e}", self.source.describe());
            tracing::error!("{msg}");
            vm_stop.stop(StopReason::Fatal(msg));
        }
    }

    fn serve_until_stopped(
        &mut self,
        cmds: &Receiver<FaultCmd>,
        doorbell: &EventFd,
    ) -> Result<(), FaultError> {
        let mut events = EventBuffer::new(64);
        let mut faults = Vec::with_capacity(64);
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: doorbell.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut last_activity = Instant::now();
        let mut repair = Repair::Idle;
        loop {
            let shrinking = self.target < self.cache.limit();
            let reclaiming = self.reclaim_pending();
            let copying = repair == Repair::Busy;
            // Spinning polls without sleeping (timeout 0): it saves the wake-up of a sleeping
            // thread on every fault at the price of a busy core. A shrink, write-backs or a
            // re-replication in progress poll too, doing their work between rounds of faults. A
            // sleeping poll wakes every KEEPALIVE to keep the servers' connections alive through
            // a quiet guest, or sooner to free a failed server's stale copy.
            let timeout = if self.spin || shrinking || reclaiming || copying {
                0
            } else if let Repair::After(d) = repair {
                d.clamp(std::time::Duration::from_millis(1), KEEPALIVE)
                    .as_millis() as libc::c_int
            } else {
                KEEPALIVE.as_millis() as libc::c_int
            };
            // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if r < 0 {
                continue; // EINTR
            }
            if r > 0 || shrinking || reclaiming || copying {
                last_activity = Instant::now();
            } else if last_activity.elapsed() >= KEEPALIVE {
                last_activity = Instant::now();
                self.source.keepalive()?;
            }
            if fds[1].revents != 0 {
                let _ = doorbell.read();
                while let Ok(cmd) = cmds.try_recv() {
                    if self.command(cmd)? {
                        return Ok(());
                    }
                }
            }
            let faulted = fds[0].revents != 0;
            if faulted {
                self.uffd.read_faults(&mut events, &mut faults)?;
                for f in &faults {
                    self.serve(*f)?;
                }
            }
            self.reclaim(!faulted)?;
            if shrinking {
                self.shrink_step()?;
            } else if r == 0 {
                std::hint::spin_loop();
            }
            // Cheap when there is nothing to repair; a replica lost by any call above starts
            // its re-replication here.
            repair = self.repair_step(r == 0 && !shrinking)?;
        }
    }

    /// One step of re-replication (a batch of the pages the servers hold) or, when `idle`,
    /// of freeing a failed server's stale copy.
    fn repair_step(&mut self, idle: bool) -> Result<Repair, FaultError> {
        let cache = &self.cache;
        let pages = cache.pages() as u64;
        let held = |p: u64| p < pages && cache.on_server(p as u32);
        Ok(self.source.repair(&held, idle)?)
    }

    /// Carries out one command; true when the thread must end.
    fn command(&mut self, cmd: FaultCmd) -> Result<bool, FaultError> {
        match cmd {
            FaultCmd::SetLimit(pages, reply) => {
                self.target = pages.clamp(1, self.cache.pages());
                self.stats.limit_pages.set(self.target as u64);
                if self.target >= self.cache.resident() + self.cache.evicting() {
                    self.cache.set_limit(self.target);
                }
                tracing::info!(pages = self.target, "ExCache limit set");
                let _ = reply.send(());
            }
            FaultCmd::FlushDirty(reply) => {
                let r = self.flush_dirty();
                let _ = reply.send(r.as_ref().map(|n| *n).map_err(|e| e.to_string()));
                r?;
            }
            FaultCmd::AddSpare(addr, reply) => {
                let r = self.source.add_spare(&addr).map_err(|e| e.to_string());
                if r.is_ok() {
                    tracing::info!(server = %addr, "spare memory server added");
                }
                let _ = reply.send(r);
            }
            FaultCmd::Drain(reply) => {
                self.drain()?;
                let _ = reply.send(());
            }
            FaultCmd::Stop { free_region } => {
                // With `free_region` the guest is gone and its RAM garbage: give it back. A
                // hand-over (snapshot, migration) keeps it for the next owner, with every
                // write-back in flight landed.
                if !free_region {
                    if let Err(e) = self.finish_reclaim() {
                        tracing::warn!(
                            "cannot finish write-backs to {}: {e}",
                            self.source.describe()
                        );
                    }
                }
                if free_region {
                    if let Err(e) = self.source.release() {
                        tracing::warn!("cannot free guest RAM on {}: {e}", self.source.describe());
                    }
                }
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Serves the faults that are queued now, without waiting for more.
    fn drain(&mut self) -> Result<(), FaultError> {
        let mut events = EventBuffer::new(64);
        let mut faults = Vec::with_capacity(64);
        loop {
            let mut fd = libc::pollfd {
                fd: self.uffd.fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut fd, 1, 0) };
            if r <= 0 || fd.revents == 0 {
                return Ok(());
            }
            self.uffd.read_faults(&mut events, &mut faults)?;
            for f in &faults {
                self.serve(*f)?;
            }
        }
    }

    /// One batch of a shrink: evicts towards the target, and lowers the limit as it goes so
    /// faults meanwhile evict rather than grow the cache.
    fn shrink_step(&mut self) -> Result<(), FaultError> {
        self.finish_reclaim()?;
        let excess = self.cache.resident().saturating_sub(self.target);
        if excess > 0 {
            self.evict(excess.min(SHRINK_BATCH))?;
        }
        self.cache.set_limit(self.target.max(self.cache.resident()));
        self.note_residency();
        Ok(())
    }

    /// Writes every dirty resident page back to the source; they stay resident, clean and
    /// write-protected (the next write faults and marks them dirty again). Returns how many.
    fn flush_dirty(&mut self) -> Result<usize, FaultError> {
        self.finish_reclaim()?;
        let dirty = self.cache.dirty_resident();
        self.write_back(&dirty)?;
        for p in &dirty {
            self.cache.mark_clean(*p);
        }
        tracing::info!(pages = dirty.len(), "ExCache flushed");
        Ok(dirty.len())
    }

    fn note_residency(&self) {
        self.stats
            .resident_pages
            .set((self.cache.resident() + self.cache.evicting()) as u64);
        self.stats
            .max_resident_pages
            .raise(self.cache.max_resident() as u64);
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
                } else if self.cache.redirty(page) {
                    // Written during its write-back: that copy is stale, the page is sent again.
                    self.uffd.unprotect(addr, PAGE)?;
                } else {
                    // Evicted since the fault was raised: the writer retries and faults as missing.
                    self.uffd.wake(addr, PAGE)?;
                }
            }
            Fault::Missing { addr, write } => {
                let page = self.page_of(addr)?;
                if self.cache.is_present(page) {
                    self.uffd.wake(addr, PAGE)?; // installed by a prefetch or an earlier event
                    return Ok(());
                }
                self.stats.faults.inc();
                let fetched = self.cache.on_server(page);
                self.fill(page, write)?;
                if fetched {
                    self.stats
                        .fetch_latency
                        .record(start.elapsed().as_micros() as u64);
                }
            }
        }
        let took = start.elapsed();
        self.stats.time.serve.add(took.as_nanos() as u64);
        self.stats.latency.record(took.as_micros() as u64);
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
            .filter(|p| !self.cache.is_present(*p))
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
        self.note_residency();
        Ok(())
    }

    /// Evicts until `incoming` pages fit.
    fn make_room(&mut self, incoming: usize) -> Result<(), FaultError> {
        // Write-backs in flight free their pages once acknowledged: wait for those first.
        while self.cache.room_needed(incoming) > 0 && !self.inflight.is_empty() {
            self.complete_oldest()?;
        }
        let needed = self.cache.room_needed(incoming);
        if needed == 0 {
            return Ok(());
        }
        // Evict a batch at a time: contiguous victims (FIFO on a stream) then cost one
        // write-protect and one MADV_DONTNEED per run instead of per page, and each of those
        // makes KVM zap its own mappings of the range.
        self.evict(needed.max(EVICT_BATCH.min(self.cache.limit() / 8)))
    }

    /// Evicts `n` pages: dirty victims are written back first and only then dropped, so a
    /// page's latest content is always somewhere.
    fn evict(&mut self, n: usize) -> Result<(), FaultError> {
        let victims = self.cache.evict(n);
        self.stats.evictions.add(victims.len() as u64);
        let mut dirty: Vec<u32> = victims.iter().filter(|v| v.dirty).map(|v| v.page).collect();
        dirty.sort_unstable();
        self.write_back(&dirty)?;
        let mut all: Vec<u32> = victims.iter().map(|v| v.page).collect();
        all.sort_unstable();
        let ranges: Vec<(usize, usize)> = runs(&all)
            .into_iter()
            .map(|(start, len)| (self.addr_of(start), len as usize * PAGE))
            .collect();
        timed(&self.stats.time.drop, || self.uffd.drop_ranges(&ranges))?;
        self.note_residency();
        Ok(())
    }

    /// Write-protects `sorted` resident pages and sends their content to the source, in batches
    /// (the source pipelines each batch MAX_BATCH pages per request).
    fn write_back(&mut self, sorted: &[u32]) -> Result<(), FaultError> {
        for chunk in sorted.chunks(WRITEBACK_BATCH) {
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
                // SAFETY: the page is resident (only this thread drops pages) and
                // write-protected, so reading it neither faults nor races a writer.
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
        Ok(())
    }
}
