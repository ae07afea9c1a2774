//! The ExCache's counters: kept by the fault thread with relaxed atomics, read by the control API
//! (`GET /vm/counters`, `GET /metrics`) and by `--stats` at exit as [`vnode_api::ExCacheCounters`].

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use prometheus_client::metrics::histogram::Histogram as PromHistogram;
use vnode_api::{ExCacheCounters, PhaseTimesUs};

use crate::metrics::{Counter, Gauge};

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
    pub resident_pages: Gauge,
    pub max_resident_pages: Gauge,
    pub limit_pages: Gauge,
    /// Where the fault thread's time goes, in nanoseconds (reported in microseconds).
    pub time: PhaseTimes,
    /// Service time of every missing-page fault, and of those whose page came from the source
    /// (the others are zero-filled here: no round trip, whatever the source).
    pub(super) latency: Latency,
    pub(super) fetch_latency: Latency,
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
    /// The reclaimer's time between faults (its protect, writeback and drop count there too).
    pub reclaim: Counter,
}

/// Runs `f`, adding its duration in nanoseconds to `c`.
pub(super) fn timed<T>(c: &Counter, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    c.add(t.elapsed().as_nanos() as u64);
    r
}

const LATENCY_BUCKETS: usize = 20_001;

/// Fault latencies: exact microsecond buckets up to 20 ms for the percentiles in `--stats`, and a
/// Prometheus histogram (seconds, exponential buckets) for `/metrics`.
pub(super) struct Latency {
    exact: Mutex<Vec<u64>>,
    prom: PromHistogram,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            exact: Mutex::default(),
            // 5 µs .. ~20 ms.
            prom: PromHistogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                5e-6, 2.0, 13,
            )),
        }
    }
}

impl Latency {
    pub(super) fn record(&self, us: u64) {
        {
            let mut h = self.exact.lock().expect("latency lock poisoned");
            if h.is_empty() {
                h.resize(LATENCY_BUCKETS, 0);
            }
            h[(us as usize).min(LATENCY_BUCKETS - 1)] += 1;
        }
        self.prom.observe(us as f64 * 1e-6);
    }

    fn percentile(&self, q: f64) -> Option<u64> {
        let h = self.exact.lock().expect("latency lock poisoned");
        let total: u64 = h.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        h.iter()
            .position(|n| {
                seen += n;
                seen >= want
            })
            .map(|i| i as u64)
    }
}

impl PhaseTimes {
    fn snapshot(&self) -> PhaseTimesUs {
        let us = |c: &Counter| c.get() / 1000;
        PhaseTimesUs {
            serve: us(&self.serve),
            fetch: us(&self.fetch),
            install: us(&self.install),
            wake: us(&self.wake),
            protect: us(&self.protect),
            writeback: us(&self.writeback),
            drop: us(&self.drop),
            reclaim: us(&self.reclaim),
        }
    }
}

impl ExCacheStats {
    /// All counters now, with fault service latency p50/p99 in microseconds.
    pub fn snapshot(&self) -> ExCacheCounters {
        ExCacheCounters {
            faults: self.faults.get(),
            wp_faults: self.wp_faults.get(),
            hits: self.prefetch_used.get(),
            zero_fills: self.zero_fills.get(),
            fetched: self.fetched.get(),
            evictions: self.evictions.get(),
            writebacks: self.writebacks.get(),
            prefetched: self.prefetched.get(),
            prefetch_used: self.prefetch_used.get(),
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            fault_p50_us: self.latency.percentile(0.5),
            fault_p99_us: self.latency.percentile(0.99),
            fetch_fault_p50_us: self.fetch_latency.percentile(0.5),
            fetch_fault_p99_us: self.fetch_latency.percentile(0.99),
            resident_pages: self.resident_pages.get(),
            max_resident_pages: self.max_resident_pages.get(),
            limit_pages: self.limit_pages.get(),
            time_us: self.time.snapshot(),
            replication: serde_json::from_value(super::source::replication_json())
                .expect("replication_json has MemReplication's fields"),
        }
    }

    /// The fault-latency histograms for `/metrics`: all faults, and those that fetched.
    pub fn latency_histograms(&self) -> (PromHistogram, PromHistogram) {
        (self.latency.prom.clone(), self.fetch_latency.prom.clone())
    }
}

/// The running VM's ExCache counters, if it has an ExCache.
pub static EXCACHE_STATS: OnceLock<Arc<ExCacheStats>> = OnceLock::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_snapshot() {
        let s = ExCacheStats::default();
        assert_eq!(s.snapshot().fault_p50_us, None);
        for us in [10, 20, 30, 40, 1000] {
            s.latency.record(us);
        }
        s.resident_pages.set(7);
        let c = s.snapshot();
        assert_eq!((c.fault_p50_us, c.fault_p99_us), (Some(30), Some(1000)));
        assert_eq!(c.resident_pages, 7);
    }
}
