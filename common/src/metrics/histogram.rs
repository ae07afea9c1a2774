//! A lock-free latency histogram: log-linear buckets of atomic counters (exact below 32 µs, then
//! 32 buckets per power of two: at most ~3% error) from 0 to 2^26 µs (~67 s; slower ones count
//! in the last bucket). Recording is two relaxed atomic adds and no lock, so it can sit on the
//! ExCache's fault path; percentiles and the Prometheus buckets are read from the same counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// log2 of the buckets per power of two.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Powers of two above the exact range: 2^5 ..= 2^25 µs.
const OCTAVES: u32 = 26 - SUB_BITS;
const BUCKETS: usize = (SUB + OCTAVES as u64 * SUB) as usize;
/// Largest value with a bucket of its own, in µs.
const MAX_US: u64 = (1 << 26) - 1;

/// A latency histogram in microseconds; clones share the same counts.
#[derive(Clone)]
pub struct LatencyHistogram(Arc<Inner>);

struct Inner {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .finish()
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

fn index(us: u64) -> usize {
    let us = us.min(MAX_US);
    if us < SUB {
        return us as usize;
    }
    let octave = 63 - us.leading_zeros(); // >= SUB_BITS
    let shift = octave - SUB_BITS;
    (SUB + u64::from(shift) * SUB + ((us >> shift) - SUB)) as usize
}

/// The highest value that lands in bucket `i`.
fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let shift = (i - SUB) / SUB;
    let low = (SUB + (i - SUB) % SUB) << shift;
    low + (1 << shift) - 1
}

impl LatencyHistogram {
    pub fn new() -> Self {
        LatencyHistogram(Arc::new(Inner {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }))
    }

    pub fn record_us(&self, us: u64) {
        self.0.buckets[index(us)].fetch_add(1, Ordering::Relaxed);
        self.0.count.fetch_add(1, Ordering::Relaxed);
        self.0.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn record(&self, d: Duration) {
        self.record_us(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }

    /// The value at quantile `q` (0..=1) in µs: the highest value of the bucket it falls in
    /// (exact below 32 µs, within ~3% above); `None` before anything was recorded.
    pub fn percentile_us(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        counts
            .iter()
            .position(|n| {
                seen += n;
                seen >= want
            })
            .map(upper)
    }

    /// Counts per power of two (1 µs, 2 µs, 4 µs, ... 2^25 µs), not cumulative; the rest in +Inf.
    fn octave_counts(&self) -> Vec<(f64, u64)> {
        let mut out = Vec::with_capacity(OCTAVES as usize + SUB_BITS as usize + 2);
        let mut i = 0;
        for p in 0..=25u32 {
            // A recorded value v (whole µs) stands for a latency in [v, v+1) µs, so it is at
            // most 2^p µs when v < 2^p.
            let bound = 1u64 << p;
            let mut n = 0;
            while i < BUCKETS && upper(i) < bound {
                n += self.0.buckets[i].load(Ordering::Relaxed);
                i += 1;
            }
            out.push((bound as f64 / 1e6, n));
        }
        let rest = self.0.buckets[i..]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum();
        out.push((f64::INFINITY, rest));
        out
    }
}

/// A Prometheus histogram in seconds, with buckets at each power of two microseconds.
impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets = self.octave_counts();
        // The count is the sum of the buckets read, so the exposition is self-consistent even
        // while others record.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Several latency histograms under one name, told apart by one label (e.g. `op="read"`),
/// exposed as `NAME_seconds`.
#[derive(Debug)]
pub struct LatencyFamily {
    name: String,
    help: String,
    label: String,
    members: Vec<(String, LatencyHistogram)>,
}

impl LatencyFamily {
    /// Registers `members` as `name`_seconds{`label`="..."}.
    pub fn register(
        registry: &mut Registry,
        name: &str,
        help: &str,
        label: &str,
        members: Vec<(&str, LatencyHistogram)>,
    ) {
        registry.register_collector(Box::new(LatencyFamily {
            name: name.to_owned(),
            help: help.to_owned(),
            label: label.to_owned(),
            members: members
                .into_iter()
                .map(|(v, h)| (v.to_owned(), h))
                .collect(),
        }));
    }
}

impl Collector for LatencyFamily {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let unit = Unit::Seconds;
        let mut enc = encoder.encode_descriptor(
            &self.name,
            &self.help,
            Some(&unit),
            MetricType::Histogram,
        )?;
        for (value, h) in &self.members {
            let labels = [(self.label.as_str(), value.as_str())];
            h.encode(enc.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for us in 0..=MAX_US.min(1 << 20) {
            let i = index(us);
            assert!(i >= last, "{us}");
            assert!(
                upper(i) >= us && (i == 0 || upper(i - 1) < us),
                "{us} in {i}"
            );
            last = i;
        }
        assert_eq!(index(MAX_US), BUCKETS - 1);
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_are_exact_below_32_us_and_close_above() {
        let h = LatencyHistogram::new();
        assert_eq!(h.percentile_us(0.5), None);
        for us in 1..=100 {
            h.record_us(us);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.percentile_us(0.2), Some(20));
        let p99 = h.percentile_us(0.99).unwrap();
        assert!((99..=101).contains(&p99), "{p99}");
        let h = LatencyHistogram::new();
        h.record(Duration::from_millis(5));
        let p = h.percentile_us(0.5).unwrap() as f64;
        assert!((p - 5000.0).abs() / 5000.0 < 0.035, "{p}");
    }

    #[test]
    fn prometheus_buckets_add_up() {
        let h = LatencyHistogram::new();
        for us in [0, 1, 3, 40, 40, 1000, 100_000_000] {
            h.record_us(us);
        }
        let b = h.octave_counts();
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), 7);
        assert_eq!(b[0], (1e-6, 1)); // 0 µs
        assert_eq!(b[1], (2e-6, 1)); // 1 µs
        assert_eq!(b[2], (4e-6, 1)); // 3 µs
        assert_eq!(b[6], (64e-6, 2)); // 40 µs
        assert_eq!(b.last(), Some(&(f64::INFINITY, 1)));
    }

    #[test]
    fn records_from_many_threads_without_losing_any() {
        let h = LatencyHistogram::new();
        std::thread::scope(|s| {
            for t in 0..4 {
                let h = h.clone();
                s.spawn(move || (0..10_000).for_each(|i| h.record_us(i % 500 + t)));
            }
        });
        assert_eq!(h.count(), 40_000);
    }
}
