//! The source side of a live region migration (the protocol is described in `protocol.rs`,
//! "Live migration"): pre-copy passes while the region keeps serving, then a short switch.
//!
//! Pass 1 streams every page that is not zero (the target's new region is zero-filled) in
//! pipelined 256-page `Write` frames over one role-1 connection; writes that land meanwhile
//! mark pages in the region's dirty bitmap, and later passes re-send those until few are left.
//! The switch holds the region's write lock for the last dirty pages and the `Commit` round
//! trip only, so a fault waits at most that long; nothing else about the VMM pauses.

use std::collections::VecDeque;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::metrics::Metrics;
use super::store::{Region, StoreError};
use super::Shared;
use crate::client::{MemClient, WriteTicket};
use crate::protocol::{MAX_BATCH, PAGE_SIZE};
use crate::transport::tcp::TcpConn;
use crate::ClientError;

/// Longest the target may take to answer any one step.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a TCP connect to the target may take (a host that drops SYNs).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pre-copy stops when no more pages than this are dirty: the switch sends them.
const SWITCH_PAGES: u64 = 512;
/// Pre-copy passes after the first, at most (a guest that dirties faster than the copy).
const MAX_PASSES: usize = 8;
/// `Write` frames in flight on the migration connection.
const DEPTH: usize = 16;

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one migration did, for its log line.
#[derive(Debug, Default)]
struct Report {
    passes: usize,
    pages_sent: u64,
    zero_skipped: u64,
    switch_pages: usize,
    switch: Duration,
}

/// Migrates `region` of `vnode` to `target`; returns once the target owns it and this server
/// has freed it (or once the migration failed and the region is still served here).
pub(super) fn migrate_out(
    shared: &Shared,
    vnode: u64,
    region: u64,
    target: &str,
) -> Result<(), StoreError> {
    let store = &shared.store;
    let r = store.region(vnode, region)?;
    r.start_tracking()?;
    tracing::info!(
        vnode,
        region,
        target,
        pages = r.pages,
        "live migration starting"
    );
    let t0 = Instant::now();
    let report = match copy_and_switch(shared, &r, vnode, target) {
        Ok(rep) => rep,
        Err(e) => {
            r.stop_tracking();
            tracing::warn!(vnode, region, target, error = %e, "migration failed; region stays here");
            return Err(StoreError::Migrate {
                target: target.to_string(),
                reason: e.to_string(),
            });
        }
    };
    if let Err(e) = store.mark_moved(vnode, region, target) {
        // Freed by its vNode while it moved: the target's copy must not outlive it.
        free_on_target(shared, vnode, region, target);
        return Err(e);
    }
    Metrics::add(&shared.metrics.regions_migrated, 1);
    tracing::info!(
        vnode,
        region,
        target,
        secs = t0.elapsed().as_secs_f64(),
        passes = report.passes,
        pages_sent = report.pages_sent,
        zero_skipped = report.zero_skipped,
        switch_pages = report.switch_pages,
        switch_ms = report.switch.as_secs_f64() * 1e3,
        "region migrated"
    );
    test_pause("after-switch");
    Ok(())
}

fn copy_and_switch(
    shared: &Shared,
    r: &Arc<Region>,
    vnode: u64,
    target: &str,
) -> Result<Report, MigrateError> {
    test_pause("before-copy");
    let mut s = Sender::connect(shared, vnode, r.id, target)?;
    s.c.migrate_in(r.id, r.pages)?;
    let mut rep = Report::default();
    // Pass 1: everything but zero pages.
    let all: Vec<u64> = (0..r.pages).collect();
    let half = all.len() / 2;
    s.send_region(r, &all[..half], true, &mut rep)?;
    test_pause("mid-copy");
    s.send_region(r, &all[half..], true, &mut rep)?;
    rep.passes = 1;
    while rep.passes <= MAX_PASSES && r.dirty_count() > SWITCH_PAGES {
        let dirty = r.take_dirty();
        s.send_region(r, &dirty, false, &mut rep)?;
        rep.passes += 1;
    }
    s.drain()?;
    test_pause("before-switch");
    let t = Instant::now();
    let switched = r.switch(target, |mem, dirty| -> Result<(), MigrateError> {
        rep.switch_pages = dirty.len();
        for chunk in dirty.chunks(MAX_BATCH) {
            s.buf.clear();
            mem.read_list(chunk, &mut s.buf)?;
            s.submit(chunk)?;
        }
        s.drain()?;
        s.c.commit_region(r.id).map_err(MigrateError::from)
    })?;
    rep.switch = t.elapsed();
    rep.pages_sent += rep.switch_pages as u64;
    if let Err(e) = switched {
        if matches!(&e, MigrateError::Client(c) if c.is_transport()) {
            // The Commit may have reached the target with its reply lost: this server still
            // owns the region, so no copy may stay there.
            free_on_target(shared, vnode, r.id, target);
        }
        return Err(e);
    }
    Ok(rep)
}

/// The role-1 connection to the target, with a bounded pipeline of page writes.
struct Sender {
    c: MemClient,
    region: u64,
    inflight: VecDeque<WriteTicket>,
    buf: Vec<u8>,
    idx: Vec<u64>,
    bandwidth: Option<u64>,
    started: Instant,
    bytes: u64,
}

impl Sender {
    fn connect(
        shared: &Shared,
        vnode: u64,
        region: u64,
        target: &str,
    ) -> Result<Sender, MigrateError> {
        let c = connect_target(shared, vnode, target)?;
        Ok(Sender {
            c,
            region,
            inflight: VecDeque::with_capacity(DEPTH),
            buf: Vec::with_capacity(MAX_BATCH * PAGE_SIZE),
            idx: Vec::with_capacity(MAX_BATCH),
            bandwidth: shared.cfg.migrate_bandwidth,
            started: Instant::now(),
            bytes: 0,
        })
    }

    /// Sends `pages` as they are now, a batch at a time under the region's read lock.
    fn send_region(
        &mut self,
        r: &Region,
        pages: &[u64],
        skip_zero: bool,
        rep: &mut Report,
    ) -> Result<(), MigrateError> {
        for chunk in pages.chunks(MAX_BATCH) {
            self.buf.clear();
            self.idx.clear();
            r.copy_pages(chunk, skip_zero, &mut self.idx, &mut self.buf)?;
            rep.zero_skipped += (chunk.len() - self.idx.len()) as u64;
            rep.pages_sent += self.idx.len() as u64;
            if !self.idx.is_empty() {
                let idx = std::mem::take(&mut self.idx);
                let r = self.submit(&idx);
                self.idx = idx;
                r?;
            }
        }
        Ok(())
    }

    /// Sends `self.buf` as the contents of `pages`, waiting for the oldest write when the
    /// pipeline is full, and keeping under the bandwidth cap.
    fn submit(&mut self, pages: &[u64]) -> Result<(), MigrateError> {
        if self.inflight.len() >= DEPTH {
            if let Some(t) = self.inflight.pop_front() {
                self.c.complete_write(t)?;
            }
        }
        let t = self.c.submit_write(self.region, pages, &self.buf)?;
        self.inflight.push_back(t);
        self.bytes += self.buf.len() as u64;
        if let Some(cap) = self.bandwidth.filter(|&c| c > 0) {
            let due = Duration::from_secs_f64(self.bytes as f64 / cap as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    /// Waits for every write in flight.
    fn drain(&mut self) -> Result<(), MigrateError> {
        while let Some(t) = self.inflight.pop_front() {
            self.c.complete_write(t)?;
        }
        Ok(())
    }
}

/// Connects to `target` as a memory server (role 1) for `vnode`, with bounded waits: a target
/// that never answers fails the migration, it does not freeze the region.
fn connect_target(shared: &Shared, vnode: u64, target: &str) -> Result<MemClient, MigrateError> {
    let err = |source| MigrateError::Connect {
        target: target.to_string(),
        source,
    };
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "resolves to nothing");
    let addrs = target.to_socket_addrs().map_err(err)?;
    for sa in addrs {
        match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
            Ok(stream) => {
                let conn = TcpConn::from_stream(stream, target.to_string()).map_err(err)?;
                let mut c = MemClient::with_conn(Box::new(conn), &shared.keys.as_client(vnode))?;
                c.set_timeout(Some(STEP_TIMEOUT))?;
                return Ok(c);
            }
            Err(e) => last = e,
        }
    }
    Err(err(last))
}

/// Best effort: frees `region` on `target`, where a migration that did not finish here may
/// have left it committed.
fn free_on_target(shared: &Shared, vnode: u64, region: u64, target: &str) {
    let freed = connect_target(shared, vnode, target)
        .and_then(|mut c| c.free_region(region).map_err(MigrateError::from));
    match freed {
        Ok(()) => tracing::warn!(
            vnode,
            region,
            target,
            "freed the target's copy of a migration that did not finish"
        ),
        Err(MigrateError::Client(e)) if e.code() == Some(crate::protocol::ErrorCode::NoRegion) => {}
        Err(e) => {
            tracing::error!(vnode, region, target, error = %e, "cannot free the target's copy of a migration that did not finish: it may hold an orphan")
        }
    }
}

/// Test hook (debug builds only): with `VNODE_MEMD_TEST_PAUSE=STEP` and
/// `VNODE_MEMD_TEST_PAUSE_FILE=PATH`, a migration reaching STEP (`before-copy`, `mid-copy`,
/// `before-switch`, `after-switch`) writes PATH and waits until it is removed (at most 2 min),
/// so a test can kill a process at a known step.
#[cfg(debug_assertions)]
fn test_pause(step: &str) {
    let (Ok(want), Ok(file)) = (
        std::env::var("VNODE_MEMD_TEST_PAUSE"),
        std::env::var("VNODE_MEMD_TEST_PAUSE_FILE"),
    ) else {
        return;
    };
    if want != step {
        return;
    }
    let path = std::path::Path::new(&file);
    if let Err(e) = std::fs::write(path, step) {
        tracing::warn!(error = %e, file, "test hook cannot write its pause file");
        return;
    }
    tracing::warn!(
        step,
        file,
        "test hook: migration paused until the pause file is removed"
    );
    let t = Instant::now();
    while path.exists() && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(not(debug_assertions))]
fn test_pause(_step: &str) {}
