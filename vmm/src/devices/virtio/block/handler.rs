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
use super::request::{parse, Limits, Request, RequestType, ID_BYTES, SECTOR_SIZE};
use crate::devices::virtio::{Interrupt, DEVICE_PAUSE, INT_USED_RING};
use crate::metrics::{RateLimit, METRICS};

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Guest-triggered problems logged before going quiet (all disks).
static BAD_REQUEST_LOG: RateLimit = RateLimit::new(16);
static BACKEND_ERROR_LOG: RateLimit = RateLimit::new(16);
/// How long a pause waits for the backend to answer requests in flight.
const FINISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the device thread knows about its disk.
#[derive(Clone, Debug)]
pub struct DiskParams {
    pub capacity: u64,
    pub read_only: bool,
    pub id: [u8; ID_BYTES as usize],
    pub limits: Limits,
    /// Data bytes of the requests handed to the backend and not yet answered, at most: a
    /// request that would go over waits (in the ring) until others complete. One request is
    /// always let through, so a request larger than this still runs, alone.
    pub max_in_flight: u64,
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
    /// Data bytes of the requests in `pending`.
    in_flight: u64,
    /// A request popped from the ring that did not fit under `max_in_flight`: the next to go.
    waiting: Option<Pending>,
    broken: bool,
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
            in_flight: 0,
            waiting: None,
            broken: false,
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
            if DEVICE_PAUSE.pausing() {
                self.finish_in_flight(&mut st);
            }
            DEVICE_PAUSE.checkpoint();
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            while let Ok((token, res)) = st.rx.try_recv() {
                if let Some(p) = st.pending.remove(&token) {
                    st.in_flight -= data_bytes(&p.req);
                    self.complete(&mut st, p, res);
                }
            }
            if !st.broken {
                self.drain_queue(&mut st);
            }
            if std::mem::take(&mut st.used) {
                self.interrupt.signal(INT_USED_RING);
            }
        }
    }

    /// Completes every request the backend still holds, and starts and completes the one
    /// waiting for room under the in-flight limit (it is already off the ring), so a paused
    /// device has none half done: a snapshot takes the used ring as the device's position.
    fn finish_in_flight(&mut self, st: &mut State) {
        let deadline = std::time::Instant::now() + FINISH_TIMEOUT;
        loop {
            if st.pending.is_empty() {
                match st.waiting.take() {
                    Some(p) => self.start(st, p),
                    None => break,
                }
                continue;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok((token, res)) = st.rx.recv_timeout(left) else {
                tracing::error!(dev = %self.name, left = st.pending.len(), "requests still in flight at pause");
                break;
            };
            if let Some(p) = st.pending.remove(&token) {
                st.in_flight -= data_bytes(&p.req);
                self.complete(st, p, res);
            }
        }
        if std::mem::take(&mut st.used) {
            self.interrupt.signal(INT_USED_RING);
        }
    }

    /// Starts requests from the ring (the waiting one first) until it is empty or the next
    /// one would take the bytes in flight over the limit.
    fn drain_queue(&mut self, st: &mut State) {
        loop {
            let Some(p) = st.waiting.take().or_else(|| self.next_request(st)) else {
                return;
            };
            let bytes = data_bytes(&p.req);
            if st.in_flight > 0 && st.in_flight + bytes > self.disk.max_in_flight {
                if st.waiting.replace(p).is_none() {
                    METRICS.blk_throttled.inc();
                }
                return;
            }
            self.start(st, p);
        }
    }

    /// Pops chains until one parses; a bad one is answered (or breaks the queue) on the way.
    fn next_request(&mut self, st: &mut State) -> Option<Pending> {
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let f = match parse(&self.mem, chain, self.disk.limits) {
                Ok(req) => return Some(Pending { head, req }),
                Err(f) => f,
            };
            METRICS.blk_bad_requests.inc();
            if BAD_REQUEST_LOG.allow() {
                tracing::warn!(dev = %self.name, "bad request from the guest: {}", f.error);
            }
            match f.status {
                Some(status) => self.finish(st, head, status, S_IOERR, 0),
                None => {
                    // Nothing to report the error through: stop using the queue until the
                    // driver resets the device.
                    st.broken = true;
                    METRICS.blk_broken.inc();
                    self.interrupt.needs_reset();
                    return None;
                }
            }
        }
        None
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
        st.in_flight += data_bytes(&p.req);
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
                METRICS.blk_bytes_read.add(u64::from(len));
                self.finish(st, p.head, r.status, status, len);
            }
            Ok(_) => {
                match r.kind {
                    RequestType::Out => METRICS.blk_bytes_written.add(u64::from(r.data_len)),
                    _ => METRICS.blk_flushes.inc(),
                }
                self.finish(st, p.head, r.status, S_OK, 0);
            }
            Err(e) => {
                if BACKEND_ERROR_LOG.allow() {
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
        METRICS.blk_requests.inc();
        if s == S_IOERR {
            METRICS.blk_io_errors.inc();
        }
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

/// The bytes a request holds while the backend has it (a read's reply, a write's copy).
fn data_bytes(r: &Request) -> u64 {
    match r.kind {
        RequestType::In | RequestType::Out => u64::from(r.data_len),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::backend::Done;
    use crate::devices::virtio::STATUS_DEVICE_NEEDS_RESET;
    use std::sync::atomic::{AtomicU32, AtomicU64};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    /// A RAM disk; `full` makes every write fail as ENOSPC would.
    struct MemDisk {
        data: Mutex<Vec<u8>>,
        full: bool,
        /// The FUA flag of every write, in order.
        fua: Mutex<Vec<bool>>,
        /// Each request completes this long after it was submitted.
        delay: Duration,
        /// Data bytes submitted and not completed yet, and the most seen at once.
        outstanding: Arc<AtomicU64>,
        most: AtomicU64,
    }

    impl BlockBackend for MemDisk {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn submit(&self, op: BlockOp, done: Done) {
            let bytes = match &op {
                BlockOp::Read { len, .. } => u64::from(*len),
                BlockOp::Write { data, .. } => data.len() as u64,
                BlockOp::Flush => 0,
            };
            let now = self.outstanding.fetch_add(bytes, Ordering::SeqCst) + bytes;
            self.most.fetch_max(now, Ordering::SeqCst);
            let mut d = self.data.lock().unwrap();
            let r = match op {
                BlockOp::Read { offset, len } => {
                    Ok(d[offset as usize..offset as usize + len as usize].to_vec())
                }
                BlockOp::Write { .. } if self.full => Err(BackendError::Io(
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                )),
                BlockOp::Write { offset, data, fua } => {
                    self.fua.lock().unwrap().push(fua);
                    d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                    Ok(Vec::new())
                }
                BlockOp::Flush => Ok(Vec::new()),
            };
            drop(d);
            // Complete from another thread, as the NBD client does.
            let (delay, outstanding) = (self.delay, self.outstanding.clone());
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                outstanding.fetch_sub(bytes, Ordering::SeqCst);
                done(r)
            });
        }
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(at + 0x100)).unwrap(); // its status byte
    }

    /// Runs a handler over `descs` (already in the mock queue) until `used` chains are used or
    /// the device needs a reset; returns the device status.
    fn run(mem: &GuestMemoryMmap, descs: &[RawDescriptor], disk: Arc<MemDisk>, used: u16) -> u32 {
        run_at(mem, GuestAddress(0x8000), descs, disk, used, true)
    }

    fn run_at(
        mem: &GuestMemoryMmap,
        qbase: GuestAddress,
        descs: &[RawDescriptor],
        disk: Arc<MemDisk>,
        used: u16,
        writeback: bool,
    ) -> u32 {
        let q = MockSplitQueue::create(mem, qbase, 16);
        q.add_desc_chains(descs, 0).unwrap();
        let status = Arc::new(AtomicU32::new(0));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap(), status.clone()));
        let wake = Arc::new(EventFd::new(0).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let mut id = [0u8; 20];
        id[..5].copy_from_slice(b"disk0");
        let h = Handler {
            mem: mem.clone(),
            queue: q.create_queue().unwrap(),
            wake: wake.clone(),
            stop: stop.clone(),
            interrupt,
            backend: disk,
            disk: DiskParams {
                capacity: 64 * 512,
                read_only: false,
                id,
                limits: Limits {
                    seg_max: 8,
                    size_max: 0x1_0000,
                },
                max_in_flight: 2048,
                writeback,
            },
            name: "blk-test".into(),
        };
        let t = std::thread::spawn(move || h.run());
        wake.write(1).unwrap();
        let t0 = Instant::now();
        while q.used().idx().load() != used
            && status.load(Ordering::Acquire) & STATUS_DEVICE_NEEDS_RESET == 0
        {
            assert!(t0.elapsed() < Duration::from_secs(10), "device stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Release);
        wake.write(1).unwrap();
        t.join().unwrap();
        assert!(irq.read().unwrap() > 0, "no interrupt");
        status.load(Ordering::Acquire)
    }

    fn status_at(mem: &GuestMemoryMmap, hdr: u64) -> u8 {
        mem.read_obj(GuestAddress(hdr + 0x100)).unwrap()
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn disk(full: bool) -> Arc<MemDisk> {
        slow_disk(full, Duration::ZERO)
    }

    fn slow_disk(full: bool, delay: Duration) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; 64 * 512]),
            full,
            fua: Mutex::new(Vec::new()),
            delay,
            outstanding: Arc::new(AtomicU64::new(0)),
            most: AtomicU64::new(0),
        })
    }

    #[test]
    fn a_write_then_a_read_back() {
        let m = mem();
        let (h0, h1, b0, b1) = (0x1_0000, 0x1_1000, 0x2_0000, 0x3_0000);
        header(&m, h0, 1, 3);
        header(&m, h1, 0, 3);
        m.write_slice(&[0xab; 1024], GuestAddress(b0)).unwrap();
        let d = disk(false);
        let descs = [
            raw(h0, 16, N, 1),
            raw(b0, 1024, N, 2),
            raw(h0 + 0x100, 1, W, 0),
            raw(h1, 16, N, 1),
            raw(b1, 1024, W | N, 2),
            raw(h1 + 0x100, 1, W, 0),
        ];
        // Requests in flight together may complete in any order: the read goes in a second
        // run (on a fresh queue).
        assert_eq!(run(&m, &descs[..3], d.clone(), 1), 0);
        assert_eq!(status_at(&m, h0), 0);
        assert_eq!(&d.data.lock().unwrap()[3 * 512..5 * 512], &[0xab; 1024][..]);
        assert_eq!(
            run_at(&m, GuestAddress(0xc000), &descs[3..], d.clone(), 1, true),
            0
        );
        assert_eq!(status_at(&m, h1), 0);
        let mut back = [0u8; 1024];
        m.read_slice(&mut back, GuestAddress(b1)).unwrap();
        assert_eq!(back, [0xab; 1024]);
    }

    #[test]
    fn full_disk_is_an_io_error_and_the_queue_goes_on() {
        let m = mem();
        let (h0, h1, b0) = (0x1_0000, 0x1_1000, 0x2_0000);
        header(&m, h0, 1, 0);
        header(&m, h1, 8, 0); // GET_ID
        let descs = [
            raw(h0, 16, N, 1),
            raw(b0, 512, N, 2),
            raw(h0 + 0x100, 1, W, 0),
            raw(h1, 16, N, 4),
            raw(b0, 20, W | N, 5),
            raw(h1 + 0x100, 1, W, 0),
        ];
        assert_eq!(run(&m, &descs, disk(true), 2), 0);
        assert_eq!(status_at(&m, h0), S_IOERR);
        assert_eq!(status_at(&m, h1), S_OK);
        let mut id = [0u8; 5];
        m.read_slice(&mut id, GuestAddress(b0)).unwrap();
        assert_eq!(&id, b"disk0");
    }

    #[test]
    fn out_of_range_unsupported_and_outside_ram_get_a_status() {
        let m = mem();
        let (h0, h1, h2) = (0x1_0000, 0x1_1000, 0x1_2000);
        header(&m, h0, 0, 63); // reads sectors 63..65 of a 64-sector disk
        header(&m, h1, 42, 0);
        header(&m, h2, 0, 0);
        let descs = [
            raw(h0, 16, N, 1),
            raw(0x2_0000, 1024, W | N, 2),
            raw(h0 + 0x100, 1, W, 0),
            raw(h1, 16, N, 4),
            raw(h1 + 0x100, 1, W, 0),
            raw(h2, 16, N, 6),
            raw(1 << 40, 512, W | N, 7),
            raw(h2 + 0x100, 1, W, 0),
        ];
        assert_eq!(run(&m, &descs, disk(false), 3), 0);
        assert_eq!(status_at(&m, h0), S_IOERR);
        assert_eq!(status_at(&m, h1), S_UNSUPP);
        assert_eq!(status_at(&m, h2), S_IOERR);
    }

    #[test]
    fn writes_are_fua_unless_the_driver_took_flush() {
        let m = mem();
        let h0 = 0x1_0000;
        header(&m, h0, 1, 0);
        let descs = [
            raw(h0, 16, N, 1),
            raw(0x2_0000, 512, N, 2),
            raw(h0 + 0x100, 1, W, 0),
        ];
        let d = disk(false);
        run_at(&m, GuestAddress(0x8000), &descs, d.clone(), 1, true);
        run_at(&m, GuestAddress(0xc000), &descs, d.clone(), 1, false);
        assert_eq!(*d.fua.lock().unwrap(), vec![false, true]);
    }

    #[test]
    fn requests_over_the_bytes_in_flight_wait_and_then_run() {
        let m = mem();
        // Five 1 KiB writes against a 2 KiB cap: two at a time, all done, none refused.
        let descs: Vec<_> = (0..5u16)
            .flat_map(|i| {
                let h = 0x1_0000 + u64::from(i) * 0x1000;
                header(&m, h, 1, u64::from(i) * 2);
                m.write_slice(
                    &[i as u8 + 1; 1024],
                    GuestAddress(0x2_0000 + u64::from(i) * 0x1000),
                )
                .unwrap();
                [
                    raw(h, 16, N, 3 * i + 1),
                    raw(0x2_0000 + u64::from(i) * 0x1000, 1024, N, 3 * i + 2),
                    raw(h + 0x100, 1, W, 0),
                ]
            })
            .collect();
        let d = slow_disk(false, Duration::from_millis(30));
        assert_eq!(run(&m, &descs, d.clone(), 5), 0);
        assert_eq!(d.most.load(Ordering::SeqCst), 2048, "two in flight at most");
        for i in 0..5u16 {
            assert_eq!(status_at(&m, 0x1_0000 + u64::from(i) * 0x1000), S_OK);
            let at = usize::from(i) * 1024;
            assert_eq!(d.data.lock().unwrap()[at..at + 1024], [i as u8 + 1; 1024]);
        }
    }

    #[test]
    fn aliased_buffers_over_size_max_are_an_io_error_without_a_copy() {
        let m = mem();
        // Eight writable 960 KiB buffers aliasing the same guest RAM (as a 4 GiB request would):
        // refused before anything is allocated, and the queue goes on.
        let (h0, h1) = (0x1_0000, 0x1_1000);
        header(&m, h0, 0, 0);
        header(&m, h1, 8, 0);
        let mut descs = vec![raw(h0, 16, N, 1)];
        descs.extend((1..=8).map(|i| raw(0x1_0000, 0xf_0000, W | N, i + 1)));
        descs.push(raw(h0 + 0x100, 1, W, 0));
        descs.extend([
            raw(h1, 16, N, 11),
            raw(0x2_0000, 20, W | N, 12),
            raw(h1 + 0x100, 1, W, 0),
        ]);
        let d = disk(false);
        assert_eq!(run(&m, &descs, d.clone(), 2), 0);
        assert_eq!(status_at(&m, h0), S_IOERR);
        assert_eq!(status_at(&m, h1), S_OK);
        assert_eq!(
            d.most.load(Ordering::SeqCst),
            0,
            "nothing reached the backend"
        );
    }

    #[test]
    fn a_looping_chain_marks_the_device_broken() {
        let m = mem();
        let h0 = 0x1_0000;
        header(&m, h0, 0, 0);
        let descs = [raw(h0, 16, N, 1), raw(0x2_0000, 512, W | N, 0)];
        let status = run(&m, &descs, disk(false), 1);
        assert_ne!(status & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(status_at(&m, h0), 0xff, "nothing was written");
    }
}
