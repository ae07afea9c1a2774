//! Minimal polling virtio-mmio (version 2) drivers: the transport steps every driver shares
//! (`negotiate`, `setup_queue`, `driver_ok`), and the block driver for `test=blk`: one split
//! queue, no interrupts (the guest polls the used ring; docs/guest-abi.md allows it), batches of
//! requests in flight at once. The net driver for `test=net` is in `netdrv.rs`.
//!
//! Its memory (queue, headers, status bytes, data buffers) is a caller-given RAM area,
//! identity-mapped, so virtual addresses are the guest-physical addresses the device sees.

use core::sync::atomic::{fence, Ordering};

use crate::port;

/// Slot 0 of vnode's virtio-mmio devices; slot i is at `SLOT0 + i * SLOT_SIZE`.
pub const SLOT0: u64 = 0xd000_0000;
pub const SLOT_SIZE: u64 = 0x1000;
/// Requests in flight per batch; each takes three descriptors.
pub const BATCH: usize = 32;
pub const BUF_BYTES: usize = 4096;
const QSIZE: u16 = 128;
/// Bytes of RAM the driver needs: desc table, avail, used, headers+status, data buffers.
pub const MEM_BYTES: u64 = 4 * 4096 + (BATCH * BUF_BYTES) as u64;
/// How long a batch may take before the driver gives up (~30 s at 2 GHz).
const TIMEOUT_CYCLES: u64 = 60_000_000_000;

const MAGIC: u64 = 0x00;
const VERSION: u64 = 0x04;
const DEVICE_ID: u64 = 0x08;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
pub const QUEUE_NOTIFY: u64 = 0x50;
pub const STATUS: u64 = 0x70;
const QUEUE_DESC: u64 = 0x80;
const QUEUE_DRIVER: u64 = 0x90;
const QUEUE_DEVICE: u64 = 0xa0;
pub const CONFIG: u64 = 0x100;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;
const F_FLUSH: u32 = 1 << 9;
const F_VERSION_1_HI: u32 = 1; // bit 32

pub const D_NEXT: u16 = 1;
pub const D_WRITE: u16 = 2;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    NoDevice,
    Refused,
    QueueTooSmall,
    Timeout,
    NeedsReset,
}

impl Error {
    pub fn what(self) -> &'static str {
        match self {
            Error::NoDevice => "no virtio-blk device in that slot",
            Error::Refused => "device refused the features",
            Error::QueueTooSmall => "device queue too small",
            Error::Timeout => "device did not complete a batch",
            Error::NeedsReset => "device needs a reset",
        }
    }
}

/// One request of a batch: type, sector, bytes of buffer `i` it moves.
#[derive(Clone, Copy)]
pub struct Req {
    pub kind: u32,
    pub sector: u64,
    pub len: u32,
}

pub struct Blk {
    base: u64,
    mem: u64,
    avail_idx: u16,
    pub capacity: u64,
    pub flush: bool,
}

pub fn rd(addr: u64) -> u32 {
    // SAFETY: `addr` is a virtio-mmio register (identity-mapped, user-accessible MMIO);
    // reading it has no effect on memory.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn wr(addr: u64, v: u32) {
    // SAFETY: as in `rd`; the device reacts, guest memory is not touched.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// The device ID in the virtio-mmio slot at `base`, if a version-2 device is there.
pub fn device_id(base: u64) -> Option<u32> {
    (rd(base + MAGIC) == 0x7472_6976 && rd(base + VERSION) == 2).then(|| rd(base + DEVICE_ID))
}

/// Resets the device at `base` (which must be a `device_id` device) and negotiates VERSION_1
/// plus those of the feature bits 0..32 in `wanted` that it offers; returns those accepted.
pub fn negotiate(base: u64, device_id_wanted: u32, wanted: u32) -> Result<u32, Error> {
    if device_id(base) != Some(device_id_wanted) {
        return Err(Error::NoDevice);
    }
    wr(base + STATUS, 0);
    wr(base + STATUS, S_ACK | S_DRIVER);
    wr(base + DEVICE_FEATURES_SEL, 0);
    let lo = rd(base + DEVICE_FEATURES) & wanted;
    wr(base + DEVICE_FEATURES_SEL, 1);
    if rd(base + DEVICE_FEATURES) & F_VERSION_1_HI == 0 {
        return Err(Error::Refused);
    }
    wr(base + DRIVER_FEATURES_SEL, 0);
    wr(base + DRIVER_FEATURES, lo);
    wr(base + DRIVER_FEATURES_SEL, 1);
    wr(base + DRIVER_FEATURES, F_VERSION_1_HI);
    wr(base + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if rd(base + STATUS) & S_FEATURES_OK == 0 {
        return Err(Error::Refused);
    }
    Ok(lo)
}

/// Sets up queue `sel` with `size` entries: descriptor table, available and used ring in the
/// three pages from `mem`, zeroed first.
///
/// # Safety
/// `[mem, mem + 3 * 4096)` must be identity-mapped RAM that only this queue uses.
pub unsafe fn setup_queue(base: u64, sel: u32, mem: u64, size: u16) -> Result<(), Error> {
    wr(base + QUEUE_SEL, sel);
    if rd(base + QUEUE_NUM_MAX) < u32::from(size) {
        return Err(Error::QueueTooSmall);
    }
    // SAFETY: the caller gives us this RAM; zeroed so the rings start empty.
    unsafe { core::ptr::write_bytes(mem as *mut u8, 0, 3 * 4096) };
    wr(base + QUEUE_NUM, u32::from(size));
    for (reg, addr) in [
        (QUEUE_DESC, mem),
        (QUEUE_DRIVER, mem + 4096),
        (QUEUE_DEVICE, mem + 8192),
    ] {
        wr(base + reg, addr as u32);
        wr(base + reg + 4, (addr >> 32) as u32);
    }
    wr(base + QUEUE_READY, 1);
    Ok(())
}

/// The driver is ready: the device starts.
pub fn driver_ok(base: u64) {
    wr(
        base + STATUS,
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );
}

impl Blk {
    /// Finds and starts the device at `base`, using RAM `[mem, mem + MEM_BYTES)`.
    ///
    /// # Safety
    /// That RAM must be identity-mapped, writable, and used by nothing else while `Blk` lives.
    pub unsafe fn init(base: u64, mem: u64) -> Result<Blk, Error> {
        let lo = negotiate(base, 2, F_FLUSH)?;
        // SAFETY: the caller gives us this RAM; the queue takes its first three pages.
        unsafe { setup_queue(base, 0, mem, QSIZE)? };
        driver_ok(base);
        let capacity = u64::from(rd(base + CONFIG)) | (u64::from(rd(base + CONFIG + 4)) << 32);
        Ok(Blk {
            base,
            mem,
            avail_idx: 0,
            capacity,
            flush: lo & F_FLUSH != 0,
        })
    }

    /// Data buffer `i` of the batch.
    pub fn buf(&mut self, i: usize) -> &mut [u8] {
        assert!(i < BATCH);
        let addr = self.mem + 4 * 4096 + (i * BUF_BYTES) as u64;
        // SAFETY: inside the RAM given to `init`, which only this driver uses; `&mut self`
        // makes the borrow exclusive, and the device only touches it inside `run`.
        unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF_BYTES) }
    }

    fn put<T>(&self, addr: u64, v: T) {
        // SAFETY: `addr` is inside the driver's RAM (callers compute it from `mem`).
        unsafe { core::ptr::write_volatile(addr as *mut T, v) }
    }

    fn get<T: Copy>(&self, addr: u64) -> T {
        // SAFETY: as in `put`.
        unsafe { core::ptr::read_volatile(addr as *const T) }
    }

    /// Makes `avail_idx` visible, notifies, and waits until the device has used everything.
    fn publish_and_wait(&mut self) -> Result<(), Error> {
        let (avail, used) = (self.mem + 4096, self.mem + 8192);
        fence(Ordering::SeqCst);
        self.put(avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        wr(self.base + QUEUE_NOTIFY, 0);
        let t0 = port::rdtsc();
        while self.get::<u16>(used + 2) != self.avail_idx {
            if rd(self.base + STATUS) & S_NEEDS_RESET != 0 {
                return Err(Error::NeedsReset);
            }
            if port::rdtsc().wrapping_sub(t0) > TIMEOUT_CYCLES {
                return Err(Error::Timeout);
            }
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Sends one chain made of `descs` (address, length, flags, next) at table index 0, exactly
    /// as given (hostile chains included), with a request header of `kind` for sector 0 at
    /// [`Blk::header_addr`] and a status byte at [`Blk::status_addr`]; returns that byte.
    pub fn raw_chain(&mut self, kind: u32, descs: &[(u64, u32, u16, u16)]) -> Result<u8, Error> {
        let (desc, avail) = (self.mem, self.mem + 4096);
        self.put(self.header_addr(), kind);
        self.put(self.header_addr() + 4, 0u32);
        self.put(self.header_addr() + 8, 0u64);
        self.put(self.status_addr(), 0xffu8);
        for (k, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let e = desc + 16 * k as u64;
            self.put(e, addr);
            self.put(e + 8, len);
            self.put(e + 12, flags);
            self.put(e + 14, next);
        }
        self.put(avail + 4 + 2 * u64::from(self.avail_idx % QSIZE), 0u16);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.publish_and_wait()?;
        Ok(self.get(self.status_addr()))
    }

    /// Where request 0's header and status byte live (for [`Blk::raw_chain`]).
    pub fn header_addr(&self) -> u64 {
        self.mem + 12288
    }

    pub fn status_addr(&self) -> u64 {
        self.mem + 12288 + 16 * BATCH as u64
    }

    /// Data buffer `i`'s address.
    pub fn buf_addr(&self, i: usize) -> u64 {
        self.mem + 4 * 4096 + (i * BUF_BYTES) as u64
    }

    /// Runs a batch (request i uses buffer i) and waits for all of it; returns each status.
    pub fn run(&mut self, reqs: &[Req], status: &mut [u8]) -> Result<(), Error> {
        let (desc, avail, hdrs) = (self.mem, self.mem + 4096, self.mem + 12288);
        for (i, r) in reqs.iter().enumerate() {
            let hdr = hdrs + 16 * i as u64;
            let st = hdrs + 16 * BATCH as u64 + i as u64;
            self.put(hdr, r.kind);
            self.put(hdr + 4, 0u32);
            self.put(hdr + 8, r.sector);
            self.put(st, 0xffu8);
            let buf = self.mem + 4 * 4096 + (i * BUF_BYTES) as u64;
            let d = (3 * i) as u16;
            let dir = if r.kind == T_OUT { 0 } else { D_WRITE };
            let mut chain = [(hdr, 16u32, 0u16), (buf, r.len, dir), (st, 1, D_WRITE)];
            let n = if r.len == 0 {
                chain[1] = chain[2];
                2
            } else {
                3
            };
            for (k, &(addr, len, flags)) in chain[..n].iter().enumerate() {
                let e = desc + 16 * u64::from(d + k as u16);
                let last = k + 1 == n;
                self.put(e, addr);
                self.put(e + 8, len);
                self.put(e + 12, if last { flags } else { flags | D_NEXT });
                self.put(e + 14, if last { 0 } else { d + k as u16 + 1 });
            }
            let slot = (self.avail_idx.wrapping_add(i as u16) % QSIZE) as u64;
            self.put(avail + 4 + 2 * slot, d);
        }
        self.avail_idx = self.avail_idx.wrapping_add(reqs.len() as u16);
        self.publish_and_wait()?;
        for (i, s) in status.iter_mut().enumerate().take(reqs.len()) {
            *s = self.get(hdrs + 16 * BATCH as u64 + i as u64);
        }
        Ok(())
    }
}
