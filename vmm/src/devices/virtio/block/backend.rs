//! Where a virtio-blk disk's bytes live: the [`BlockBackend`] trait and its implementations,
//! a local file, an NBD export (`vnode-blkd`, `qemu-nbd`, `nbdkit`) through `remote-blk`'s
//! pipelined client, and an NBD export replicated on a primary and a backup
//! ([`ReplicatedBackend`], `remote-blk`'s `ReplicatedClient`: fail-over, dirty tracking,
//! resync; its state is in the VM's stats). An NBD server that misses its deadline fails the
//! requests in flight: the guest sees an I/O error (counted in `blk_io_errors`), never a hang.
//!
//! Requests are submitted and complete through a callback, so both keep many in flight: NBD
//! pipelines them on its connection, the file backend runs them on a few I/O threads.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use remote_blk::nbd::client::{ClientError, Command, ConnectOptions, NbdClient};
use remote_blk::replica::{ReplicaError, ReplicatedClient, StatusHandle};

/// One backend operation. Offsets and lengths are in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockOp {
    Read {
        offset: u64,
        len: u32,
    },
    /// With `fua`, the data is durable when the operation completes.
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    /// Makes every completed write durable.
    Flush,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    // The io::Error is part of the message, not a `#[source]`: these errors are logged per
    // request, where a one-line message is what helps.
    #[error("cannot open {path}: {err}")]
    Open { path: PathBuf, err: io::Error },
    #[error("{path} is not a regular file or block device of a whole number of 512-byte sectors")]
    BadSize { path: PathBuf },
    #[error("i/o error: {0}")]
    Io(io::Error),
    #[error("nbd: {0}")]
    Nbd(ClientError),
    #[error("replicated nbd disk: {0}")]
    Replica(String),
    #[error("disk credential: {0}")]
    Credential(String),
}

/// Connection options with the export's credential read from `credential_file`, if given.
fn connect_options(credential_file: Option<&Path>) -> Result<ConnectOptions, BackendError> {
    let credential = match credential_file {
        None => None,
        Some(f) => vnode_common::cred::Credential::load(Some(f), "")
            .map_err(|e| BackendError::Credential(format!("{}: {e}", f.display())))?,
    };
    Ok(ConnectOptions {
        credential,
        ..ConnectOptions::default()
    })
}

impl From<ClientError> for BackendError {
    fn from(e: ClientError) -> Self {
        BackendError::Nbd(e)
    }
}

/// Completion of a [`BlockOp`]: the data of a read, empty for the others.
pub type Done = Box<dyn FnOnce(Result<Vec<u8>, BackendError>) + Send>;

pub trait BlockBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Starts `op`; `done` runs exactly once, on any thread, possibly before this returns.
    fn submit(&self, op: BlockOp, done: Done);
}

/// I/O threads per file backend: enough to overlap a few requests on a real disk.
const FILE_THREADS: usize = 4;

type Job = (BlockOp, Done);

/// A local file (or block device), with pread/pwrite/fdatasync on `FILE_THREADS` threads
/// (`blk-file`), which end when the backend is dropped.
pub struct FileBackend {
    file: Arc<File>,
    size: u64,
    read_only: bool,
    jobs: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl FileBackend {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BackendError> {
        let open_err = |err| BackendError::Open {
            path: path.to_owned(),
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let size = std::io::Seek::seek(&mut &file, io::SeekFrom::End(0)).map_err(open_err)?;
        if size == 0 || !size.is_multiple_of(512) {
            return Err(BackendError::BadSize {
                path: path.to_owned(),
            });
        }
        let file = Arc::new(file);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..FILE_THREADS)
            .map(|_| {
                let (file, rx) = (file.clone(), rx.clone());
                std::thread::Builder::new()
                    .name("blk-file".into())
                    .spawn(move || {
                        crate::sandbox::enter_thread(crate::sandbox::ThreadKind::BlockIo);
                        io_thread(&file, &rx)
                    })
                    .map_err(BackendError::Io)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            file,
            size,
            read_only,
            jobs: Some(tx),
            threads,
        })
    }
}

/// Runs jobs until the backend drops its sender.
fn io_thread(file: &File, jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = jobs.lock().expect("job queue lock poisoned").recv();
        let Ok((op, done)) = job else {
            return;
        };
        done(run(file, op).map_err(BackendError::Io));
    }
}

fn run(file: &File, op: BlockOp) -> io::Result<Vec<u8>> {
    match op {
        BlockOp::Read { offset, len } => {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        }
        BlockOp::Write { offset, data, fua } => {
            file.write_all_at(&data, offset)?;
            if fua {
                file.sync_data()?;
            }
            Ok(Vec::new())
        }
        BlockOp::Flush => file.sync_data().map(|()| Vec::new()),
    }
}

impl Drop for FileBackend {
    fn drop(&mut self) {
        drop(self.jobs.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&self, op: BlockOp, done: Done) {
        let sent = match &self.jobs {
            Some(jobs) => jobs.send((op, done)),
            None => Err(mpsc::SendError((op, done))),
        };
        // Only if every I/O thread is gone (they never exit while `jobs` lives): do it here.
        if let Err(mpsc::SendError((op, done))) = sent {
            done(run(&self.file, op).map_err(BackendError::Io));
        }
    }
}

/// An NBD export, with every request pipelined on one connection.
pub struct NbdBackend {
    client: NbdClient,
    read_only: bool,
}

impl NbdBackend {
    /// Connects to `uri` (`nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`).
    /// With `credential_file`, the export's credential is proven to the server (vnode-blkd's
    /// challenge-response) and the server must prove it back.
    pub fn connect(
        uri: &str,
        read_only: bool,
        credential_file: Option<&Path>,
    ) -> Result<Self, BackendError> {
        let client = NbdClient::connect(uri, &connect_options(credential_file)?)?;
        let read_only = read_only || client.info().read_only;
        Ok(Self { client, read_only })
    }

    /// A write with FUA on a server that cannot do FUA: write, then flush, before completing.
    fn write_then_flush(&self, offset: u64, data: &[u8], done: Done) {
        let r = self
            .client
            .write_at(data, offset, false)
            .and_then(|()| self.client.flush());
        done(r.map(|()| Vec::new()).map_err(BackendError::from));
    }
}

impl BlockBackend for NbdBackend {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&self, op: BlockOp, done: Done) {
        let info = self.client.info();
        let cmd = match op {
            BlockOp::Read { offset, len } => Command::Read { offset, len },
            BlockOp::Write { offset, data, fua } if fua && !info.can_fua() => {
                return self.write_then_flush(offset, &data, done);
            }
            BlockOp::Write { offset, data, fua } => Command::Write { offset, data, fua },
            // Without NBD_FLAG_SEND_FLUSH the server writes through: nothing to flush.
            BlockOp::Flush if !info.can_flush() => return done(Ok(Vec::new())),
            BlockOp::Flush => Command::Flush,
        };
        // `submit` drops its completion on failure; keep `done` reachable for that case.
        let slot = Arc::new(Mutex::new(Some(done)));
        let in_reply = slot.clone();
        let res = self.client.submit(
            cmd,
            Box::new(move |r| {
                if let Some(done) = in_reply.lock().expect("done slot poisoned").take() {
                    done(r.map_err(BackendError::from));
                }
            }),
        );
        if let Err(e) = res {
            if let Some(done) = slot.lock().expect("done slot poisoned").take() {
                done(Err(e.into()));
            }
        }
    }
}

/// An NBD export on a primary and a backup server (`--disk URI,backup=URI`).
pub struct ReplicatedBackend {
    client: ReplicatedClient,
    read_only: bool,
}

/// Every replicated disk's status handle, with its primary's URI, for the VM's stats.
static DISK_REPLICATION: Mutex<Vec<(String, StatusHandle)>> = Mutex::new(Vec::new());

impl ReplicatedBackend {
    pub fn connect(
        primary: &str,
        backup: &str,
        read_only: bool,
        credential_file: Option<&Path>,
    ) -> Result<Self, BackendError> {
        let opts = connect_options(credential_file)?;
        let client = ReplicatedClient::connect(&[primary, backup], &opts)
            .map_err(|e: ReplicaError| BackendError::Replica(error_chain(&e)))?;
        DISK_REPLICATION
            .lock()
            .expect("disk registry lock poisoned")
            .push((primary.to_owned(), client.status_handle()));
        Ok(Self { client, read_only })
    }
}

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

impl BlockBackend for ReplicatedBackend {
    fn size(&self) -> u64 {
        self.client.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&self, op: BlockOp, done: Done) {
        let cmd = match op {
            BlockOp::Read { offset, len } => Command::Read { offset, len },
            BlockOp::Write { offset, data, fua } => Command::Write { offset, data, fua },
            BlockOp::Flush => Command::Flush,
        };
        // `submit` always runs its completion (it never returns Err today); should that
        // change, fail the request rather than lose it.
        let slot = Arc::new(Mutex::new(Some(done)));
        let in_reply = slot.clone();
        let res = self.client.submit(
            cmd,
            Box::new(move |r| {
                if let Some(done) = in_reply.lock().expect("done slot poisoned").take() {
                    done(r.map_err(BackendError::from));
                }
            }),
        );
        if let Err(e) = res {
            if let Some(done) = slot.lock().expect("done slot poisoned").take() {
                done(Err(e.into()));
            }
        }
    }
}

/// The replicated disks' replica states as JSON, one object per disk (empty when none).
pub fn replication_json() -> serde_json::Value {
    let disks = DISK_REPLICATION
        .lock()
        .expect("disk registry lock poisoned");
    disks
        .iter()
        .map(|(disk, h)| {
            let s = h.status();
            let replicas: Vec<_> = s
                .replicas
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "uri": r.uri,
                        "state": r.state.as_str(),
                        "dirty_bytes": r.dirty_bytes,
                        "failure": r.failure,
                    })
                })
                .collect();
            serde_json::json!({
                "disk": disk,
                "state": s.state,
                "replicas": replicas,
                "failovers": s.failovers,
                "resyncs": s.resyncs,
                "degraded_since_unix_ms": s.degraded_since_unix_ms,
                "degraded_ms": s.degraded_ms,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_backend_reads_what_it_wrote() {
        let dir = std::env::temp_dir().join(format!("vnode-fb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let b = FileBackend::open(&path, false).unwrap();
        assert_eq!(b.size(), 8192);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = tx.clone();
        b.submit(
            BlockOp::Write {
                offset: 512,
                data: vec![7; 512],
                fua: true,
            },
            Box::new(move |r| t.send(r.is_ok()).unwrap()),
        );
        assert!(rx.recv().unwrap());
        let (dtx, drx) = std::sync::mpsc::channel();
        b.submit(
            BlockOp::Read {
                offset: 512,
                len: 1024,
            },
            Box::new(move |r| dtx.send(r.unwrap()).unwrap()),
        );
        let data = drx.recv().unwrap();
        assert_eq!(&data[..512], &[7; 512][..]);
        assert_eq!(&data[512..], &[0; 512][..]);
        std::fs::write(dir.join("odd.img"), vec![0u8; 100]).unwrap();
        assert!(matches!(
            FileBackend::open(&dir.join("odd.img"), false),
            Err(BackendError::BadSize { .. })
        ));
        assert!(matches!(
            FileBackend::open(&dir.join("missing.img"), false),
            Err(BackendError::Open { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
