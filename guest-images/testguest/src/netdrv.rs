//! A minimal polling virtio-net driver for `test=net`: VERSION_1 + MAC, receiveq (0) and
//! transmitq (1), no interrupts (the used rings are polled), 12-byte virtio_net_hdr_v1.
//!
//! Receive buffers are 2 KiB each, all posted at start and reposted as soon as read; odd ones
//! are posted as two descriptors (header, data) and even ones as one, so the device's handling
//! of split chains is exercised both ways. Transmit slots are 2 KiB too; every third frame goes
//! out as two descriptors (header, frame), the others as one.
//!
//! Memory (caller-given, identity-mapped): receive queue (3 pages), transmit queue (3 pages),
//! receive buffers, transmit buffers.

use core::sync::atomic::{fence, Ordering};

use crate::port;
use crate::virtio::{
    device_id, driver_ok, negotiate, rd, setup_queue, wr, Error, CONFIG, D_NEXT, D_WRITE,
    QUEUE_NOTIFY, STATUS, S_NEEDS_RESET,
};

pub const VIRTIO_ID_NET: u32 = 1;
const F_MAC: u32 = 1 << 5;
pub const HDR: usize = 12;
const QSIZE: u16 = 256;
pub const RX_BUFS: usize = 128;
pub const TX_SLOTS: usize = 64;
const BUF: usize = 2048;
/// How long one hostile chain may take to come back (~2 s at 2 GHz).
const RAW_TIMEOUT_CYCLES: u64 = 4_000_000_000;
const RXQ: u64 = 0;
const TXQ: u64 = 3 * 4096;
const RX_BUF0: u64 = 6 * 4096;
const TX_BUF0: u64 = RX_BUF0 + (RX_BUFS * BUF) as u64;
/// Bytes of RAM the driver needs.
pub const MEM_BYTES: u64 = TX_BUF0 + (TX_SLOTS * BUF) as u64;

pub struct Net {
    base: u64,
    mem: u64,
    pub mac: [u8; 6],
    rx_avail: u16,
    rx_seen: u16,
    tx_avail: u16,
    tx_done: u16,
}

/// The first slot (of `slots`, from `slot0`, `stride` apart) holding a virtio-net device.
pub fn find(slot0: u64, stride: u64, slots: u64) -> Option<u64> {
    (0..slots)
        .map(|i| slot0 + i * stride)
        .find(|&b| device_id(b) == Some(VIRTIO_ID_NET))
}

impl Net {
    /// Starts the device at `base` with its memory at `mem` and posts every receive buffer.
    ///
    /// # Safety
    /// `[mem, mem + MEM_BYTES)` must be identity-mapped, writable, and used by nothing else
    /// while `Net` lives.
    pub unsafe fn init(base: u64, mem: u64) -> Result<Net, Error> {
        // `find` chose `base`, so NoDevice (worded for virtio-blk) cannot come back.
        if negotiate(base, VIRTIO_ID_NET, F_MAC)? & F_MAC == 0 {
            return Err(Error::Refused);
        }
        // SAFETY: the caller gives us this RAM; each queue takes its own three pages.
        unsafe {
            setup_queue(base, 0, mem + RXQ, QSIZE)?;
            setup_queue(base, 1, mem + TXQ, QSIZE)?;
        }
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = rd(base + CONFIG + i as u64) as u8;
        }
        let mut net = Net {
            base,
            mem,
            mac,
            rx_avail: 0,
            rx_seen: 0,
            tx_avail: 0,
            tx_done: 0,
        };
        for i in 0..RX_BUFS {
            net.write_rx_descs(i);
            net.repost(i);
        }
        net.publish_rx();
        driver_ok(base);
        Ok(net)
    }

    fn put<T>(&self, addr: u64, v: T) {
        // SAFETY: `addr` is inside the driver's RAM (callers compute it from `mem`).
        unsafe { core::ptr::write_volatile(addr as *mut T, v) }
    }

    fn get<T: Copy>(&self, addr: u64) -> T {
        // SAFETY: as in `put`.
        unsafe { core::ptr::read_volatile(addr as *const T) }
    }

    fn desc(&self, queue: u64, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let e = self.mem + queue + 16 * i as u64;
        self.put(e, addr);
        self.put(e + 8, len);
        self.put(e + 12, flags);
        self.put(e + 14, next);
    }

    fn rx_buf_addr(&self, i: usize) -> u64 {
        self.mem + RX_BUF0 + (i * BUF) as u64
    }

    /// Receive buffer `i`: descriptors 2i (and 2i+1 for odd i), head 2i.
    fn write_rx_descs(&self, i: usize) {
        let a = self.rx_buf_addr(i);
        let d = 2 * i;
        if i % 2 == 1 {
            self.desc(RXQ, d, a, HDR as u32, D_WRITE | D_NEXT, d as u16 + 1);
            self.desc(RXQ, d + 1, a + HDR as u64, (BUF - HDR) as u32, D_WRITE, 0);
        } else {
            self.desc(RXQ, d, a, BUF as u32, D_WRITE, 0);
        }
    }

    /// Makes receive buffer `i` available again (seen by the device at the next publish).
    pub fn repost(&mut self, i: usize) {
        let slot = u64::from(self.rx_avail % QSIZE);
        self.put(self.mem + RXQ + 4096 + 4 + 2 * slot, (2 * i) as u16);
        self.rx_avail = self.rx_avail.wrapping_add(1);
    }

    fn publish(&self, queue: u64, idx: u16, sel: u32) {
        fence(Ordering::SeqCst);
        self.put(self.mem + queue + 4096 + 2, idx);
        fence(Ordering::SeqCst);
        wr(self.base + QUEUE_NOTIFY, sel);
    }

    pub fn publish_rx(&self) {
        self.publish(RXQ, self.rx_avail, 0);
    }

    /// The next filled receive buffer: (index, frame without the header). The frame stays valid
    /// until the buffer is reposted.
    pub fn poll_rx(&mut self) -> Option<(usize, &[u8])> {
        let used = self.mem + RXQ + 8192;
        if self.get::<u16>(used + 2) == self.rx_seen {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = used + 4 + 8 * u64::from(self.rx_seen % QSIZE);
        let (id, len) = (self.get::<u32>(e), self.get::<u32>(e + 4) as usize);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let i = (id as usize / 2).min(RX_BUFS - 1);
        let n = len.clamp(HDR, BUF) - HDR;
        let a = self.rx_buf_addr(i) + HDR as u64;
        // SAFETY: inside receive buffer i, which the device has given back and will not touch
        // until it is reposted (`&mut self` keeps that from happening while the slice lives).
        Some((i, unsafe { core::slice::from_raw_parts(a as *const u8, n) }))
    }

    /// Whether a transmit slot is free.
    pub fn tx_free(&mut self) -> bool {
        self.tx_done = self.get(self.mem + TXQ + 8192 + 2);
        (self.tx_avail.wrapping_sub(self.tx_done) as usize) < TX_SLOTS
    }

    /// The frame area of the next transmit slot (call only when `tx_free`).
    pub fn tx_frame(&mut self) -> &mut [u8] {
        let a = self.tx_slot_addr() + HDR as u64;
        // SAFETY: inside the driver's RAM; the slot is free (the device has used it), and
        // `&mut self` makes the borrow exclusive.
        unsafe { core::slice::from_raw_parts_mut(a as *mut u8, BUF - HDR) }
    }

    fn tx_slot_addr(&self) -> u64 {
        self.mem + TX_BUF0 + ((self.tx_avail as usize % TX_SLOTS) * BUF) as u64
    }

    /// Queues the frame of `len` bytes written into `tx_frame` (seen at the next publish).
    pub fn queue_tx(&mut self, len: usize) {
        let k = self.tx_avail as usize % TX_SLOTS;
        let a = self.tx_slot_addr();
        self.put(a, [0u8; HDR]);
        let d = 2 * k;
        if self.tx_avail.is_multiple_of(3) {
            self.desc(TXQ, d, a, HDR as u32, D_NEXT, d as u16 + 1);
            self.desc(TXQ, d + 1, a + HDR as u64, len as u32, 0, 0);
        } else {
            self.desc(TXQ, d, a, (HDR + len) as u32, 0, 0);
        }
        let slot = u64::from(self.tx_avail % QSIZE);
        self.put(self.mem + TXQ + 4096 + 4 + 2 * slot, d as u16);
        self.tx_avail = self.tx_avail.wrapping_add(1);
    }

    pub fn publish_tx(&self) {
        self.publish(TXQ, self.tx_avail, 1);
    }

    /// Sends one transmit chain made of `descs` (address, length, flags, next) exactly as
    /// given (hostile chains included), from descriptor 0, and waits for it: its used length,
    /// or NeedsReset if the device gave up on the queue. Only right after `init`.
    pub fn raw_tx(&mut self, descs: &[(u64, u32, u16, u16)]) -> Result<u32, Error> {
        for (k, &(addr, len, flags, next)) in descs.iter().enumerate() {
            self.desc(TXQ, k, addr, len, flags, next);
        }
        let slot = u64::from(self.tx_avail % QSIZE);
        self.put(self.mem + TXQ + 4096 + 4 + 2 * slot, 0u16);
        self.tx_avail = self.tx_avail.wrapping_add(1);
        self.publish_tx();
        let used = self.mem + TXQ + 8192;
        let t0 = port::rdtsc();
        while self.get::<u16>(used + 2) != self.tx_avail {
            if self.needs_reset() {
                return Err(Error::NeedsReset);
            }
            if port::rdtsc().wrapping_sub(t0) > RAW_TIMEOUT_CYCLES {
                return Err(Error::Timeout);
            }
            core::hint::spin_loop();
        }
        fence(Ordering::SeqCst);
        Ok(self.get(used + 4 + 8 * u64::from(self.tx_avail.wrapping_sub(1) % QSIZE) + 4))
    }

    /// A transmit buffer's address (for building raw chains).
    pub fn tx_buf_addr(&self) -> u64 {
        self.mem + TX_BUF0
    }

    pub fn needs_reset(&self) -> bool {
        rd(self.base + STATUS) & S_NEEDS_RESET != 0
    }
}
