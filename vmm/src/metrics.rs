//! Counters for everything the guest can trigger. Each is incremented somewhere; all are printed
//! as one JSON object when the VM stops (and on SIGUSR1).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// A monotonically increasing counter.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Counter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

/// A value that goes up and down (residency, a limit).
#[derive(Default, Debug)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Raises the value to `v` if it is lower.
    pub fn raise(&self, v: u64) {
        self.0.fetch_max(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// VM-wide counters.
#[derive(Default, Debug, Serialize)]
pub struct Metrics {
    pub exits_pio: Counter,
    pub exits_mmio: Counter,
    pub exits_hlt: Counter,
    pub exits_other: Counter,
    pub pio_unowned: Counter,
    pub mmio_unowned: Counter,
    pub int3_injected: Counter,
    pub serial_errors: Counter,
    /// virtio-blk requests completed (all disks), by outcome.
    pub blk_requests: Counter,
    pub blk_bad_requests: Counter,
    /// Requests that waited in the ring for others to complete (the bytes-in-flight cap).
    pub blk_throttled: Counter,
    pub blk_io_errors: Counter,
    pub blk_bytes_read: Counter,
    pub blk_bytes_written: Counter,
    pub blk_flushes: Counter,
    /// Devices put in DEVICE_NEEDS_RESET by a chain they cannot answer.
    pub blk_broken: Counter,
    /// virtio-net frames and bytes (all devices; bytes without the virtio-net header).
    pub net_tx_frames: Counter,
    pub net_tx_bytes: Counter,
    pub net_rx_frames: Counter,
    pub net_rx_bytes: Counter,
    /// Transmit frames the guest sent badly or the TAP refused; received frames too big for the
    /// guest's buffer.
    pub net_tx_dropped: Counter,
    pub net_rx_dropped: Counter,
    pub net_bad_chains: Counter,
    pub net_broken: Counter,
}

pub static METRICS: Metrics = Metrics {
    exits_pio: Counter::new(),
    exits_mmio: Counter::new(),
    exits_hlt: Counter::new(),
    exits_other: Counter::new(),
    pio_unowned: Counter::new(),
    mmio_unowned: Counter::new(),
    int3_injected: Counter::new(),
    serial_errors: Counter::new(),
    blk_requests: Counter::new(),
    blk_bad_requests: Counter::new(),
    blk_throttled: Counter::new(),
    blk_io_errors: Counter::new(),
    blk_bytes_read: Counter::new(),
    blk_bytes_written: Counter::new(),
    blk_flushes: Counter::new(),
    blk_broken: Counter::new(),
    net_tx_frames: Counter::new(),
    net_tx_bytes: Counter::new(),
    net_rx_frames: Counter::new(),
    net_rx_bytes: Counter::new(),
    net_tx_dropped: Counter::new(),
    net_rx_dropped: Counter::new(),
    net_bad_chains: Counter::new(),
    net_broken: Counter::new(),
};

impl Metrics {
    /// The counters now, as the API serves them.
    pub fn snapshot(&self) -> vnode_api::VmmCounters {
        // Field for field the same names (checked by a test below).
        serde_json::to_value(self)
            .and_then(serde_json::from_value)
            .expect("Metrics and VmmCounters have the same fields")
    }
}

/// The VM's counters now: the VMM's, and the ExCache's when guest RAM is remote.
pub fn counters() -> vnode_api::Counters {
    vnode_api::Counters {
        vmm: METRICS.snapshot(),
        excache: crate::memory::stats::EXCACHE_STATS
            .get()
            .map(|s| s.snapshot()),
        replicated_disks: serde_json::from_value(
            crate::devices::virtio::block::backend::replication_json(),
        )
        .expect("replication_json has DiskReplication's fields"),
        vnode_id: crate::memory::VNODE_ID
            .get()
            .map(|id| format!("{id:#018x}")),
    }
}

/// Logs at most `burst` events per key before going quiet, so a guest cannot flood the log.
pub struct RateLimit {
    seen: AtomicU64,
    burst: u64,
}

impl RateLimit {
    pub const fn new(burst: u64) -> Self {
        Self {
            seen: AtomicU64::new(0),
            burst,
        }
    }
    /// True while the event should still be logged.
    pub fn allow(&self) -> bool {
        self.seen.fetch_add(1, Ordering::Relaxed) < self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_stops_after_burst() {
        let r = RateLimit::new(2);
        assert!(r.allow() && r.allow());
        assert!(!r.allow());
    }

    #[test]
    fn counters_serialize_as_numbers() {
        let m = Metrics::default();
        m.exits_pio.add(3);
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["exits_pio"], 3);
    }

    #[test]
    fn snapshot_has_every_counter() {
        let m = Metrics::default();
        m.net_broken.add(2);
        let ours = serde_json::to_value(&m).unwrap();
        let api = serde_json::to_value(m.snapshot()).unwrap();
        assert_eq!(ours, api);
        assert_eq!(api["net_broken"], 2);
    }
}
