//! How long a data-path client (the memory client, the NBD client) waits for a server before
//! declaring it failed: a deadline set from the measured round trip, not a fixed guess.
//!
//! [`Rtt`] keeps an EWMA of request times, seeded by the handshake's round trip. A request is
//! given `max(FLOOR, K x rtt, bytes / MIN_BANDWIDTH)`, capped at `CEILING`. The deadline runs
//! from the last *progress* on the connection (any byte received, any reply), not from the
//! request's submission, so a large batch that is being answered slowly is never declared dead
//! while bytes keep arriving; only silence is.
//!
//! Why these constants (this project's hosts: 2 cores shared with compilers, loopback or LAN):
//! - `FLOOR` = 500 ms. Loopback round trips are 15-60 us, but a server thread on a loaded host
//!   can wait tens of milliseconds for a core, and a `--sync` write waits for an fsync (1-100 ms
//!   on an SSD under load). 500 ms is an order of magnitude above those stalls and still lets a
//!   silent server be declared failed within about a second (the target), since a
//!   waiting client notices at most one deadline after the server stops. That is the memory
//!   path's floor: its servers answer from memory.
//! - `SOLE_COPY_FLOOR` = 4 s: a memory server holding the only copy (unreplicated, or the
//!   survivor of a fail-over) has nobody to fail over to, so declaring it failed early gains
//!   nothing and a false failure stops the VM. Measured here: at load 22 on 2 cores a debug
//!   build of vnode-memd once went 500 ms without answering while alive. 4 s still stops a VM
//!   on a hung server within a few seconds.
//! - `STORAGE_FLOOR` = 2 s, `DURABLE_FLOOR` = 8 s: a storage server's plain write can wait
//!   for the page cache's writeback throttling, and a flush or FUA write for an fsync, which on
//!   this project's loaded hosts was seen past 500 ms (the NBD client tests failed at that floor
//!   with 8 connections writing). A false failure of a disk costs the guest an I/O error (or a
//!   resync), worse than waiting a few seconds more.
//! - `K` = 16: a server whose normal request time is long (a remote rack, slow fsyncs) gets a
//!   proportionally longer deadline; 16x the mean is beyond the tail of a healthy server's
//!   request times (p99.9 is typically within 10x the mean).
//! - `MIN_BANDWIDTH` = 20 MB/s: the slowest transfer rate still taken for a live server. A
//!   1 MiB memory batch gets 50 ms more, a 32 MiB NBD request 1.6 s more.
//! - `CEILING` = 8 s: whatever the estimate says (a few very slow replies can inflate it), a
//!   server that sends nothing for 8 s is failed. Operations that legitimately take longer
//!   (a region migration) run without a deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const FLOOR: Duration = Duration::from_millis(500);
pub const SOLE_COPY_FLOOR: Duration = Duration::from_secs(4);
pub const STORAGE_FLOOR: Duration = Duration::from_secs(2);
pub const DURABLE_FLOOR: Duration = CEILING;
pub const CEILING: Duration = Duration::from_secs(8);
pub const K: u32 = 16;
pub const MIN_BANDWIDTH: u64 = 20_000_000;
/// A connection's handshake must finish within this (the server may be stopped: the kernel
/// accepts the TCP connection, nobody answers).
pub const HANDSHAKE: Duration = Duration::from_secs(2);

/// The EWMA weight of a new sample, as a shift: 1/8, TCP's SRTT gain.
const GAIN_SHIFT: u32 = 3;

/// A round-trip estimate shared by the threads of one connection (lock-free).
#[derive(Debug)]
pub struct Rtt {
    ewma_ns: AtomicU64,
}

impl Rtt {
    /// Starts from the handshake's round trip.
    pub fn new(handshake: Duration) -> Self {
        Self {
            ewma_ns: AtomicU64::new(nanos(handshake)),
        }
    }

    /// Folds in one request's time.
    pub fn observe(&self, took: Duration) {
        let sample = nanos(took);
        // A lost update between racing observers only drops one sample: good enough.
        let old = self.ewma_ns.load(Ordering::Relaxed);
        let new = old - (old >> GAIN_SHIFT) + (sample >> GAIN_SHIFT);
        self.ewma_ns.store(new, Ordering::Relaxed);
    }

    /// The current estimate.
    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.ewma_ns.load(Ordering::Relaxed))
    }

    /// How long a request moving `bytes` (both ways) may go without progress.
    pub fn deadline(&self, bytes: usize) -> Duration {
        deadline_for(self.get(), bytes)
    }

    /// The same with another floor (a storage server's, or a durable request's).
    pub fn deadline_with(&self, floor: Duration, bytes: usize) -> Duration {
        deadline_above(floor, self.get(), bytes)
    }
}

/// `max(FLOOR, K x rtt, bytes / MIN_BANDWIDTH)`, at most `CEILING`.
pub fn deadline_for(rtt: Duration, bytes: usize) -> Duration {
    deadline_above(FLOOR, rtt, bytes)
}

fn deadline_above(floor: Duration, rtt: Duration, bytes: usize) -> Duration {
    let transfer =
        Duration::from_nanos((bytes as u64).saturating_mul(1_000_000_000) / MIN_BANDWIDTH);
    floor.max(rtt.saturating_mul(K)).max(transfer).min(CEILING)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_size_rtt_and_ceiling() {
        assert_eq!(deadline_for(Duration::from_micros(50), 4096), FLOOR);
        // 1 MiB batch: still the floor; 32 MiB: the transfer allowance.
        assert_eq!(deadline_for(Duration::from_micros(50), 1 << 20), FLOOR);
        let big = deadline_for(Duration::from_micros(50), 32 << 20);
        assert!(big > Duration::from_millis(1600) && big < Duration::from_millis(1700));
        assert_eq!(
            deadline_for(Duration::from_millis(100), 0),
            Duration::from_millis(1600)
        );
        assert_eq!(deadline_for(Duration::from_secs(5), 0), CEILING);
        assert_eq!(deadline_for(Duration::ZERO, usize::MAX), CEILING);
    }

    #[test]
    fn ewma_moves_an_eighth_toward_each_sample() {
        let r = Rtt::new(Duration::from_micros(800));
        r.observe(Duration::from_micros(0));
        assert_eq!(r.get(), Duration::from_micros(700));
        for _ in 0..100 {
            r.observe(Duration::from_millis(10));
        }
        assert!(r.get() > Duration::from_micros(9900), "{:?}", r.get());
        assert_eq!(r.deadline(0), Duration::from_millis(500).max(r.get() * 16));
    }
}
