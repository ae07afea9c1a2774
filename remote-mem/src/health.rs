//! The health of one replicated region: each replica's state and server, how many fail-overs
//! happened, since when (and for how long in all) the region ran on one copy, and the repair:
//! a new copy being made (pages copied so far), copies completed, and the stale copies left on
//! failed servers that are still to be freed. Shared
//! between the thread that uses the region (it records changes, which are rare) and whoever
//! reports on it (the VMM's stats), so it is a small mutex, never taken on the data path.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a replica of a region is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// In the write set and readable.
    Healthy,
    /// Being filled with the region's contents (re-replication): written, never read.
    Copying,
    /// Dropped after a failure: neither read nor written.
    Failed,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Healthy => "healthy",
            ReplicaState::Copying => "copying",
            ReplicaState::Failed => "failed",
        }
    }
}

/// One replica, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaReport {
    pub role: &'static str,
    pub server: String,
    pub state: ReplicaState,
    /// Why it failed, with its causes.
    pub failure: Option<String>,
}

/// A region's health at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub region: u64,
    /// "healthy" (every replica healthy), "re-replicating" (a new copy is being made) or
    /// "degraded" (running on one copy).
    pub state: &'static str,
    pub replicas: Vec<ReplicaReport>,
    /// Replicas lost while another copy carried on.
    pub failovers: u64,
    /// Wall-clock time (ms since the epoch) the current degraded period began.
    pub degraded_since_unix_ms: Option<u64>,
    /// Time spent degraded so far, the current period included.
    pub degraded_ms: u64,
    /// New copies completed (re-replications).
    pub rereplications: u64,
    /// Pages copied so far to the replica being filled (0 when none is).
    pub copied_pages: u64,
    /// Servers that failed holding a copy, which is freed when they answer again.
    pub stale_copies: Vec<String>,
}

#[derive(Debug)]
struct Inner {
    region: u64,
    replicas: Vec<ReplicaReport>,
    failovers: u64,
    degraded_since: Option<(Instant, SystemTime)>,
    degraded_before: Duration,
    rereplications: u64,
    copied_pages: u64,
    stale: Vec<String>,
}

/// Shared health record of one region.
#[derive(Debug)]
pub struct RegionHealth(Mutex<Inner>);

const ROLES: [&str; 2] = ["primary", "backup"];

impl RegionHealth {
    pub fn new(region: u64, servers: [&str; 2]) -> Self {
        let replicas = servers
            .iter()
            .zip(ROLES)
            .map(|(s, role)| ReplicaReport {
                role,
                server: (*s).to_string(),
                state: ReplicaState::Healthy,
                failure: None,
            })
            .collect();
        RegionHealth(Mutex::new(Inner {
            region,
            replicas,
            failovers: 0,
            degraded_since: None,
            degraded_before: Duration::ZERO,
            rereplications: 0,
            copied_pages: 0,
            stale: Vec::new(),
        }))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replica `i` failed (`why`, with causes). A fail-over when another replica is healthy.
    pub fn failed(&self, i: usize, why: String) {
        self.with(|h| {
            let was = h.replicas[i].state;
            h.replicas[i].state = ReplicaState::Failed;
            h.replicas[i].failure = Some(why);
            let others_healthy = h.replicas.iter().any(|r| r.state == ReplicaState::Healthy);
            if was == ReplicaState::Healthy && others_healthy {
                h.failovers += 1;
            }
            if h.degraded_since.is_none() {
                h.degraded_since = Some((Instant::now(), SystemTime::now()));
            }
        });
    }

    /// Replica `i` is on another server now (migration, or a new copy being made there).
    pub fn moved(&self, i: usize, server: &str, state: ReplicaState) {
        self.with(|h| {
            h.replicas[i].server = server.to_string();
            h.replicas[i].state = state;
            if state != ReplicaState::Failed {
                h.replicas[i].failure = None;
            }
            if state != ReplicaState::Copying {
                h.copied_pages = 0;
            }
            if state == ReplicaState::Healthy
                && h.replicas.iter().all(|r| r.state == ReplicaState::Healthy)
            {
                if let Some((since, _)) = h.degraded_since.take() {
                    h.degraded_before += since.elapsed();
                }
            }
        });
    }

    /// `pages` more pages reached the replica being filled.
    pub fn copied(&self, pages: u64) {
        self.with(|h| h.copied_pages += pages);
    }

    /// A new copy was completed (after [`RegionHealth::moved`] to `Healthy`).
    pub fn rereplicated(&self) {
        self.with(|h| h.rereplications += 1);
    }

    /// The list of servers holding a stale copy changed.
    pub fn set_stale(&self, servers: Vec<String>) {
        self.with(|h| h.stale = servers);
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        self.with(|h| {
            let current = h.degraded_since.map(|(i, _)| i.elapsed());
            let copying = h.replicas.iter().any(|r| r.state == ReplicaState::Copying);
            HealthSnapshot {
                region: h.region,
                state: match (current.is_some(), copying) {
                    (_, true) => "re-replicating",
                    (true, false) => "degraded",
                    (false, false) => "healthy",
                },
                replicas: h.replicas.clone(),
                failovers: h.failovers,
                degraded_since_unix_ms: h.degraded_since.map(|(_, t)| {
                    t.duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64)
                }),
                degraded_ms: (h.degraded_before + current.unwrap_or_default()).as_millis() as u64,
                rereplications: h.rereplications,
                copied_pages: h.copied_pages,
                stale_copies: h.stale.clone(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_degraded_time_and_recovery() {
        let h = RegionHealth::new(0, ["a:1", "b:2"]);
        assert_eq!(h.snapshot().state, "healthy");
        h.failed(0, "gone".into());
        let s = h.snapshot();
        assert_eq!((s.state, s.failovers), ("degraded", 1));
        assert!(s.degraded_since_unix_ms.is_some());
        assert_eq!(s.replicas[0].state, ReplicaState::Failed);
        // The last copy failing is not a fail-over.
        h.failed(1, "also gone".into());
        assert_eq!(h.snapshot().failovers, 1);
        h.moved(0, "c:3", ReplicaState::Copying);
        h.copied(5);
        let s = h.snapshot();
        assert_eq!((s.state, s.copied_pages), ("re-replicating", 5));
        assert!(
            s.degraded_since_unix_ms.is_some(),
            "still one copy while copying"
        );
        h.moved(0, "c:3", ReplicaState::Healthy);
        h.moved(1, "d:4", ReplicaState::Healthy);
        let s = h.snapshot();
        assert_eq!(s.state, "healthy");
        assert_eq!(s.degraded_since_unix_ms, None);
        assert_eq!(s.replicas[0].server, "c:3");
    }
}
