//! Repairing a [`ReplicatedRegion`] that lost a replica: re-replication and the freeing of
//! stale copies.
//!
//! Re-replication: once a replica has failed and a spare server is known
//! ([`ReplicatedRegion::add_spare`]: the VMM's `--mem-spare` list, its control API, or the
//! manager through it), the region is allocated there and the replica slot becomes a
//! *copying* replica: every write from then on goes to it as well as to the survivor, and
//! [`ReplicatedRegion::repair_step`] copies the region's pages to it from the survivor, one
//! batch per call, between the owner's other requests. The owner is one thread (the VMM's
//! fault thread), so no write can land between a batch's read from the survivor and its write
//! to the new copy: a page written before the cursor passes it is copied again with its new
//! content, a page written after it reaches both servers directly. Nothing is lost and no
//! pause is needed. When the cursor reaches the end the copy is complete: it becomes a
//! readable, healthy replica, and the region has two copies again. A copying replica is never
//! read; if the survivor fails while a copy is incomplete, the region has failed (the VMM stops).
//!
//! Stale copies: a failed server may come back (a restart with its memory log, a partition
//! that heals, a `kill -CONT`) still holding this region. The region remembers each failed
//! server and, when the owner is idle, tries (with backoff) to connect and free the region
//! there, so its capacity is not held by a copy nobody reads.

use std::time::{Duration, Instant};

use super::{ReplicatedRegion, Role};
use crate::client::MemClient;
use crate::error::ClientError;
use crate::health::ReplicaState;
use crate::protocol::{ErrorCode, MAX_BATCH, PAGE_SIZE};

/// First wait before retrying to free a stale copy; doubled after each failed try.
const STALE_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between tries to free a stale copy. A try costs a refused connection while the
/// server is down, but up to the connect and handshake deadlines (2 s each) while it hangs, so
/// tries wait for an idle moment of the owner...
const STALE_RETRY_MAX: Duration = Duration::from_secs(5);
/// ... unless one has been due for this long (an owner that is never idle).
const STALE_FORCE_AFTER: Duration = Duration::from_secs(10);
/// How long an owner must have had nothing to do to try a stale copy.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Pages whose `held` bit a copy step looks at, at most: bounds a step over a sparse region.
const SCAN_LIMIT: u64 = 64 * 1024;

/// A failed server that may still hold a copy of the region.
#[derive(Debug)]
pub(super) struct StaleCopy {
    addr: String,
    next_try: Instant,
    backoff: Duration,
}

/// What [`ReplicatedRegion::repair_step`] has left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Nothing: both copies are healthy (or no spare is known), no stale copy is left.
    Idle,
    /// A copy is being made (or can start): call again soon.
    Busy,
    /// Only stale copies to free: call again after this long (idle if nothing came meanwhile).
    After(Duration),
}

impl ReplicatedRegion {
    /// Adds `addr` to the servers a lost replica may be re-made on (tried in order).
    pub fn add_spare(&mut self, addr: &str) {
        if !self.spares.iter().any(|s| s == addr) {
            self.spares.push_back(addr.to_string());
        }
    }

    /// The replica slot being filled, if any.
    fn copying(&self) -> Option<usize> {
        (0..2).find(|i| self.replicas[*i].copying)
    }

    /// What is left to repair.
    pub fn repair_pending(&self) -> Repair {
        let lost = self.replicas.iter().any(|r| r.client.is_none());
        if self.copying().is_some() || (lost && !self.spares.is_empty() && self.pages > 0) {
            return Repair::Busy;
        }
        match self.stale.iter().map(|s| s.next_try).min() {
            // The owner counts as idle when nothing came for this long.
            Some(t) => Repair::After(t.saturating_duration_since(Instant::now()).max(IDLE_WAIT)),
            None => Repair::Idle,
        }
    }

    /// One step of repair: start a new copy on the next spare, copy one batch to it, or try to
    /// free one stale copy (when `idle`, so a server slow to answer holds up nobody, or once
    /// that has been due for long).
    /// `held(page)` says whether the region's servers hold `page` (one never written is zero
    /// everywhere and needs no copy). An error means the region itself failed.
    pub fn repair_step(
        &mut self,
        held: &dyn Fn(u64) -> bool,
        idle: bool,
    ) -> Result<Repair, ClientError> {
        if let Some(i) = self.copying() {
            self.copy_batch(i, held)?;
        } else if let Some(i) = (0..2).find(|i| self.replicas[*i].client.is_none()) {
            if self.pages > 0 && self.readable(1 - i) {
                if let Some(spare) = self.spares.pop_front() {
                    self.start_copy(i, &spare);
                }
            }
        }
        if self.copying().is_none() {
            self.free_one_stale(idle);
        }
        Ok(self.repair_pending())
    }

    /// Allocates the region on `spare` and makes it replica `i`'s copying replica. A spare
    /// that cannot take it is skipped (logged).
    fn start_copy(&mut self, i: usize, spare: &str) {
        let region = self.region;
        let was_stale = self.take_stale(spare);
        let Some(survivor) = self.replicas[1 - i].client.as_ref() else {
            return;
        };
        let made = survivor.connect_like(spare).and_then(|mut c| {
            if was_stale {
                // Its old copy of this region is stale: replace it.
                let _ = c.free_region(region);
            }
            c.alloc_region(region, self.pages).map(|()| c)
        });
        match made {
            Ok(c) => {
                tracing::info!(
                    region,
                    role = role_name(i),
                    server = spare,
                    pages = self.pages,
                    "re-replicating: making a new copy"
                );
                self.replicas[i].client = Some(c);
                self.replicas[i].copying = true;
                self.replicas[i].failure = None;
                self.replicas[i].generation += 1;
                self.copy_next = 0;
                self.health.moved(i, spare, ReplicaState::Copying);
            }
            Err(e) => {
                tracing::warn!(region, server = spare, error = %e, "spare memory server cannot take a new copy; skipped");
            }
        }
    }

    /// Copies the next batch of held pages from the survivor to the copying replica `i`;
    /// at the end, makes it healthy.
    fn copy_batch(&mut self, i: usize, held: &dyn Fn(u64) -> bool) -> Result<(), ClientError> {
        let end = self.copy_next.saturating_add(SCAN_LIMIT).min(self.pages);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut p = self.copy_next;
        while p < end && batch.len() < MAX_BATCH {
            if held(p) {
                batch.push(p);
            }
            p += 1;
        }
        if !batch.is_empty() {
            let region = self.region;
            let mut buf = vec![0u8; batch.len() * PAGE_SIZE];
            let Some(()) = self.run(1 - i, |c| c.read_pages(region, &batch, &mut buf))? else {
                // The survivor failed before the copy was complete: nothing readable is left.
                return Err(self.both_failed());
            };
            match self.run(i, |c| c.write_pages(region, &batch, &buf)) {
                Ok(Some(())) => {}
                // The new copy failed (lost, logged): the next spare, if any.
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.lose(i, &e);
                    return Ok(());
                }
            }
            self.health.copied(batch.len() as u64);
        }
        self.copy_next = p;
        if p >= self.pages {
            self.finish_copy(i);
        }
        Ok(())
    }

    /// The copy on replica `i` is complete: two healthy copies again.
    fn finish_copy(&mut self, i: usize) {
        self.replicas[i].copying = false;
        for r in self.replicas.iter_mut() {
            if let Some(c) = r.client.as_mut() {
                // Another copy can take over again: back to the short deadline.
                c.set_deadline_floor(vnode_common::deadline::FLOOR);
            }
        }
        let server = self.server(role_of(i)).unwrap_or("?").to_string();
        tracing::info!(
            region = self.region,
            role = role_name(i),
            server,
            "re-replicated: two copies again"
        );
        self.health.moved(i, &server, ReplicaState::Healthy);
        self.health.rereplicated();
    }

    /// Records that `addr` failed holding a copy, to free it when it answers again.
    pub(super) fn remember_stale(&mut self, addr: &str) {
        if !self.stale.iter().any(|s| s.addr == addr) {
            self.stale.push(StaleCopy {
                addr: addr.to_string(),
                next_try: Instant::now() + STALE_RETRY_FIRST,
                backoff: STALE_RETRY_FIRST,
            });
            self.report_stale();
        }
    }

    /// Forgets `addr` as a stale copy; true if it was one.
    fn take_stale(&mut self, addr: &str) -> bool {
        let before = self.stale.len();
        self.stale.retain(|s| s.addr != addr);
        let was = self.stale.len() != before;
        if was {
            self.report_stale();
        }
        was
    }

    fn report_stale(&self) {
        self.health
            .set_stale(self.stale.iter().map(|s| s.addr.clone()).collect());
    }

    /// One try to free every stale copy now, whatever their backoff (the owner is going away).
    pub(super) fn free_all_stale(&mut self) {
        let Some(live) = self.replicas.iter().find_map(|r| r.client.as_ref()) else {
            return;
        };
        let region = self.region;
        let mut freed = Vec::new();
        for s in &self.stale {
            match free_on(live, &s.addr, region) {
                Ok(()) => freed.push(s.addr.clone()),
                Err(e) => {
                    tracing::warn!(region, server = %s.addr, error = %e, "stale copy left on a server that does not answer")
                }
            }
        }
        for addr in freed {
            tracing::info!(region, server = %addr, "stale copy freed");
            self.take_stale(&addr);
        }
    }

    /// Tries to free the region on the first stale server due: gone from the list once freed
    /// (or found absent), retried later with backoff while the server does not answer.
    fn free_one_stale(&mut self, idle: bool) {
        let now = Instant::now();
        let due = |s: &StaleCopy| {
            s.next_try <= now && (idle || now.duration_since(s.next_try) >= STALE_FORCE_AFTER)
        };
        let Some(k) = self.stale.iter().position(due) else {
            return;
        };
        let Some(live) = self.replicas.iter().find_map(|r| r.client.as_ref()) else {
            return;
        };
        let region = self.region;
        let addr = self.stale[k].addr.clone();
        match free_on(live, &addr, region) {
            Ok(()) => {
                tracing::info!(region, server = %addr, "stale copy freed on a server that came back");
                self.take_stale(&addr);
            }
            Err(e) => {
                let s = &mut self.stale[k];
                tracing::debug!(region, server = %addr, error = %e, "stale copy not freed yet");
                s.backoff = (s.backoff * 2).min(STALE_RETRY_MAX);
                s.next_try = Instant::now() + s.backoff;
            }
        }
    }
}

/// Frees `region` on `addr`, connecting with `like`'s credential; a region already gone is
/// freed too.
fn free_on(like: &MemClient, addr: &str, region: u64) -> Result<(), ClientError> {
    let mut c = like.connect_like(addr)?;
    match c.free_region(region) {
        Err(e) if e.code() == Some(ErrorCode::NoRegion) => Ok(()),
        r => r,
    }
}

fn role_of(i: usize) -> Role {
    if i == 0 {
        Role::Primary
    } else {
        Role::Backup
    }
}

fn role_name(i: usize) -> &'static str {
    if i == 0 {
        "primary"
    } else {
        "backup"
    }
}
