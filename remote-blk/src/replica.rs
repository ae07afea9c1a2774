//! Client-side replication: one logical disk on N NBD servers.
//!
//! Writes, zeroes, trims and flushes go to every replica and complete only when every replica
//! has acknowledged them, so a FUA write or a flush that completes is durable on all of them
//! (DESIGN.md: a write is acknowledged to the guest only when it is durable on every replica
//! it must reach). If any replica fails a write, the write fails: the caller decides whether
//! to stop the VM or drop the replica, never silently. Reads go to the first replica and fail
//! over to the next ones in order.
//!
//! What this does not do (yet): resynchronise a replica that missed writes, or reconfigure
//! the set while running; the manager (GSM) would own both.

use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::nbd::client::{ClientError, Command, Completion, ConnectOptions, NbdClient};

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
}

/// A disk replicated over several NBD exports.
pub struct ReplicatedClient {
    replicas: Arc<Vec<NbdClient>>,
    size: u64,
}

/// Collects the per-replica results of one fanned-out request and completes it once.
struct FanIn {
    left: usize,
    first_error: Option<ClientError>,
    done: Option<Completion>,
}

impl ReplicatedClient {
    /// Connects to every URI; all exports must have the same size.
    pub fn connect(uris: &[&str], opts: &ConnectOptions) -> Result<Self, ReplicaError> {
        if uris.is_empty() {
            return Err(ReplicaError::Empty);
        }
        let replicas = uris
            .iter()
            .enumerate()
            .map(|(index, uri)| {
                NbdClient::connect(uri, opts).map_err(|source| ReplicaError::Connect {
                    index,
                    uri: (*uri).to_owned(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let expected = replicas[0].size();
        if let Some((index, r)) = replicas
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
        Ok(Self {
            replicas: Arc::new(replicas),
            size: expected,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn replicas(&self) -> usize {
        self.replicas.len()
    }

    /// Like [`NbdClient::submit`], but `done` always runs exactly once (this never returns
    /// `Err` today): when every replica answered a write-like command (with the first error if
    /// any failed), or when a replica served a read (after failing over past broken ones).
    pub fn submit(&self, cmd: Command, done: Completion) -> Result<(), ClientError> {
        if let Command::Read { .. } = cmd {
            read_from(Arc::clone(&self.replicas), 0, cmd, done);
            return Ok(());
        }
        let fan = Arc::new(Mutex::new(FanIn {
            left: self.replicas.len(),
            first_error: None,
            done: Some(done),
        }));
        for r in self.replicas.iter() {
            let f = Arc::clone(&fan);
            let res = r.submit(cmd.clone(), Box::new(move |res| fan_in(&f, res.map(drop))));
            if let Err(e) = res {
                fan_in(&fan, Err(e));
            }
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

    /// Reads from the first replica that can serve the range.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ClientError> {
        let mut last = ClientError::Disconnected;
        for r in self.replicas.iter() {
            match r.read_at(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "replica read failed, trying the next");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Writes to every replica; returns when all have it (durably, with `fua`).
    pub fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ClientError> {
        self.call(Command::Write {
            offset,
            data: data.to_vec(),
            fua,
        })
        .map(drop)
    }

    /// Flushes every replica.
    pub fn flush(&self) -> Result<(), ClientError> {
        self.call(Command::Flush).map(drop)
    }
}

fn fan_in(fan: &Mutex<FanIn>, res: Result<(), ClientError>) {
    let finished = {
        let mut f = fan.lock().expect("fan-in lock poisoned");
        if let Err(e) = res {
            f.first_error.get_or_insert(e);
        }
        f.left -= 1;
        if f.left == 0 {
            f.done.take().map(|d| (d, f.first_error.take()))
        } else {
            None
        }
    };
    if let Some((done, err)) = finished {
        done(match err {
            Some(e) => Err(e),
            None => Ok(Vec::new()),
        });
    }
}

/// Sends a read to replica `i`, moving on to the next one when it fails.
fn read_from(replicas: Arc<Vec<NbdClient>>, i: usize, cmd: Command, done: Completion) {
    let Some(r) = replicas.get(i) else {
        done(Err(ClientError::Disconnected));
        return;
    };
    // Reads carry no data: cloning the command for a retry is cheap.
    let retry = cmd.clone();
    // The completion sits in a slot shared by the reply path and the failed-submit path, so
    // whichever runs hands it on to the next replica.
    let slot = Arc::new(Mutex::new(Some(done)));
    let (s2, next) = (Arc::clone(&slot), Arc::clone(&replicas));
    let res = r.submit(
        cmd.clone(),
        Box::new(move |res| {
            let Some(done) = s2.lock().expect("slot lock poisoned").take() else {
                return;
            };
            match res {
                Ok(data) => done(Ok(data)),
                Err(e) => {
                    tracing::warn!(replica = i, error = %e, "replica read failed, failing over");
                    read_from(next, i + 1, retry, done);
                }
            }
        }),
    );
    if res.is_err() {
        let done = slot.lock().expect("slot lock poisoned").take();
        if let Some(done) = done {
            read_from(replicas, i + 1, cmd, done);
        }
    }
}
