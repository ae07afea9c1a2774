//! Where the ExCache's missing pages come from and where evicted dirty pages go: a `PageSource`.
//! `RemoteSource` speaks to `vnode-memd` servers (one, or a primary and a backup); `LocalSource`
//! keeps pages in this process, so the fault path can be measured without a network (the
//! platform's userfaultfd floor) and tested without servers.

use std::sync::{Arc, OnceLock};

use remote_mem::{
    ClientAuth, ClientError, MemClient, RegionHealth, Repair, ReplicatedRegion, WriteTicket,
};

use super::uffd::PAGE;

/// The largest batch one request may carry (the memory protocol's limit).
pub const MAX_BATCH: usize = remote_mem::protocol::MAX_BATCH;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Remote(#[from] ClientError),
    #[error("page {0} is outside guest RAM")]
    OutOfRange(u64),
    #[error("guest RAM is not replicated (--mem-server PRIMARY,BACKUP): no replica to re-make")]
    NotReplicated,
}

/// A write sent with [`PageSource::submit_write`] and not yet acknowledged.
#[must_use = "a submitted write must be completed"]
pub enum WriteToken {
    /// Already stored (a source that does not pipeline writes).
    Done,
    /// Requests in flight on the single server's connection `conn` (its generation: a
    /// connection replaced since, by following a migrated region, never answers them).
    Sent {
        conn: u64,
        tickets: Vec<WriteTicket>,
    },
}

pub trait PageSource: Send {
    /// Reads `pages` (at most MAX_BATCH) into `out` (PAGE bytes each, in order).
    fn read_pages(&mut self, pages: &[u64], out: &mut [u8]) -> Result<(), SourceError>;
    /// Stores `data` (PAGE bytes per page) as the content of `pages` (any number: a remote
    /// source pipelines them MAX_BATCH at a time).
    fn write_pages(&mut self, pages: &[u64], data: &[u8]) -> Result<(), SourceError>;
    /// Sends `data` as the content of `pages` without waiting for the acknowledgement, which
    /// [`PageSource::complete_write`] collects (sources that cannot pipeline store at once).
    fn submit_write(&mut self, pages: &[u64], data: &[u8]) -> Result<WriteToken, SourceError> {
        self.write_pages(pages, data)?;
        Ok(WriteToken::Done)
    }
    /// Waits until a submitted write is stored; `pages` and `data` are what was submitted (sent
    /// again if the connection they went on was replaced meanwhile).
    fn complete_write(
        &mut self,
        token: WriteToken,
        pages: &[u64],
        data: &[u8],
    ) -> Result<(), SourceError> {
        let _ = (token, pages, data);
        Ok(())
    }
    /// Where the pages live, for messages.
    fn describe(&self) -> String;
    /// The guest is gone: give its pages back (free the region on the servers). Not called when
    /// the VMM dies, so a crash leaves the pages where they are.
    fn release(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    /// One step of repairing replicated pages (re-replication, freeing stale copies): see
    /// [`ReplicatedRegion::repair_step`]. `held(page)`: whether the servers hold `page`.
    fn repair(&mut self, _held: &dyn Fn(u64) -> bool, _idle: bool) -> Result<Repair, SourceError> {
        Ok(Repair::Idle)
    }

    /// Adds a server a lost replica can be re-made on.
    fn add_spare(&mut self, _addr: &str) -> Result<(), SourceError> {
        Err(SourceError::NotReplicated)
    }

    /// Nothing has been asked of the source for a while: keep its connections open (memory
    /// servers close connections idle past their `--idle-timeout`).
    fn keepalive(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
}

/// Pages kept in this process: the no-network baseline.
pub struct LocalSource {
    store: Vec<u8>,
}

impl LocalSource {
    pub fn new(pages: usize) -> Self {
        Self {
            store: vec![0; pages * PAGE],
        }
    }

    fn range(&self, page: u64) -> Result<std::ops::Range<usize>, SourceError> {
        let start = usize::try_from(page).ok().and_then(|p| p.checked_mul(PAGE));
        match start {
            Some(s) if s + PAGE <= self.store.len() => Ok(s..s + PAGE),
            _ => Err(SourceError::OutOfRange(page)),
        }
    }
}

impl PageSource for LocalSource {
    fn read_pages(&mut self, pages: &[u64], out: &mut [u8]) -> Result<(), SourceError> {
        for (i, p) in pages.iter().enumerate() {
            let r = self.range(*p)?;
            out[i * PAGE..(i + 1) * PAGE].copy_from_slice(&self.store[r]);
        }
        Ok(())
    }

    fn write_pages(&mut self, pages: &[u64], data: &[u8]) -> Result<(), SourceError> {
        for (i, p) in pages.iter().enumerate() {
            let r = self.range(*p)?;
            self.store[r].copy_from_slice(&data[i * PAGE..(i + 1) * PAGE]);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "local page store".into()
    }
}

/// The guest's RAM as region 0 of its vNode on one memory server, or replicated on two.
pub enum RemoteSource {
    /// One server's client, and its connection's generation (raised when a migrated region
    /// is followed to a new server).
    Single(Box<MemClient>, u64),
    Replicated(Box<ReplicatedRegion>),
}

/// The region id guest RAM uses on the memory servers.
pub const GUEST_RAM_REGION: u64 = 0;

impl RemoteSource {
    /// Connects to `servers` (one, or primary then backup) and allocates `pages` pages, or,
    /// with `attach`, opens the region of `pages` pages that an earlier VMM of this vNode left
    /// there (a restore).
    pub fn connect(
        servers: &[String],
        auth: &ClientAuth,
        pages: u64,
        attach: bool,
    ) -> Result<Self, SourceError> {
        let mut clients = Vec::with_capacity(servers.len());
        for s in servers {
            clients.push(MemClient::connect(s, auth)?);
        }
        let mut src = match clients.len() {
            1 => {
                let mut c = clients.pop().expect("one client");
                // The only copy: nothing to fail over to, so a longer deadline.
                c.set_deadline_floor(vnode_common::deadline::SOLE_COPY_FLOOR);
                RemoteSource::Single(Box::new(c), 0)
            }
            _ => {
                let backup = clients.pop().expect("two clients");
                let primary = clients.pop().expect("two clients");
                let r = ReplicatedRegion::new(GUEST_RAM_REGION, primary, backup);
                let _ = MEM_REPLICATION.set(r.health());
                RemoteSource::Replicated(Box::new(r))
            }
        };
        match (&mut src, attach) {
            (RemoteSource::Single(c, _), false) => c.alloc_region(GUEST_RAM_REGION, pages)?,
            (RemoteSource::Single(c, _), true) => {
                c.open_region(GUEST_RAM_REGION, pages)?;
            }
            (RemoteSource::Replicated(r), false) => r.alloc(pages)?,
            (RemoteSource::Replicated(r), true) => r.open(pages)?,
        }
        Ok(src)
    }

    /// Gives replicated guest RAM the servers a lost replica is re-made on.
    pub fn with_spares(mut self, spares: &[String]) -> Self {
        if let RemoteSource::Replicated(r) = &mut self {
            for s in spares {
                r.add_spare(s);
            }
        }
        self
    }
}

/// How many `Moved` redirections one request follows before it gives up.
const MAX_FOLLOW: usize = 4;

/// Runs `f` on the single server's client; when the region has moved (a live migration to
/// another memory server), reconnects to the new server with the same credential and runs it
/// again there. Only this request waits; the guest's vCPUs go on.
fn follow_moves<T>(
    c: &mut Box<MemClient>,
    conn: &mut u64,
    mut f: impl FnMut(&mut MemClient) -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let mut hops = 0;
    loop {
        match f(c) {
            Err(e) if hops < MAX_FOLLOW && e.moved_to().is_some() => {
                let target = e.moved_to().unwrap_or_default().to_string();
                tracing::info!(from = c.addr(), to = %target, "guest RAM moved; following it");
                **c = c.connect_like(&target)?;
                *conn += 1;
                hops += 1;
            }
            r => return r,
        }
    }
}

/// The health of replicated guest RAM, when it is replicated (for the VM's stats).
pub static MEM_REPLICATION: OnceLock<Arc<RegionHealth>> = OnceLock::new();

/// Guest RAM's replica states, fail-overs and degraded time as JSON (null when unreplicated).
pub fn replication_json() -> serde_json::Value {
    let Some(h) = MEM_REPLICATION.get() else {
        return serde_json::Value::Null;
    };
    let s = h.snapshot();
    let replicas: Vec<_> = s
        .replicas
        .iter()
        .map(|r| {
            serde_json::json!({
                "role": r.role,
                "server": r.server,
                "state": r.state.as_str(),
                "failure": r.failure,
            })
        })
        .collect();
    serde_json::json!({
        "region": s.region,
        "state": s.state,
        "replicas": replicas,
        "failovers": s.failovers,
        "degraded_since_unix_ms": s.degraded_since_unix_ms,
        "degraded_ms": s.degraded_ms,
        "rereplications": s.rereplications,
        "copied_pages": s.copied_pages,
        "stale_copies": s.stale_copies,
    })
}

impl PageSource for RemoteSource {
    fn read_pages(&mut self, pages: &[u64], out: &mut [u8]) -> Result<(), SourceError> {
        match self {
            RemoteSource::Single(c, conn) => {
                follow_moves(c, conn, |c| c.read_pages(GUEST_RAM_REGION, pages, out))?
            }
            RemoteSource::Replicated(r) => r.read_pages(pages, out)?,
        }
        Ok(())
    }

    fn write_pages(&mut self, pages: &[u64], data: &[u8]) -> Result<(), SourceError> {
        match self {
            RemoteSource::Single(c, conn) => {
                follow_moves(c, conn, |c| c.write_pages(GUEST_RAM_REGION, pages, data))?
            }
            RemoteSource::Replicated(r) => r.write_pages(pages, data)?,
        }
        Ok(())
    }

    fn submit_write(&mut self, pages: &[u64], data: &[u8]) -> Result<WriteToken, SourceError> {
        let RemoteSource::Single(c, conn) = self else {
            self.write_pages(pages, data)?;
            return Ok(WriteToken::Done);
        };
        let mut tickets = Vec::with_capacity(pages.len().div_ceil(MAX_BATCH));
        for (chunk, d) in pages.chunks(MAX_BATCH).zip(data.chunks(MAX_BATCH * PAGE)) {
            tickets.push(c.submit_write(GUEST_RAM_REGION, chunk, d)?);
        }
        Ok(WriteToken::Sent {
            conn: *conn,
            tickets,
        })
    }

    fn complete_write(
        &mut self,
        token: WriteToken,
        pages: &[u64],
        data: &[u8],
    ) -> Result<(), SourceError> {
        let (
            RemoteSource::Single(c, conn),
            WriteToken::Sent {
                conn: sent_on,
                tickets,
            },
        ) = (&mut *self, token)
        else {
            return Ok(());
        };
        let mut moved = *conn != sent_on;
        if !moved {
            for t in tickets {
                match c.complete_write(t) {
                    Err(e) if e.moved_to().is_some() => moved = true,
                    r => r?,
                }
            }
        }
        if moved {
            // The region moved while these were in flight: send them again, following it.
            self.write_pages(pages, data)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        match self {
            RemoteSource::Single(c, _) => format!("memory server {}", c.addr()),
            RemoteSource::Replicated(r) => format!(
                "memory servers {} (primary) and {} (backup)",
                r.server(remote_mem::Role::Primary).unwrap_or("(failed)"),
                r.server(remote_mem::Role::Backup).unwrap_or("(failed)")
            ),
        }
    }

    fn release(&mut self) -> Result<(), SourceError> {
        match self {
            RemoteSource::Single(c, conn) => {
                follow_moves(c, conn, |c| c.free_region(GUEST_RAM_REGION))?
            }
            RemoteSource::Replicated(r) => r.free()?,
        }
        Ok(())
    }

    fn keepalive(&mut self) -> Result<(), SourceError> {
        match self {
            RemoteSource::Single(c, _) => c.ping()?,
            RemoteSource::Replicated(r) => r.ping()?,
        }
        Ok(())
    }

    fn repair(&mut self, held: &dyn Fn(u64) -> bool, idle: bool) -> Result<Repair, SourceError> {
        match self {
            RemoteSource::Single(..) => Ok(Repair::Idle),
            RemoteSource::Replicated(r) => Ok(r.repair_step(held, idle)?),
        }
    }

    fn add_spare(&mut self, addr: &str) -> Result<(), SourceError> {
        match self {
            RemoteSource::Single(..) => Err(SourceError::NotReplicated),
            RemoteSource::Replicated(r) => {
                r.add_spare(addr);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_source_round_trips_and_bounds() {
        let mut s = LocalSource::new(4);
        let data: Vec<u8> = (0..2 * PAGE).map(|i| i as u8).collect();
        s.write_pages(&[3, 1], &data).unwrap();
        let mut out = vec![0u8; 2 * PAGE];
        s.read_pages(&[1, 3], &mut out).unwrap();
        assert_eq!(&out[..PAGE], &data[PAGE..]);
        assert_eq!(&out[PAGE..], &data[..PAGE]);
        assert!(matches!(
            s.read_pages(&[4], &mut out[..PAGE]),
            Err(SourceError::OutOfRange(4))
        ));
    }
}
