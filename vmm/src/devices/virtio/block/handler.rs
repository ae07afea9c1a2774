//! The queue processing of one virtio-blk device, on its own thread (`blk<i>`): it pops every
//! available chain, submits each request to the backend at once (so NBD keeps many in flight),
//! and completes requests as the backend answers, writing data and status into guest memory,
//! filling the used ring and raising the irqfd.
//!
//! One eventfd wakes the thread for everything: queue notifications (ioeventfd or the
//! transport), backend completions and stop. The vCPU threads never wait for backend I/O. The
//! thread may fault on guest memory (userfaultfd-backed RAM); it is never a fault-serving thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{BackendError, BlockBackend, BlockOp};
use super::request::{parse, Request, RequestType, ID_BYTES, SECTOR_SIZE};
use crate::devices::virtio::{Interrupt, INT_USED_RING};

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Guest-triggered problems logged per device before going quiet.
const LOG_LIMIT: u32 = 16;

/// What the device thread knows about its disk.
#[derive(Clone, Debug)]
pub struct DiskParams {
    pub capacity: u64,
    pub read_only: bool,
    pub id: [u8; ID_BYTES as usize],
    pub seg_max: u32,
    /// VIRTIO_BLK_F_FLUSH was negotiated: writes may be cached until a FLUSH. Without it the
    /// device is write-through, so every write goes to the backend with FUA.
    pub writeback: bool,
}

struct Pending {
    head: u16,
    req: Request,
}

type Reply = (u64, Result<Vec<u8>, BackendError>);

pub struct Handler {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub wake: Arc<EventFd>,
    pub stop: Arc<AtomicBool>,
    pub interrupt: Arc<Interrupt>,
    pub backend: Arc<dyn BlockBackend>,
    pub disk: DiskParams,
    pub name: String,
}

struct State {
    tx: Sender<Reply>,
    rx: Receiver<Reply>,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    broken: bool,
    logged: u32,
    used: bool,
}

impl Handler {
    /// Runs until `stop` is set.
    pub fn run(mut self) {
        let (tx, rx) = mpsc::channel();
        let mut st = State {
            tx,
            rx,
            pending: HashMap::new(),
            next_token: 0,
            broken: false,
            logged: 0,
            used: false,
        };
        loop {
            if let Err(e) = self.wake.read() {
                tracing::error!(dev = %self.name, "cannot read the wake eventfd: {e}");
                return;
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if !st.broken {
                self.drain_queue(&mut st);
            }
            while let Ok((token, res)) = st.rx.try_recv() {
                if let Some(p) = st.pending.remove(&token) {
                    self.complete(&mut st, p, res);
                }
            }
            if std::mem::take(&mut st.used) {
                self.interrupt.signal(INT_USED_RING);
            }
        }
    }

    fn drain_queue(&mut self, st: &mut State) {
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            match parse(&self.mem, chain, self.disk.seg_max) {
                Ok(req) => self.start(st, Pending { head, req }),
                Err(f) => {
                    if st.logged < LOG_LIMIT {
                        st.logged += 1;
                        tracing::warn!(dev = %self.name, "bad request from the guest: {}", f.error);
                    }
                    match f.status {
                        Some(status) => self.finish(st, head, status, S_IOERR, 0),
                        None => {
                            // Nothing to report the error through: stop using the queue
                            // until the driver resets the device.
                            st.broken = true;
                            self.interrupt.needs_reset();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Answers at once, or hands the request to the backend.
    fn start(&mut self, st: &mut State, p: Pending) {
        let r = &p.req;
        let op = match r.kind {
            RequestType::Unsupported(_) => {
                return self.finish(st, p.head, r.status, S_UNSUPP, 0);
            }
            RequestType::GetId => {
                let n = self.write_id(r);
                return self.finish(st, p.head, r.status, S_OK, n);
            }
            RequestType::Out if self.disk.read_only => {
                return self.finish(st, p.head, r.status, S_IOERR, 0);
            }
            RequestType::In | RequestType::Out if !self.in_range(r) => {
                return self.finish(st, p.head, r.status, S_IOERR, 0);
            }
            RequestType::In => BlockOp::Read {
                offset: r.sector * SECTOR_SIZE,
                len: r.data_len,
            },
            RequestType::Out => match self.gather(r) {
                Some(data) => BlockOp::Write {
                    offset: r.sector * SECTOR_SIZE,
                    data,
                    fua: !self.disk.writeback,
                },
                None => return self.finish(st, p.head, r.status, S_IOERR, 0),
            },
            RequestType::Flush => BlockOp::Flush,
        };
        let token = st.next_token;
        st.next_token += 1;
        st.pending.insert(token, p);
        let (tx, wake) = (st.tx.clone(), self.wake.clone());
        self.backend.submit(
            op,
            Box::new(move |res| {
                // The device thread may be gone (reset): then the reply has nobody to go to.
                if tx.send((token, res)).is_ok() {
                    let _ = wake.write(1);
                }
            }),
        );
    }

    fn in_range(&self, r: &Request) -> bool {
        r.sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|o| o.checked_add(u64::from(r.data_len)))
            .is_some_and(|end| end <= self.disk.capacity)
    }

    fn gather(&self, r: &Request) -> Option<Vec<u8>> {
        let mut data = vec![0u8; r.data_len as usize];
        let mut at = 0usize;
        for &(addr, len) in &r.data {
            let end = at + len as usize;
            self.mem.read_slice(&mut data[at..end], addr).ok()?;
            at = end;
        }
        Some(data)
    }

    fn write_id(&self, r: &Request) -> u32 {
        let mut left = &self.disk.id[..];
        let mut written = 0;
        for &(addr, len) in &r.data {
            let n = left.len().min(len as usize);
            if n == 0 || self.mem.write_slice(&left[..n], addr).is_err() {
                break;
            }
            left = &left[n..];
            written += n as u32;
        }
        written
    }

    fn complete(&mut self, st: &mut State, p: Pending, res: Result<Vec<u8>, BackendError>) {
        let r = &p.req;
        match res {
            Ok(data) if r.kind == RequestType::In => {
                let ok = data.len() == r.data_len as usize && self.scatter(r, &data);
                let (status, len) = if ok { (S_OK, r.data_len) } else { (S_IOERR, 0) };
                self.finish(st, p.head, r.status, status, len);
            }
            Ok(_) => self.finish(st, p.head, r.status, S_OK, 0),
            Err(e) => {
                if st.logged < LOG_LIMIT {
                    st.logged += 1;
                    tracing::warn!(dev = %self.name, kind = ?r.kind, sector = r.sector, "backend: {e}");
                }
                self.finish(st, p.head, r.status, S_IOERR, 0);
            }
        }
    }

    fn scatter(&self, r: &Request, data: &[u8]) -> bool {
        let mut at = 0usize;
        for &(addr, len) in &r.data {
            let end = at + len as usize;
            if self.mem.write_slice(&data[at..end], addr).is_err() {
                return false;
            }
            at = end;
        }
        true
    }

    /// Writes the status byte and puts the chain in the used ring; `len` counts the data bytes
    /// written to the guest, plus the status byte.
    fn finish(&mut self, st: &mut State, head: u16, status: GuestAddress, s: u8, len: u32) {
        if let Err(e) = self.mem.write_obj(s, status) {
            tracing::warn!(dev = %self.name, "cannot write a status byte: {e}");
        }
        match self.queue.add_used(&self.mem, head, len + 1) {
            Ok(()) => st.used = true,
            Err(e) => {
                tracing::warn!(dev = %self.name, "cannot fill the used ring: {e}");
                st.broken = true;
                self.interrupt.needs_reset();
            }
        }
    }
}
