//! `test=mem`: fill, passes, verify over the region R of guest RAM, on all vCPUs.
//!
//! Layout (all identity-mapped): the guest image and .bss, the page tables (built after `_end`
//! by boot.rs), then this test's metadata (two bytes per RAM page: the pass that last wrote it,
//! and whether the passes phase touched it), then R from the next 2 MiB boundary to the end of
//! RAM (or `bytes=` of it).
//!
//! Phases, separated by barriers, with vCPU 0 reporting after each:
//!   1. fill: every page of R once, in pattern order (seq: ascending; random and zipf: a keyed
//!      permutation), split into N contiguous runs of that order; then `out 0xf5, 1`.
//!   2. passes: in pass 1..=passes each vCPU makes as many accesses as it owns pages, choosing a
//!      page by pattern (seq: ascending; random: uniform; zipf: zipf(0.99) rank, scrambled by a
//!      permutation so hot pages are spread over R) and mapping it to one of its own pages
//!      (page % N == vCPU: no two vCPUs ever touch a page at once). A `writes`% share of the
//!      accesses rewrite the page for this pass and record the pass; the rest verify it against
//!      its recorded pass. Then `out 0xf5, 2`.
//!   3. verify: every page of R read back in ascending order and checked.
//!
//! Mismatched 64-bit words are errors; the lowest mismatched address is reported.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

use testguest::cmdline::Config;
use testguest::content::{fill_pages, verify_pages, Mismatches, PAGE_SIZE};
use testguest::json::JsonLine;
use testguest::plan::{fill_page, fill_permutation, share, Accesses};
use testguest::region::Region;
use testguest::sync::SpinBarrier;

use crate::machine::BootInfo;
use crate::{boot, port};

const PAGE: u64 = PAGE_SIZE as u64;
const TWO_MIB: u64 = 2 << 20;

static BARRIER: SpinBarrier = SpinBarrier::new();
static ERRORS: AtomicU64 = AtomicU64::new(0);
static FIRST_ERROR: AtomicU64 = AtomicU64::new(u64::MAX);
static READS: AtomicU64 = AtomicU64::new(0);
static WRITES: AtomicU64 = AtomicU64::new(0);
static TOUCHED: AtomicU64 = AtomicU64::new(0);

/// Where things are, computed identically by every vCPU.
struct Layout {
    region: Region,
    /// Last-written pass of each page of R.
    pass_of: &'static [AtomicU8],
    /// Whether the passes phase touched each page of R.
    touched: &'static [AtomicU8],
}

/// The metadata arrays and R, or the line explaining why `bytes=` does not fit.
fn layout(info: &BootInfo, cfg: &Config) -> Result<Layout, (u64, u64)> {
    let meta = boot::page_tables_end().next_multiple_of(PAGE);
    // Sized for every page of RAM, so the layout does not depend on `bytes=`.
    let max_pages = info.ram_top() / PAGE;
    let base = (meta + 2 * max_pages).next_multiple_of(TWO_MIB);
    let mut region = Region::above(info.ram(), base);
    let available = region.bytes();
    let bytes = cfg.bytes.unwrap_or(available);
    if bytes > available {
        return Err((bytes, available));
    }
    region.truncate(bytes / PAGE);
    let pages = region.pages() as usize;
    // SAFETY: [meta, meta + 2 * max_pages) lies between the page tables and R, in RAM below
    // base (the lowest RAM range holds the image and reaches far past it), is used by nothing
    // else, and AtomicU8 has the size and alignment of u8 and can hold any byte. Every vCPU
    // shares it through atomics only.
    let (pass_of, touched) = unsafe {
        (
            core::slice::from_raw_parts(meta as *const AtomicU8, pages),
            core::slice::from_raw_parts((meta + max_pages) as *const AtomicU8, pages),
        )
    };
    Ok(Layout {
        region,
        pass_of,
        touched,
    })
}

/// The page at `gpa`, for the one vCPU that owns it in the current phase.
///
/// # Safety
/// `gpa` must be a page of R, and no other vCPU may access it until the next barrier.
unsafe fn page(gpa: u64) -> &'static mut [u8] {
    // SAFETY: R is RAM identity-mapped for user mode and used by nothing but this test; the
    // caller guarantees exclusive access.
    unsafe { core::slice::from_raw_parts_mut(gpa as *mut u8, PAGE_SIZE) }
}

/// Per-vCPU counts, added to the shared totals at the end of a phase.
#[derive(Default)]
struct Tally {
    mism: Mismatches,
    reads: u64,
    writes: u64,
    touched: u64,
}

impl Tally {
    fn verify(&mut self, lay: &Layout, p: u64, seed: u64) {
        let gpa = lay.region.gpa(p);
        let pass = lay.pass_of[p as usize].load(Relaxed) as u32;
        // SAFETY: page p is this vCPU's alone in the current phase (see the module docs).
        self.mism
            .merge(verify_pages(unsafe { page(gpa) }, gpa, pass, seed));
        self.reads += 1;
    }

    fn write(&mut self, lay: &Layout, p: u64, pass: u32, seed: u64) {
        let gpa = lay.region.gpa(p);
        // SAFETY: as in `verify`.
        fill_pages(unsafe { page(gpa) }, gpa, pass, seed);
        lay.pass_of[p as usize].store(pass as u8, Relaxed);
        self.writes += 1;
    }

    fn publish(&self) {
        ERRORS.fetch_add(self.mism.errors, Relaxed);
        if let Some(gpa) = self.mism.first_error_gpa {
            FIRST_ERROR.fetch_min(gpa, Relaxed);
        }
        READS.fetch_add(self.reads, Relaxed);
        WRITES.fetch_add(self.writes, Relaxed);
        TOUCHED.fetch_add(self.touched, Relaxed);
    }
}

fn fill(lay: &Layout, cfg: &Config, k: u32, n: u32) {
    let pages = lay.region.pages();
    let perm = fill_permutation(pages, cfg.seed);
    let (lo, hi) = share(pages, k, n);
    // Not published: `reads`/`writes` in the report count the passes phase only.
    let mut t = Tally::default();
    for pos in lo..hi {
        let p = fill_page(cfg.pattern, &perm, pos);
        t.write(lay, p, 0, cfg.seed);
        lay.touched[p as usize].store(0, Relaxed);
    }
}

fn passes(lay: &Layout, cfg: &Config, k: u32, n: u32) {
    let pages = lay.region.pages();
    let acc = Accesses::new(pages, k, n, cfg.pattern, cfg.seed, cfg.writes);
    if acc.count() == 0 {
        return;
    }
    let mut t = Tally::default();
    for pass in 1..=cfg.passes {
        for (p, write) in acc.pass(pass) {
            if write {
                t.write(lay, p, pass, cfg.seed);
            } else {
                t.verify(lay, p, cfg.seed);
            }
            if lay.touched[p as usize].swap(1, Relaxed) == 0 {
                t.touched += 1;
            }
        }
    }
    t.publish();
}

fn verify(lay: &Layout, cfg: &Config, k: u32, n: u32) {
    let (lo, hi) = share(lay.region.pages(), k, n);
    let mut t = Tally::default();
    for p in lo..hi {
        t.verify(lay, p, cfg.seed);
    }
    // The verify phase's reads are not counted with the passes' reads.
    ERRORS.fetch_add(t.mism.errors, Relaxed);
    if let Some(gpa) = t.mism.first_error_gpa {
        FIRST_ERROR.fetch_min(gpa, Relaxed);
    }
}

pub fn run(k: u32, n: u32, info: &BootInfo, cfg: &Config) -> ! {
    let lay = match layout(info, cfg) {
        Ok(lay) => lay,
        Err((bytes, available)) => {
            if k == 0 {
                let mut line = JsonLine::<256>::new()
                    .str("error", "bytes exceeds the RAM available to the test")
                    .u64("bytes", bytes)
                    .u64("available", available);
                port::serial_write(line.finish());
                port::exit(2);
            }
            crate::park()
        }
    };
    let pages = lay.region.pages();
    BARRIER.wait(n);
    let t0 = port::rdtsc();

    fill(&lay, cfg, k, n);
    BARRIER.wait(n);
    let t1 = port::rdtsc();
    if k == 0 {
        port::phase_marker(1);
        let mut line = JsonLine::<256>::new()
            .str("phase", "fill")
            .str("pattern", cfg.pattern.name())
            .u64("base", lay.region.gpa(0))
            .u64("pages", pages)
            .u64("cycles", t1 - t0);
        port::serial_write(line.finish());
    }
    BARRIER.wait(n);
    let t2 = port::rdtsc();

    passes(&lay, cfg, k, n);
    BARRIER.wait(n);
    let t3 = port::rdtsc();
    if k == 0 {
        port::phase_marker(2);
        let mut line = JsonLine::<256>::new()
            .str("phase", "passes")
            .u64("passes", cfg.passes as u64)
            .u64("reads", READS.load(Relaxed))
            .u64("writes", WRITES.load(Relaxed))
            .u64("touched", TOUCHED.load(Relaxed))
            .u64("errors", ERRORS.load(Relaxed))
            .u64("cycles", t3 - t2);
        port::serial_write(line.finish());
    }
    BARRIER.wait(n);
    let t4 = port::rdtsc();

    verify(&lay, cfg, k, n);
    BARRIER.wait(n);
    if k != 0 {
        crate::park();
    }
    let t5 = port::rdtsc();
    let errors = ERRORS.load(Relaxed);
    let first = FIRST_ERROR.load(Relaxed);
    let mut line = JsonLine::<256>::new()
        .str("phase", "verify")
        .u64("pages", pages)
        .u64("errors", errors)
        .u64("cycles", t5 - t4);
    port::serial_write(line.finish());
    let mut line = JsonLine::<1024>::new()
        .str("test", "mem")
        .str("pattern", cfg.pattern.name())
        .u64("vcpus", n as u64)
        .u64("seed", cfg.seed)
        .u64("writes_pct", cfg.writes as u64)
        .u64("passes", cfg.passes as u64)
        .u64("bytes", lay.region.bytes())
        .u64("pages", pages)
        .u64("touched", TOUCHED.load(Relaxed))
        .u64("reads", READS.load(Relaxed))
        .u64("writes", WRITES.load(Relaxed))
        .u64("errors", errors)
        .opt_u64("first_error_gpa", (first != u64::MAX).then_some(first))
        .u64("fill_cycles", t1 - t0)
        .u64("pass_cycles", t3 - t2)
        .u64("verify_cycles", t5 - t4)
        .u64("cycles", t5 - t0);
    port::serial_write(line.finish());
    crate::finish(errors == 0, errors)
}
