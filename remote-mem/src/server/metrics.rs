//! Server counters and per-request latency histograms (logged by `--stats-interval`, exposed by
//! `--metrics-listen`: `exposition.rs`), and a rate limit for log lines that remote peers can
//! trigger.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vnode_common::metrics::LatencyHistogram;

/// Counters of what the server did; logged by `--stats-interval`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub auth_failures: AtomicU64,
    pub bad_frames: AtomicU64,
    pub requests_refused: AtomicU64,
    pub pages_read: AtomicU64,
    pub pages_written: AtomicU64,
    pub regions_migrated: AtomicU64,
    /// Connections refused at accept because `--max-connections` were open.
    pub busy_refused: AtomicU64,
    /// Connections closed for missing the handshake deadline or the idle timeout.
    pub timeouts: AtomicU64,
    /// Service time of each request by kind, from its decoding to its reply being ready to send.
    pub latency: OpLatency,
}

/// A latency histogram per request kind.
#[derive(Debug, Default)]
pub struct OpLatency {
    pub read: LatencyHistogram,
    pub write: LatencyHistogram,
    pub alloc: LatencyHistogram,
    pub open: LatencyHistogram,
    pub free: LatencyHistogram,
    pub migrate: LatencyHistogram,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// One line with every counter.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "connections={} auth_failures={} bad_frames={} requests_refused={} pages_read={} pages_written={} regions_migrated={} busy_refused={} timeouts={}",
            g(&self.connections),
            g(&self.auth_failures),
            g(&self.bad_frames),
            g(&self.requests_refused),
            g(&self.pages_read),
            g(&self.pages_written),
            g(&self.regions_migrated),
            g(&self.busy_refused),
            g(&self.timeouts),
        )
    }
}

/// Allows `per_sec` events a second; the rest are only counted (and reported with the next
/// allowed one).
#[derive(Debug)]
pub struct RateLimit {
    per_sec: u32,
    state: Mutex<(Instant, u32, u64)>,
}

impl RateLimit {
    pub fn new(per_sec: u32) -> Self {
        RateLimit {
            per_sec,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(suppressed_since_last)` when this event may be logged.
    pub fn allow(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(st.0) >= Duration::from_secs(1) {
            st.0 = now;
            st.1 = 0;
        }
        if st.1 < self.per_sec {
            st.1 += 1;
            let suppressed = st.2;
            st.2 = 0;
            Some(suppressed)
        } else {
            st.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_what_it_drops() {
        let r = RateLimit::new(2);
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        let m = Metrics::default();
        Metrics::add(&m.pages_read, 3);
        assert!(m.summary().contains("pages_read=3"));
    }
}
