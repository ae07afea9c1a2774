//! [`ReplicatedRegion`]: one region kept on two memory servers, a primary and a backup.
//!
//! Writes go to both (the two round trips overlap); reads go to the primary and fail over to
//! the backup when the primary's connection fails (error, close, a missed deadline: see
//! [`crate::client`]) or its server reports an internal error (such as a page its memory log
//! found damaged). A failed replica is dropped for good, so a read never comes from a copy that
//! missed writes; the handle runs degraded on the other (logged, and recorded in its
//! [`RegionHealth`]: replica states, fail-overs, degraded time), and once
//! both are gone every call fails with [`ClientError::BothFailed`], naming both servers: the
//! VMM stops, it never serves a zero page. A refused request (unknown region, page out of
//! range) is returned as is: it is a bug, not a dead server.
//!
//! Repair (`repair.rs`): a lost replica is replaced by a new copy on a spare server, filled
//! in the background while the region is in use, and the failed server's stale copy is freed
//! once it answers again.
//!
//! Migration: [`ReplicatedRegion::migrate`] moves one replica to another server and switches
//! this handle over. Other handles (other fault threads) still connected to the old server get
//! `Moved` on their next call and follow to the new server by themselves.

mod repair;

pub use repair::Repair;

use std::collections::VecDeque;
use std::sync::Arc;

use crate::client::{MemClient, ReadTicket};
use crate::error::ClientError;
use crate::health::{RegionHealth, ReplicaState};
use crate::protocol::{ErrorCode, MAX_BATCH, PAGE_SIZE};

/// Which copy of a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary = 0,
    Backup = 1,
}

#[derive(Debug)]
struct Replica {
    client: Option<MemClient>,
    /// Why it was dropped, with its causes, for `BothFailed`.
    failure: Option<String>,
    /// Bumped whenever `client` is replaced or dropped: tickets of an older connection are void.
    generation: u64,
    /// Being filled (re-replication): written, never read.
    copying: bool,
}

/// A read submitted with [`ReplicatedRegion::submit_read`].
#[derive(Debug)]
#[must_use = "a submitted read must be completed"]
pub struct ReplicaReadTicket {
    replica: usize,
    generation: u64,
    ticket: ReadTicket,
}

/// A region kept on a primary and a backup server.
#[derive(Debug)]
pub struct ReplicatedRegion {
    region: u64,
    replicas: [Replica; 2],
    health: Arc<RegionHealth>,
    /// The region's size, once allocated or opened (what a new copy is given).
    pages: u64,
    /// Servers to put a new copy on when a replica is lost, in order.
    spares: VecDeque<String>,
    /// While a replica is `copying`: the next page to copy to it.
    copy_next: u64,
    /// Failed servers that may still hold a copy: freed when they answer again.
    stale: Vec<repair::StaleCopy>,
}

/// Most `Moved` redirections followed in one call (a region migrated twice meanwhile).
const MAX_FOLLOW: usize = 3;

impl ReplicatedRegion {
    /// Wraps two connections (normally to two different servers) for `region`.
    pub fn new(region: u64, primary: MemClient, backup: MemClient) -> Self {
        let r = |c| Replica {
            client: Some(c),
            failure: None,
            generation: 0,
            copying: false,
        };
        let health = Arc::new(RegionHealth::new(region, [primary.addr(), backup.addr()]));
        ReplicatedRegion {
            region,
            replicas: [r(primary), r(backup)],
            health,
            pages: 0,
            spares: VecDeque::new(),
            copy_next: 0,
            stale: Vec::new(),
        }
    }

    /// The region's health record (replica states, fail-overs, degraded time), to report on
    /// from another thread.
    pub fn health(&self) -> Arc<RegionHealth> {
        Arc::clone(&self.health)
    }

    pub fn region(&self) -> u64 {
        self.region
    }

    /// True while the region is on fewer than two complete copies.
    pub fn degraded(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| r.client.is_none() || r.copying)
    }

    /// Whether replica `i` can serve reads: alive and complete.
    fn readable(&self, i: usize) -> bool {
        self.replicas[i].client.is_some() && !self.replicas[i].copying
    }

    /// Address of the server reads go to, if any is left.
    pub fn read_server(&self) -> Option<&str> {
        (0..2)
            .find(|i| self.readable(*i))
            .and_then(|i| self.replicas[i].client.as_ref())
            .map(MemClient::addr)
    }

    /// Address of one replica's server, while it is alive.
    pub fn server(&self, role: Role) -> Option<&str> {
        self.replicas[role as usize]
            .client
            .as_ref()
            .map(MemClient::addr)
    }

    /// Allocates the region on both servers.
    pub fn alloc(&mut self, pages: u64) -> Result<(), ClientError> {
        let region = self.region;
        self.on_both(|c| c.alloc_region(region, pages))?;
        self.pages = pages;
        Ok(())
    }

    /// Pings both servers, so an idle region's connections outlive the servers' idle timeout.
    pub fn ping(&mut self) -> Result<(), ClientError> {
        self.on_both(MemClient::ping)
    }

    /// Attaches to the existing region on both servers; both must hold `pages` pages.
    pub fn open(&mut self, pages: u64) -> Result<(), ClientError> {
        let region = self.region;
        self.on_both(|c| c.open_region(region, pages).map(|_| ()))?;
        self.pages = pages;
        Ok(())
    }

    /// Frees the region on both servers, and on every server that held a copy this owner
    /// dropped as failed (a server only slow under load, or back since, would otherwise keep
    /// that stale copy with no owner left to free it).
    pub fn free(&mut self) -> Result<(), ClientError> {
        let region = self.region;
        let r = self.on_both(|c| c.free_region(region));
        self.free_all_stale();
        r
    }

    /// Reads from the primary; if it has failed, from the backup.
    pub fn read_pages(&mut self, pages: &[u64], out: &mut [u8]) -> Result<(), ClientError> {
        let region = self.region;
        for i in 0..2 {
            if !self.readable(i) {
                continue;
            }
            if self.run(i, |c| c.read_pages(region, pages, out))?.is_some() {
                return Ok(());
            }
        }
        Err(self.both_failed())
    }

    /// Split phase: sends a read (up to 256 pages) to the first live replica and returns at
    /// once, so a prefetch can overlap other work.
    pub fn submit_read(&mut self, pages: &[u64]) -> Result<ReplicaReadTicket, ClientError> {
        let region = self.region;
        for i in 0..2 {
            if !self.readable(i) {
                continue;
            }
            if let Some(ticket) = self.run(i, |c| c.submit_read(region, pages))? {
                return Ok(ReplicaReadTicket {
                    replica: i,
                    generation: self.replicas[i].generation,
                    ticket,
                });
            }
        }
        Err(self.both_failed())
    }

    /// Collects a submitted read. `pages` must be the list given to `submit_read`: if the
    /// replica it went to failed (or moved) meanwhile, the read is done again elsewhere.
    pub fn complete_read(
        &mut self,
        t: ReplicaReadTicket,
        pages: &[u64],
        out: &mut [u8],
    ) -> Result<(), ClientError> {
        let r = &mut self.replicas[t.replica];
        if r.generation == t.generation {
            if let Some(c) = r.client.as_mut() {
                match c.complete_read(t.ticket, out) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.moved_to().is_some() => self.follow(t.replica, &e)?,
                    Err(e) if e.replica_failed() => self.lose(t.replica, &e),
                    Err(e) => return Err(e),
                }
            }
        }
        self.read_pages(pages, out)
    }

    /// Writes to both servers, overlapping the two round trips.
    pub fn write_pages(&mut self, pages: &[u64], data: &[u8]) -> Result<(), ClientError> {
        if data.len() != pages.len() * PAGE_SIZE {
            // Let the client produce the error, naming a server.
            let region = self.region;
            return self.on_both(|c| c.write_pages(region, pages, data));
        }
        for (p, d) in pages
            .chunks(MAX_BATCH)
            .zip(data.chunks(MAX_BATCH * PAGE_SIZE))
        {
            self.write_batch(p, d)?;
        }
        Ok(())
    }

    fn write_batch(&mut self, pages: &[u64], data: &[u8]) -> Result<(), ClientError> {
        let region = self.region;
        let mut tickets = [None, None];
        let mut first_err = None;
        for (i, t) in tickets.iter_mut().enumerate() {
            match self.run(i, |c| c.submit_write(region, pages, data)) {
                Ok(ticket) => *t = ticket,
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        for (i, t) in tickets.into_iter().enumerate() {
            let Some(t) = t else { continue };
            let Some(c) = self.replicas[i].client.as_mut() else {
                continue;
            };
            match c.complete_write(t) {
                Ok(()) => {}
                Err(e) if e.moved_to().is_some() => {
                    // Landed on a server the region has left: follow it and write again.
                    if let Err(e) = self.follow(i, &e) {
                        first_err = first_err.or(Some(e));
                    } else if let Err(e) = self.run(i, |c| c.write_pages(region, pages, data)) {
                        first_err = first_err.or(Some(e));
                    }
                }
                Err(e) if e.replica_failed() => self.lose(i, &e),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        // A copy still being filled does not count: it lacks older pages.
        if !(0..2).any(|i| self.readable(i)) {
            return Err(self.both_failed());
        }
        Ok(())
    }

    /// Moves one replica's copy of the region to the server at `target` (a server-to-server
    /// copy; requests on the region wait meanwhile), then switches this handle over.
    pub fn migrate(&mut self, role: Role, target: &str) -> Result<(), ClientError> {
        let i = role as usize;
        let region = self.region;
        let Some(c) = self.replicas[i].client.as_mut() else {
            return Err(self.both_failed());
        };
        c.migrate_region(region, target)?;
        let next = c.connect_like(target)?;
        tracing::info!(region, from = c.addr(), to = target, "region migrated");
        self.health.moved(i, target, ReplicaState::Healthy);
        self.replicas[i].client = Some(next);
        self.replicas[i].generation += 1;
        Ok(())
    }

    /// Runs `f` on replica `i`, following `Moved` redirections. `Ok(None)`: the replica is
    /// (now) gone; `Err`: the server refused the request.
    fn run<T>(
        &mut self,
        i: usize,
        mut f: impl FnMut(&mut MemClient) -> Result<T, ClientError>,
    ) -> Result<Option<T>, ClientError> {
        for _ in 0..=MAX_FOLLOW {
            let Some(c) = self.replicas[i].client.as_mut() else {
                return Ok(None);
            };
            match f(c) {
                Ok(v) => return Ok(Some(v)),
                Err(e) if e.moved_to().is_some() => self.follow(i, &e)?,
                Err(e) if e.replica_failed() => {
                    self.lose(i, &e);
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Refused {
            addr: self
                .server(if i == 0 { Role::Primary } else { Role::Backup })
                .unwrap_or("?")
                .to_string(),
            code: ErrorCode::Moved,
            msg: format!("region {} kept moving", self.region),
        })
    }

    /// Reconnects replica `i` to where its region moved; a target that cannot be reached
    /// loses the replica.
    fn follow(&mut self, i: usize, moved: &ClientError) -> Result<(), ClientError> {
        let (Some(target), Some(c)) = (moved.moved_to(), self.replicas[i].client.as_ref()) else {
            return Ok(());
        };
        tracing::info!(
            region = self.region,
            from = c.addr(),
            to = target,
            "following migrated region"
        );
        match c.connect_like(target) {
            Ok(next) => {
                self.health.moved(i, target, ReplicaState::Healthy);
                self.replicas[i].client = Some(next);
                self.replicas[i].generation += 1;
            }
            Err(e) => self.lose(i, &e),
        }
        Ok(())
    }

    fn on_both(
        &mut self,
        mut f: impl FnMut(&mut MemClient) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        for i in 0..2 {
            self.run(i, &mut f)?;
        }
        if !(0..2).any(|i| self.readable(i)) {
            return Err(self.both_failed());
        }
        Ok(())
    }

    fn lose(&mut self, i: usize, e: &ClientError) {
        let role = if i == 0 { "primary" } else { "backup" };
        tracing::error!(region = self.region, role, error = %e, "memory server failed; replica dropped");
        if let Some(c) = self.replicas[i].client.take() {
            self.remember_stale(c.addr());
        }
        self.replicas[i].copying = false;
        self.replicas[i].generation += 1;
        self.replicas[i].failure = Some(error_chain(e));
        self.health.failed(i, error_chain(e));
        // The survivor now holds the only copy: give it the longer deadline.
        if let Some(c) = self.replicas[1 - i].client.as_mut() {
            c.set_deadline_floor(vnode_common::deadline::SOLE_COPY_FLOOR);
        }
    }

    fn both_failed(&self) -> ClientError {
        let describe = |r: &Replica| {
            r.failure
                .clone()
                .unwrap_or_else(|| String::from("not failed"))
        };
        ClientError::BothFailed {
            region: self.region,
            primary: describe(&self.replicas[0]),
            backup: describe(&self.replicas[1]),
        }
    }
}

/// An error and its sources on one line, for keeping after the error itself is gone.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
