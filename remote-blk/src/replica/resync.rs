//! The `blk-resync` thread of a replicated disk: closes the connections of failed replicas,
//! reconnects them with backoff, copies their dirty chunks from a healthy replica while new
//! writes also reach them, and returns them to the write set when the copy is complete and
//! durable.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bitmap::{Bitmap, CHUNK};
use super::{fail_member, ReplicaState, Shared};
use crate::nbd::client::{ClientError, NbdClient};

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// How long to wait for a write in flight on a chunk before trying to copy it again.
const INFLIGHT_WAIT: Duration = Duration::from_millis(1);

pub(super) fn run(shared: &Arc<Shared>) {
    let n = shared.lock().members.len();
    // Per replica: the next reconnection attempt and the backoff after it.
    let mut retry: Vec<(Instant, Duration)> = vec![(Instant::now(), FIRST_RETRY); n];
    while !shared.stop.load(Ordering::Acquire) {
        // Close dropped connections here: closing joins their reader threads.
        let retired: Vec<_> = shared
            .lock()
            .members
            .iter_mut()
            .filter_map(|m| m.retired.take())
            .collect();
        drop(retired);
        let due = {
            let st = shared.lock();
            let has_source = st.members.iter().any(|m| m.state == ReplicaState::Healthy);
            st.members
                .iter()
                .enumerate()
                .find(|(i, m)| {
                    has_source && m.state == ReplicaState::Failed && retry[*i].0 <= Instant::now()
                })
                .map(|(i, m)| (i, m.uri.clone()))
        };
        if let Some((i, uri)) = due {
            match reconnect(shared, &uri) {
                Ok(client) => {
                    retry[i] = (Instant::now(), FIRST_RETRY);
                    resync(shared, i, client);
                }
                Err(e) => {
                    tracing::debug!(replica = %uri, error = %e, "replica still unreachable");
                    let backoff = retry[i].1;
                    retry[i] = (Instant::now() + backoff, (backoff * 2).min(MAX_RETRY));
                }
            }
            continue;
        }
        let next = retry
            .iter()
            .map(|(t, _)| t.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(MAX_RETRY)
            .clamp(Duration::from_millis(10), MAX_RETRY);
        let st = shared.lock();
        let _ = shared.wake.wait_timeout(st, next);
    }
}

fn reconnect(shared: &Shared, uri: &str) -> Result<NbdClient, ClientError> {
    let c = NbdClient::connect(uri, &shared.opts)?;
    if c.size() != shared.size || !c.info().can_fua() {
        return Err(ClientError::Protocol(format!(
            "export changed: {} bytes (want {}), FUA {}",
            c.size(),
            shared.size,
            c.info().can_fua()
        )));
    }
    Ok(c)
}

/// What to do next in a resync.
enum Step {
    Copy(u64, Arc<NbdClient>),
    /// Only chunks with writes in flight are left: wait for them.
    Wait,
    /// Nothing dirty: flush, then rejoin.
    Done,
    /// The replica failed again, or the disk is closing.
    Abort,
}

/// Brings replica `i` back on `client`: into the write set at once, readable once its dirty
/// chunks are copied and flushed.
fn resync(shared: &Arc<Shared>, i: usize, client: NbdClient) {
    let client = Arc::new(client);
    let generation = {
        let mut st = shared.lock();
        let m = &mut st.members[i];
        m.client = Some(Arc::clone(&client));
        m.state = ReplicaState::Resyncing;
        m.generation += 1;
        m.unflushed = Bitmap::new(shared.size);
        tracing::info!(replica = %m.uri, dirty_chunks = m.dirty.count(), "disk replica back; resyncing");
        m.generation
    };
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        match next_step(shared, i, generation) {
            Step::Abort => return,
            Step::Wait => std::thread::sleep(INFLIGHT_WAIT),
            Step::Copy(chunk, source) => {
                if let Err(e) = copy_chunk(shared, &source, &client, chunk, &mut buf) {
                    let mut st = shared.lock();
                    st.copying = None;
                    st.members[i].dirty.set(chunk);
                    if let CopyError::Target(e) = e {
                        fail_member(&mut st, i, generation, &e);
                        return;
                    }
                    drop(st);
                    // The source failed: the guest's own requests will drop it; try again.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                shared.lock().copying = None;
            }
            Step::Done => {
                if let Err(e) = client.flush() {
                    fail_member(&mut shared.lock(), i, generation, &e);
                    return;
                }
                if rejoin(shared, i, generation) {
                    return;
                }
            }
        }
    }
}

fn next_step(shared: &Shared, i: usize, generation: u64) -> Step {
    let mut st = shared.lock();
    if shared.stop.load(Ordering::Acquire)
        || st.members[i].generation != generation
        || st.members[i].state != ReplicaState::Resyncing
    {
        return Step::Abort;
    }
    if st.members[i].dirty.is_clean() {
        return Step::Done;
    }
    let pick = {
        let inflight = &st.inflight;
        st.members[i]
            .dirty
            .first_where(|c| inflight.contains_key(&c))
    };
    let source = st
        .members
        .iter()
        .find(|m| m.state == ReplicaState::Healthy)
        .and_then(|m| m.client.clone());
    match (pick, source) {
        (_, None) => Step::Abort,
        (None, Some(_)) => Step::Wait,
        (Some(c), Some(source)) => {
            st.members[i].dirty.clear(c);
            st.copying = Some((i, c));
            Step::Copy(c, source)
        }
    }
}

enum CopyError {
    Source,
    Target(ClientError),
}

fn copy_chunk(
    shared: &Shared,
    source: &NbdClient,
    target: &NbdClient,
    chunk: u64,
    buf: &mut [u8],
) -> Result<(), CopyError> {
    let off = chunk * CHUNK;
    let len = CHUNK.min(shared.size - off) as usize;
    source
        .read_at(&mut buf[..len], off)
        .map_err(|_| CopyError::Source)?;
    target
        .write_at(&buf[..len], off, false)
        .map_err(CopyError::Target)
}

/// Returns replica `i` to the write set if nothing became dirty meanwhile; true when done.
fn rejoin(shared: &Shared, i: usize, generation: u64) -> bool {
    let mut st = shared.lock();
    let m = &mut st.members[i];
    if m.generation != generation || m.state != ReplicaState::Resyncing {
        return true;
    }
    if !m.dirty.is_clean() {
        return false;
    }
    m.state = ReplicaState::Healthy;
    m.failure = None;
    tracing::info!(replica = %m.uri, "disk replica resynced; healthy again");
    st.resyncs += 1;
    if st.members.iter().all(|m| m.state == ReplicaState::Healthy) {
        if let Some((since, _)) = st.degraded_since.take() {
            st.degraded_before += since.elapsed();
        }
    }
    true
}
