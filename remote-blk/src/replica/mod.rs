//! Client-side replication: one logical disk on N NBD servers, kept in step while replicas fail
//! and come back.
//!
//! - **Writes** (and write-zeroes, trims) and **flushes** go to every replica in the write set
//!   (healthy ones, and one being resynced) and complete when all have answered: a FUA write or
//!   a flush that succeeds is durable on every healthy replica (DESIGN.md: a write is acknowledged
//!   only when it is durable on every replica it must reach). A replica that fails a request
//!   (connection lost, deadline missed: see [`crate::nbd::client`]), or that fails where another
//!   succeeded, is dropped from the write set and the request succeeds on the survivors; only
//!   when no healthy replica took it does it fail.
//! - **Dirty tracking**: while a replica is out, every write's chunks are set in its dirty
//!   bitmap ([`bitmap`], 64 KiB chunks), and so are the chunks it had acknowledged but not yet
//!   flushed when it failed (a host crash could lose those).
//! - **Resync** (thread `blk-resync`, [`resync`]): a failed replica is reconnected with backoff
//!   (100 ms doubling to 5 s); it then receives new writes while its dirty chunks are copied from
//!   a healthy replica, and rejoins (healthy, readable) once none is left and a flush made the
//!   copy durable. A chunk with a write in flight is copied only after that write, and a write
//!   landing on the chunk being copied marks it dirty again, so a copy never overwrites newer data.
//! - **Reads** go to the first healthy replica and fail over to the next: a stale (failed or
//!   resyncing) replica is never read.
//!
//! All replicas must support FUA (vnode-blkd, qemu-nbd and nbdkit do). The manager is to
//! replace a replica that never comes back (not done here).

pub mod bitmap;
mod resync;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;

use crate::nbd::client::{ClientError, Command, Completion, ConnectOptions, NbdClient};
use bitmap::Bitmap;

#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error("no replicas given")]
    Empty,
    #[error("replica {index} ({uri})")]
    Connect {
        index: usize,
        uri: String,
        #[source]
        source: ClientError,
    },
    #[error("replica {index} has {size} bytes, replica 0 has {expected}")]
    SizeMismatch {
        index: usize,
        size: u64,
        expected: u64,
    },
    #[error("replica {index} ({uri}) does not support FUA writes")]
    NoFua { index: usize, uri: String },
    #[error("cannot start the resync thread")]
    Spawn(#[source] std::io::Error),
}

/// What a replica is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// In the write set and readable.
    Healthy,
    /// Back, receiving writes while its dirty chunks are copied: never read.
    Resyncing,
    /// Out of the write set; its missed writes are tracked.
    Failed,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Healthy => "healthy",
            ReplicaState::Resyncing => "resyncing",
            ReplicaState::Failed => "failed",
        }
    }
}

/// One replica, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub uri: String,
    pub state: ReplicaState,
    /// Bytes it lacks (dirty chunks x chunk size).
    pub dirty_bytes: u64,
    pub failure: Option<String>,
}

/// The disk's replication at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStatus {
    /// "healthy" (all replicas healthy), "degraded", or "failed" (no healthy replica).
    pub state: &'static str,
    pub replicas: Vec<ReplicaStatus>,
    /// Replicas dropped while another carried on.
    pub failovers: u64,
    /// Replicas brought back by a completed resync.
    pub resyncs: u64,
    pub degraded_since_unix_ms: Option<u64>,
    /// Time spent degraded, the current period included.
    pub degraded_ms: u64,
}

struct Member {
    uri: String,
    client: Option<Arc<NbdClient>>,
    /// A dropped connection, for the resync thread to close (closing joins the connection's
    /// reader thread, which may be the very thread that dropped it).
    retired: Option<Arc<NbdClient>>,
    state: ReplicaState,
    /// Bumped whenever `client` changes: results of an older connection are stale.
    generation: u64,
    dirty: Bitmap,
    /// Chunks acknowledged but not yet covered by a flush.
    unflushed: Bitmap,
    failure: Option<String>,
}

struct SetState {
    members: Vec<Member>,
    /// Writes in flight, per chunk, until every replica answered.
    inflight: HashMap<u64, u32>,
    /// The chunk being copied to a resyncing replica: (replica, chunk).
    copying: Option<(usize, u64)>,
    failovers: u64,
    resyncs: u64,
    degraded_since: Option<(Instant, SystemTime)>,
    degraded_before: Duration,
}

pub(crate) struct Shared {
    size: u64,
    opts: ConnectOptions,
    state: Mutex<SetState>,
    /// Wakes the resync thread (a replica failed, or the client is closing).
    wake: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SetState> {
        // Completions never panic (panic = abort), so the lock is never poisoned.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A disk replicated over several NBD exports.
pub struct ReplicatedClient {
    shared: Arc<Shared>,
    resync: Option<JoinHandle<()>>,
}

/// A replicated disk's status, readable from any thread.
#[derive(Clone)]
pub struct StatusHandle(Arc<Shared>);

impl StatusHandle {
    pub fn status(&self) -> DiskStatus {
        status(&self.0)
    }
}

impl ReplicatedClient {
    /// Connects to every URI (the first is read first); all exports must have the same size
    /// and support FUA.
    pub fn connect(uris: &[&str], opts: &ConnectOptions) -> Result<Self, ReplicaError> {
        if uris.is_empty() {
            return Err(ReplicaError::Empty);
        }
        let mut members = Vec::with_capacity(uris.len());
        for (index, uri) in uris.iter().enumerate() {
            let c = NbdClient::connect(uri, opts).map_err(|source| ReplicaError::Connect {
                index,
                uri: (*uri).to_owned(),
                source,
            })?;
            if !c.info().can_fua() {
                return Err(ReplicaError::NoFua {
                    index,
                    uri: (*uri).to_owned(),
                });
            }
            members.push(c);
        }
        let expected = members[0].size();
        if let Some((index, r)) = members
            .iter()
            .enumerate()
            .find(|(_, r)| r.size() != expected)
        {
            return Err(ReplicaError::SizeMismatch {
                index,
                size: r.size(),
                expected,
            });
        }
        let members = members
            .into_iter()
            .zip(uris)
            .map(|(c, uri)| Member {
                uri: (*uri).to_owned(),
                client: Some(Arc::new(c)),
                retired: None,
                state: ReplicaState::Healthy,
                generation: 0,
                dirty: Bitmap::new(expected),
                unflushed: Bitmap::new(expected),
                failure: None,
            })
            .collect();
        let shared = Arc::new(Shared {
            size: expected,
            opts: opts.clone(),
            state: Mutex::new(SetState {
                members,
                inflight: HashMap::new(),
                copying: None,
                failovers: 0,
                resyncs: 0,
                degraded_since: None,
                degraded_before: Duration::ZERO,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let resync = std::thread::Builder::new()
            .name("blk-resync".into())
            .spawn(move || {
                crate::threads::started(crate::threads::ClientThread::Resync);
                resync::run(&s)
            })
            .map_err(ReplicaError::Spawn)?;
        Ok(Self {
            shared,
            resync: Some(resync),
        })
    }

    pub fn size(&self) -> u64 {
        self.shared.size
    }

    pub fn replicas(&self) -> usize {
        self.shared.lock().members.len()
    }

    pub fn status(&self) -> DiskStatus {
        status(&self.shared)
    }

    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle(Arc::clone(&self.shared))
    }

    /// Like [`NbdClient::submit`], but `done` always runs exactly once (this never returns
    /// `Err` today): for a read, from the first healthy replica that served it; for the others,
    /// once every replica in the write set answered.
    pub fn submit(&self, cmd: Command, done: Completion) -> Result<(), ClientError> {
        if let Command::Read { .. } = cmd {
            read_from(Arc::clone(&self.shared), cmd, done, 0, None);
        } else {
            fan_out(&self.shared, cmd, done);
        }
        Ok(())
    }

    fn call(&self, cmd: Command) -> Result<Vec<u8>, ClientError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(
            cmd,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        rx.recv().map_err(|_| ClientError::Disconnected)?
    }

    /// Reads `buf.len()` bytes (at most one request's worth) at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ClientError> {
        let len = u32::try_from(buf.len()).map_err(|_| ClientError::InvalidRequest)?;
        let data = self.call(Command::Read { offset, len })?;
        if data.len() != buf.len() {
            return Err(ClientError::Protocol("short read".into()));
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Writes to every replica in the write set; returns when all answered (durably, with
    /// `fua`, on every healthy one).
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ClientError> {
        self.call(Command::Write {
            offset,
            data: data.to_vec(),
            fua,
        })
        .map(drop)
    }

    /// Flushes every replica in the write set.
    pub fn flush(&self) -> Result<(), ClientError> {
        self.call(Command::Flush).map(drop)
    }
}

impl Drop for ReplicatedClient {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(t) = self.resync.take() {
            let _ = t.join();
        }
    }
}

fn status(shared: &Shared) -> DiskStatus {
    let st = shared.lock();
    let healthy = st
        .members
        .iter()
        .filter(|m| m.state == ReplicaState::Healthy)
        .count();
    let current = st.degraded_since.map(|(i, _)| i.elapsed());
    DiskStatus {
        state: match healthy {
            0 => "failed",
            n if n == st.members.len() => "healthy",
            _ => "degraded",
        },
        replicas: st
            .members
            .iter()
            .map(|m| ReplicaStatus {
                uri: m.uri.clone(),
                state: m.state,
                dirty_bytes: m.dirty.count() * bitmap::CHUNK,
                failure: m.failure.clone(),
            })
            .collect(),
        failovers: st.failovers,
        resyncs: st.resyncs,
        degraded_since_unix_ms: st.degraded_since.map(|(_, t)| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        }),
        degraded_ms: (st.degraded_before + current.unwrap_or_default()).as_millis() as u64,
    }
}

/// The byte range a command changes, if any.
fn changed_range(cmd: &Command) -> Option<(u64, u64)> {
    match cmd {
        Command::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
        Command::Trim { offset, len } | Command::WriteZeroes { offset, len, .. } => {
            Some((*offset, u64::from(*len)))
        }
        Command::Read { .. } | Command::Flush => None,
    }
}

/// Drops replica `i` from the write set after `why` on its connection `generation`.
fn fail_member(st: &mut SetState, i: usize, generation: u64, why: &ClientError) {
    let others_healthy = st
        .members
        .iter()
        .enumerate()
        .any(|(j, m)| j != i && m.state == ReplicaState::Healthy);
    let m = &mut st.members[i];
    if m.generation != generation || m.state == ReplicaState::Failed {
        return;
    }
    tracing::error!(replica = %m.uri, error = %why, "disk replica failed; dropped from the write set");
    if m.state == ReplicaState::Healthy && others_healthy {
        st.failovers += 1;
    }
    m.state = ReplicaState::Failed;
    m.retired = m.client.take();
    m.generation += 1;
    let unflushed = m.unflushed.take();
    m.dirty.merge(&unflushed);
    m.failure = Some(why.to_string());
    if st.degraded_since.is_none() {
        st.degraded_since = Some((Instant::now(), SystemTime::now()));
    }
}

/// One replica's answer to a fanned-out request.
struct Answer {
    member: usize,
    generation: u64,
    healthy: bool,
    /// For a flush: the chunks it was to make durable.
    flushing: Option<Bitmap>,
    result: Result<(), ClientError>,
}

struct FanIn {
    left: usize,
    answers: Vec<Answer>,
    done: Option<Completion>,
}

/// Sends a write-like command or a flush to every replica in the write set.
fn fan_out(shared: &Arc<Shared>, cmd: Command, done: Completion) {
    let range = changed_range(&cmd);
    let is_flush = matches!(cmd, Command::Flush);
    let mut targets = Vec::new();
    {
        let mut st = shared.lock();
        let copying = st.copying;
        for (i, m) in st.members.iter_mut().enumerate() {
            match (&m.client, m.state) {
                (Some(c), ReplicaState::Healthy | ReplicaState::Resyncing) => {
                    if let (Some((off, len)), Some((ci, cc))) = (range, copying) {
                        if ci == i && Bitmap::chunks(off, len).contains(&cc) {
                            m.dirty.set(cc); // the copy may overwrite this write: copy again
                        }
                    }
                    let flushing = is_flush.then(|| m.unflushed.take());
                    let healthy = m.state == ReplicaState::Healthy;
                    targets.push((i, m.generation, healthy, flushing, Arc::clone(c)));
                }
                _ => {
                    if let Some((off, len)) = range {
                        m.dirty.set_range(off, len);
                    }
                }
            }
        }
        if !targets.iter().any(|t| t.2) {
            drop(st);
            return done(Err(ClientError::Disconnected));
        }
        if let Some((off, len)) = range {
            for c in Bitmap::chunks(off, len) {
                *st.inflight.entry(c).or_default() += 1;
            }
        }
    }
    let fan = Arc::new(Mutex::new(FanIn {
        left: targets.len(),
        answers: Vec::with_capacity(targets.len()),
        done: Some(done),
    }));
    for (member, generation, healthy, flushing, client) in targets {
        let answer = Answer {
            member,
            generation,
            healthy,
            flushing,
            result: Ok(()),
        };
        // The answer travels in a slot shared by the reply path and the failed-submit path.
        let slot = Arc::new(Mutex::new(Some(answer)));
        let (s2, f2, sh2) = (Arc::clone(&slot), Arc::clone(&fan), Arc::clone(shared));
        let res = client.submit(
            cmd.clone(),
            Box::new(move |r| {
                if let Some(a) = s2.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    fan_in(&sh2, &f2, range, a, r.map(drop));
                }
            }),
        );
        if let Err(e) = res {
            if let Some(a) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                fan_in(shared, &fan, range, a, Err(e));
            }
        }
    }
}

fn fan_in(
    shared: &Shared,
    fan: &Mutex<FanIn>,
    range: Option<(u64, u64)>,
    mut answer: Answer,
    result: Result<(), ClientError>,
) {
    answer.result = result;
    let finished = {
        let mut f = fan.lock().unwrap_or_else(|e| e.into_inner());
        f.answers.push(answer);
        f.left -= 1;
        if f.left == 0 {
            f.done.take().map(|d| (d, std::mem::take(&mut f.answers)))
        } else {
            None
        }
    };
    if let Some((done, answers)) = finished {
        done(settle(shared, range, answers));
    }
}

/// Applies every replica's answer to the set: drops the ones that failed where another
/// succeeded (or whose connection failed), tracks what they missed. Returns the request's result.
fn settle(
    shared: &Shared,
    range: Option<(u64, u64)>,
    answers: Vec<Answer>,
) -> Result<Vec<u8>, ClientError> {
    let any_ok = answers.iter().any(|a| a.result.is_ok());
    let healthy_ok = answers.iter().any(|a| a.healthy && a.result.is_ok());
    let mut first_err = None;
    let mut dropped = false;
    {
        let mut st = shared.lock();
        for a in answers {
            let current = st.members[a.member].generation == a.generation;
            match a.result {
                Ok(()) => {
                    let m = &mut st.members[a.member];
                    if let (Some((off, len)), true) = (range, current) {
                        m.unflushed.set_range(off, len);
                    }
                }
                Err(e) => {
                    let drop_it = any_ok || is_transport(&e);
                    if drop_it {
                        fail_member(&mut st, a.member, a.generation, &e);
                        dropped = true;
                    }
                    let m = &mut st.members[a.member];
                    if let Some(f) = &a.flushing {
                        if drop_it || m.state == ReplicaState::Failed {
                            m.dirty.merge(f);
                        } else {
                            m.unflushed.merge(f);
                        }
                    }
                    if let Some((off, len)) = range {
                        if drop_it || m.state == ReplicaState::Failed {
                            m.dirty.set_range(off, len);
                        }
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some((off, len)) = range {
            for c in Bitmap::chunks(off, len) {
                if let Some(n) = st.inflight.get_mut(&c) {
                    *n -= 1;
                    if *n == 0 {
                        st.inflight.remove(&c);
                    }
                }
            }
        }
    }
    if dropped {
        shared.wake.notify_all();
    }
    match (healthy_ok, first_err) {
        (true, _) | (false, None) => Ok(Vec::new()),
        (false, Some(e)) => Err(e),
    }
}

/// A failure of the connection rather than an answer from the server.
fn is_transport(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Disconnected
            | ClientError::Timeout { .. }
            | ClientError::Io(_)
            | ClientError::Protocol(_)
    )
}

/// Sends a read to the first healthy replica not in `tried` (a bit per replica), failing over
/// to the next when it fails.
fn read_from(
    shared: Arc<Shared>,
    cmd: Command,
    done: Completion,
    tried: u64,
    last: Option<ClientError>,
) {
    let pick = {
        let st = shared.lock();
        st.members.iter().enumerate().find_map(|(i, m)| {
            let usable = m.state == ReplicaState::Healthy && tried & (1 << i) == 0;
            match (&m.client, usable) {
                (Some(c), true) => Some((i, m.generation, Arc::clone(c))),
                _ => None,
            }
        })
    };
    let Some((i, generation, client)) = pick else {
        return done(Err(last.unwrap_or(ClientError::Disconnected)));
    };
    let slot = Arc::new(Mutex::new(Some(done)));
    let (s2, sh2, retry) = (Arc::clone(&slot), Arc::clone(&shared), cmd.clone());
    let on_error = move |shared: Arc<Shared>, done: Completion, cmd: Command, e: ClientError| {
        tracing::warn!(replica = i, error = %e, "replica read failed, failing over");
        if is_transport(&e) {
            fail_member(&mut shared.lock(), i, generation, &e);
            shared.wake.notify_all();
        }
        read_from(shared, cmd, done, tried | (1 << i), Some(e));
    };
    let on_err2 = on_error;
    let res = client.submit(
        cmd.clone(),
        Box::new(move |r| {
            let Some(done) = s2.lock().unwrap_or_else(|e| e.into_inner()).take() else {
                return;
            };
            match r {
                Ok(data) => done(Ok(data)),
                Err(e) => on_err2(sh2, done, retry, e),
            }
        }),
    );
    if let Err(e) = res {
        if let Some(done) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
            on_error(shared, done, cmd, e);
        }
    }
}
