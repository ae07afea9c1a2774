//! The queue processing of one virtio-net device, on its own thread (`net<i>`). It waits with
//! epoll on the queue-notify eventfd (both queues share it) and on the TAP:
//!
//! - TX: every available transmit chain (header + frame, over any number of descriptors) is
//!   copied out of guest memory and written to the TAP as one frame, then returned used.
//! - RX: while the guest has posted receive chains, frames are read from the TAP into them
//!   (header fixed up, used length = header + frame). When no receive chain is left the TAP is
//!   dropped from the epoll set, so frames wait in the TAP's queue until the guest notifies.
//!
//! A bad chain is returned used and empty (the frame dropped); a chain that cannot be followed
//! (loop, broken link) puts the device in DEVICE_NEEDS_RESET and the queues are left alone
//! until the driver resets it. Nothing the guest writes can stop the thread otherwise.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{parse, Buffers, Direction, ParseFailure};
use super::tap::{Tap, VNET_HDR_LEN};
use crate::devices::virtio::{Interrupt, DEVICE_PAUSE, INT_USED_RING};
use crate::metrics::{Counter, RateLimit, METRICS};

/// The largest frame with its header either way: a 64 KiB IP packet in an Ethernet frame
/// with a VLAN tag. Without offloads frames are MTU-sized; this only bounds the buffers.
pub const MAX_PACKET: usize = VNET_HDR_LEN + 65535 + 18;
/// Frames moved per queue before the other queue and the interrupt get a turn.
const BUDGET: usize = 64;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
const WAKE: u64 = 0;
const TAP: u64 = 1;
/// Guest-triggered problems logged before going quiet (all net devices).
static BAD_CHAIN_LOG: RateLimit = RateLimit::new(16);
static TAP_ERROR_LOG: RateLimit = RateLimit::new(16);
static RX_TOO_BIG_LOG: RateLimit = RateLimit::new(16);

/// What the thread has done, for tests and the log at stop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Transmit frames the guest sent badly or the TAP refused.
    pub tx_dropped: u64,
    /// Received frames larger than the guest's buffer.
    pub rx_dropped: u64,
    pub bad_chains: u64,
}

/// Counts one event in the thread's stats and in the VM's metrics.
fn count(local: &mut u64, global: &Counter) {
    *local += 1;
    global.inc();
}

impl NetStats {
    fn sent(&mut self, len: usize) {
        count(&mut self.tx_frames, &METRICS.net_tx_frames);
        METRICS
            .net_tx_bytes
            .add(len.saturating_sub(VNET_HDR_LEN) as u64);
    }

    fn received(&mut self, len: usize) {
        count(&mut self.rx_frames, &METRICS.net_rx_frames);
        METRICS
            .net_rx_bytes
            .add(len.saturating_sub(VNET_HDR_LEN) as u64);
    }
}

pub struct Handler {
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub tap: Arc<Tap>,
    pub wake: Arc<EventFd>,
    pub stop: Arc<AtomicBool>,
    pub interrupt: Arc<Interrupt>,
    pub name: String,
}

struct State {
    epoll: Epoll,
    /// The TAP is in the epoll set (the guest has receive buffers, or we have not looked).
    tap_armed: bool,
    /// A receive chain popped but not yet filled.
    rx_chain: Option<Buffers>,
    buf: Vec<u8>,
    broken: bool,
    /// Chains were used since the last interrupt: (receive queue, transmit queue).
    used: (bool, bool),
    stats: NetStats,
}

impl Handler {
    /// Runs until `stop` is set; returns what it did.
    pub fn run(mut self) -> NetStats {
        let mut st = match self.setup() {
            Ok(st) => st,
            Err(e) => {
                tracing::error!(dev = %self.name, "cannot set up epoll: {e}");
                self.interrupt.needs_reset();
                return NetStats::default();
            }
        };
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match st.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(dev = %self.name, "epoll_wait: {e}");
                    return st.stats;
                }
            };
            let mut notified = false;
            for ev in &events[..n] {
                if ev.data() == WAKE {
                    if let Err(e) = self.wake.read() {
                        tracing::error!(dev = %self.name, "cannot read the wake eventfd: {e}");
                        return st.stats;
                    }
                    notified = true;
                }
            }
            DEVICE_PAUSE.checkpoint();
            if self.stop.load(Ordering::Acquire) {
                tracing::debug!(dev = %self.name, stats = ?st.stats, "net device stopped");
                return st.stats;
            }
            if !st.broken {
                if notified {
                    self.process_tx(&mut st);
                }
                self.process_rx(&mut st);
            }
            let used = std::mem::take(&mut st.used);
            if self.wants_interrupt(used) {
                self.interrupt.signal(INT_USED_RING);
            }
        }
    }

    /// Whether the driver wants an interrupt for the chains just used (`used`: on the receive,
    /// on the transmit queue): not if it set VRING_AVAIL_F_NO_INTERRUPT on each such queue
    /// (Linux does while NAPI polls; every interrupt is costly for a guest kernel whose
    /// supervisor mode is emulated). No EVENT_IDX is offered, so the flag is the only hint
    /// (virtio 1.2, 2.7.7.2).
    fn wants_interrupt(&self, used: (bool, bool)) -> bool {
        // The used-ring writes must be visible before the flags are read.
        std::sync::atomic::fence(Ordering::SeqCst);
        let wants = |q: &Queue| {
            self.mem
                .read_obj::<u16>(GuestAddress(q.avail_ring()))
                .map_or(true, |flags| flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
        };
        (used.0 && wants(&self.rx)) || (used.1 && wants(&self.tx))
    }

    fn setup(&self) -> io::Result<State> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        let mut st = State {
            epoll,
            tap_armed: false,
            rx_chain: None,
            buf: vec![0; MAX_PACKET],
            broken: false,
            used: (false, false),
            stats: NetStats::default(),
        };
        self.arm_tap(&mut st, true);
        Ok(st)
    }

    /// Adds the TAP to the epoll set or takes it out.
    fn arm_tap(&self, st: &mut State, on: bool) {
        if st.tap_armed == on {
            return;
        }
        let (op, ev) = if on {
            (ControlOperation::Add, EpollEvent::new(EventSet::IN, TAP))
        } else {
            (ControlOperation::Delete, EpollEvent::default())
        };
        match st.epoll.ctl(op, self.tap.as_raw_fd(), ev) {
            Ok(()) => st.tap_armed = on,
            Err(e) => tracing::error!(dev = %self.name, "cannot change the TAP's epoll entry: {e}"),
        }
    }

    /// Handles a chain the parser refused: returned empty if it can be, else the device breaks.
    fn refuse(&mut self, st: &mut State, f: ParseFailure, queue: Direction) {
        count(&mut st.stats.bad_chains, &METRICS.net_bad_chains);
        if BAD_CHAIN_LOG.allow() {
            tracing::warn!(dev = %self.name, ?queue, "bad chain from the guest: {}", f.error);
        }
        if f.error.recoverable() {
            self.add_used(st, queue, f.head, 0);
        } else {
            self.break_device(st);
        }
    }

    fn break_device(&self, st: &mut State) {
        st.broken = true;
        METRICS.net_broken.inc();
        st.rx_chain = None;
        self.arm_tap(st, false);
        self.interrupt.needs_reset();
    }

    fn add_used(&mut self, st: &mut State, queue: Direction, head: u16, len: u32) {
        let q = match queue {
            Direction::Tx => &mut self.tx,
            Direction::Rx => &mut self.rx,
        };
        match q.add_used(&self.mem, head, len) {
            Ok(()) => match queue {
                Direction::Rx => st.used.0 = true,
                Direction::Tx => st.used.1 = true,
            },
            Err(e) => {
                tracing::warn!(dev = %self.name, "cannot fill the used ring: {e}");
                self.break_device(st);
            }
        }
    }

    /// Sends every available transmit chain (up to the budget; a notification for the rest is
    /// made up by writing the wake eventfd).
    fn process_tx(&mut self, st: &mut State) {
        for _ in 0..BUDGET {
            let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) else {
                return;
            };
            let bufs = match parse(&self.mem, chain, Direction::Tx, MAX_PACKET as u32) {
                Ok(b) => b,
                Err(f) => {
                    self.refuse(st, f, Direction::Tx);
                    if st.broken {
                        return;
                    }
                    continue;
                }
            };
            self.send(st, &bufs);
            self.add_used(st, Direction::Tx, bufs.head, 0);
            if st.broken {
                return;
            }
        }
        // More may be waiting: come back after the receive side had its turn.
        let _ = self.wake.write(1);
    }

    fn send(&self, st: &mut State, bufs: &Buffers) {
        let frame = &mut st.buf[..bufs.len as usize];
        if let Err(e) = bufs.gather(&self.mem, frame) {
            count(&mut st.stats.tx_dropped, &METRICS.net_tx_dropped);
            if BAD_CHAIN_LOG.allow() {
                tracing::warn!(dev = %self.name, "cannot read a transmit buffer: {e}");
            }
            return;
        }
        match self.tap.write_frame(frame) {
            Ok(_) => st.stats.sent(frame.len()),
            Err(e) => {
                // Full TAP queue, interface down, a frame the kernel refuses: dropped, as a
                // NIC would.
                count(&mut st.stats.tx_dropped, &METRICS.net_tx_dropped);
                if TAP_ERROR_LOG.allow() {
                    tracing::warn!(dev = %self.name, tap = self.tap.name(), "TAP write: {e}");
                }
            }
        }
    }

    /// Moves frames from the TAP into receive chains while both are there.
    fn process_rx(&mut self, st: &mut State) {
        for _ in 0..BUDGET {
            if st.rx_chain.is_none() {
                let Some(chain) = self.rx.pop_descriptor_chain(&self.mem) else {
                    // No buffer: leave frames in the TAP until the guest posts some.
                    self.arm_tap(st, false);
                    return;
                };
                match parse(&self.mem, chain, Direction::Rx, MAX_PACKET as u32) {
                    Ok(b) => st.rx_chain = Some(b),
                    Err(f) => {
                        self.refuse(st, f, Direction::Rx);
                        if st.broken {
                            return;
                        }
                        continue;
                    }
                }
            }
            let n = match self.tap.read_frame(&mut st.buf) {
                Ok(0) => {
                    // End of file: only a closed test socket does this. As for errors below.
                    self.arm_tap(st, false);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.arm_tap(st, true);
                    return;
                }
                Err(e) => {
                    // A TAP that fails reads (deleted under us: EBADFD) would keep epoll
                    // spinning: stop watching it; the next guest notification tries again.
                    if TAP_ERROR_LOG.allow() {
                        tracing::warn!(dev = %self.name, tap = self.tap.name(), "TAP read: {e}");
                    }
                    self.arm_tap(st, false);
                    return;
                }
            };
            self.receive(st, n);
            if st.broken {
                return;
            }
        }
        // Budget spent: the armed TAP (level-triggered) or this wake brings us back.
        self.arm_tap(st, true);
    }

    /// Puts the `n`-byte frame (with its header) in `st.buf` into the pending receive chain,
    /// or drops it if it does not fit (the chain waits for the next frame).
    fn receive(&mut self, st: &mut State, n: usize) {
        let bufs = st.rx_chain.as_ref().expect("process_rx popped a chain");
        if n < VNET_HDR_LEN || n > bufs.len as usize {
            count(&mut st.stats.rx_dropped, &METRICS.net_rx_dropped);
            if RX_TOO_BIG_LOG.allow() {
                tracing::warn!(dev = %self.name, frame = n, buffer = bufs.len, "received frame does not fit the guest's buffer: dropped");
            }
            return;
        }
        // No offloads are negotiated: flags, GSO and checksum fields are zero (virtio 1.2,
        // 5.1.6.4.1), and without MRG_RXBUF num_buffers is 1. The TAP fills only the first
        // ten bytes of the header.
        st.buf[..VNET_HDR_LEN].fill(0);
        st.buf[10..12].copy_from_slice(&1u16.to_le_bytes());
        let bufs = st.rx_chain.take().expect("checked above");
        match bufs.scatter(&self.mem, &st.buf[..n]) {
            Ok(()) => {
                st.stats.received(n);
                self.add_used(st, Direction::Rx, bufs.head, n as u32);
            }
            Err(e) => {
                // Checked to be in RAM at parse time; memory cannot shrink under us.
                tracing::warn!(dev = %self.name, "cannot write a receive buffer: {e}");
                count(&mut st.stats.rx_dropped, &METRICS.net_rx_dropped);
                self.add_used(st, Direction::Rx, bufs.head, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::tests::{mem, raw, N, W};
    use super::*;
    use crate::devices::virtio::STATUS_DEVICE_NEEDS_RESET;
    use std::fs::File;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::AtomicU32;
    use std::time::{Duration, Instant};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// A SOCK_SEQPACKET pair: one frame per read or write, like a TAP. The device's end is
    /// non-blocking, the test's end blocks.
    fn tap_pair() -> (Tap, File) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into the array, which has room for them.
        let r =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both fds were just created and are owned by nothing else.
        let (dev, peer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETFL on an fd we own.
        let r = unsafe { libc::fcntl(dev.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        assert_eq!(r, 0);
        (Tap::from_file(File::from(dev), "test"), File::from(peer))
    }

    struct Rig<'a> {
        rxq: MockSplitQueue<'a, GuestMemoryMmap>,
        txq: MockSplitQueue<'a, GuestMemoryMmap>,
        status: Arc<AtomicU32>,
        irq: EventFd,
        wake: Arc<EventFd>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<NetStats>>,
    }

    impl<'a> Rig<'a> {
        fn start(
            m: &'a GuestMemoryMmap,
            tap: Tap,
            rx: &[RawDescriptor],
            tx: &[RawDescriptor],
        ) -> Self {
            Self::start_with(m, tap, rx, tx, |_| {})
        }

        /// As `start`, with `tweak` applied to the transmit queue before the device starts.
        fn start_with(
            m: &'a GuestMemoryMmap,
            tap: Tap,
            rx: &[RawDescriptor],
            tx: &[RawDescriptor],
            tweak: impl FnOnce(&MockSplitQueue<'a, GuestMemoryMmap>),
        ) -> Self {
            let rxq = MockSplitQueue::create(m, GuestAddress(0x8000), 16);
            let txq = MockSplitQueue::create(m, GuestAddress(0xc000), 16);
            if !rx.is_empty() {
                rxq.add_desc_chains(rx, 0).unwrap();
            }
            if !tx.is_empty() {
                txq.add_desc_chains(tx, 0).unwrap();
            }
            tweak(&txq);
            let status = Arc::new(AtomicU32::new(0));
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let wake = Arc::new(EventFd::new(0).unwrap());
            let stop = Arc::new(AtomicBool::new(false));
            let h = Handler {
                mem: m.clone(),
                rx: rxq.create_queue().unwrap(),
                tx: txq.create_queue().unwrap(),
                tap: Arc::new(tap),
                wake: wake.clone(),
                stop: stop.clone(),
                interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap(), status.clone())),
                name: "net-test".into(),
            };
            let thread = Some(std::thread::spawn(move || h.run()));
            wake.write(1).unwrap();
            Rig {
                rxq,
                txq,
                status,
                irq,
                wake,
                stop,
                thread,
            }
        }

        /// Waits until both used rings reach these indexes, or the device breaks.
        fn wait(&self, rx_used: u16, tx_used: u16) -> u32 {
            let t0 = Instant::now();
            loop {
                let s = self.status.load(Ordering::Acquire);
                if s & STATUS_DEVICE_NEEDS_RESET != 0
                    || (self.rxq.used().idx().load() == rx_used
                        && self.txq.used().idx().load() == tx_used)
                {
                    return s;
                }
                assert!(t0.elapsed() < Duration::from_secs(10), "device stalled");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn used_len(q: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> u32 {
            q.used().ring().ref_at(i as usize).unwrap().load().len()
        }

        fn stop(mut self) -> NetStats {
            self.stop.store(true, Ordering::Release);
            self.wake.write(1).unwrap();
            self.thread.take().unwrap().join().unwrap()
        }
    }

    fn read_peer(peer: &mut File) -> Vec<u8> {
        use std::io::Read;
        let mut buf = vec![0u8; MAX_PACKET];
        let n = peer.read(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn frames_both_ways_over_split_chains() {
        let m = mem();
        let (tap, mut peer) = tap_pair();
        let frame: Vec<u8> = (0..100u8).collect();
        m.write_slice(&[0u8; 12], GuestAddress(0x1_0000)).unwrap();
        m.write_slice(&frame[..40], GuestAddress(0x2_0000)).unwrap();
        m.write_slice(&frame[40..], GuestAddress(0x3_0000)).unwrap();
        let tx = [
            raw(0x1_0000, 12, N, 1),
            raw(0x2_0000, 40, N, 2),
            raw(0x3_0000, 60, 0, 0),
        ];
        // Receive chain: the header split from the data, as a driver may post it.
        let rx = [raw(0x4_0000, 12, W | N, 1), raw(0x5_0000, 2048, W, 0)];
        // A frame waiting in the TAP before the device starts; the header's first ten bytes
        // are what the TAP would fill, the last two must become num_buffers = 1.
        let mut incoming = vec![0xeeu8; 12];
        incoming.extend((0..200u32).map(|i| (i * 7) as u8));
        use std::io::Write;
        peer.write_all(&incoming).unwrap();
        let rig = Rig::start(&m, tap, &rx, &tx);
        assert_eq!(rig.wait(1, 1), 0);
        let sent = read_peer(&mut peer);
        assert_eq!(&sent[..12], &[0u8; 12]);
        assert_eq!(&sent[12..], &frame[..]);
        assert_eq!(Rig::used_len(&rig.rxq, 0), 212);
        assert_eq!(Rig::used_len(&rig.txq, 0), 0);
        let mut hdr = [0u8; 12];
        m.read_slice(&mut hdr, GuestAddress(0x4_0000)).unwrap();
        assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let mut got = vec![0u8; 200];
        m.read_slice(&mut got, GuestAddress(0x5_0000)).unwrap();
        assert_eq!(&got[..], &incoming[12..]);
        let stats = rig.stop();
        assert_eq!((stats.tx_frames, stats.rx_frames), (1, 1));
    }

    #[test]
    fn bad_chains_and_big_frames_are_dropped_not_fatal() {
        let m = mem();
        let (tap, mut peer) = tap_pair();
        use std::io::Write;
        // Too big for the 100-byte receive buffer, then one that fits.
        peer.write_all(&[1u8; 500]).unwrap();
        peer.write_all(&[2u8; 80]).unwrap();
        let tx = [
            raw(1 << 40, 64, 0, 0),  // outside RAM
            raw(0x1_0000, 64, W, 0), // writable on the transmit queue
            raw(0x1_0000, 0, 0, 0),  // zero length
            raw(0x1_0000, 20, 0, 0), // fine
        ];
        let rx = [
            raw(0x4_0000, 2048, 0, 0), // read-only receive buffer
            raw(0x5_0000, 100, W, 0),
        ];
        let rig = Rig::start(&m, tap, &rx, &tx);
        assert_eq!(rig.wait(2, 4), 0);
        assert_eq!(
            read_peer(&mut peer).len(),
            20,
            "only the good frame went out"
        );
        assert_eq!(Rig::used_len(&rig.rxq, 0), 0);
        assert_eq!(Rig::used_len(&rig.rxq, 1), 80);
        let mut got = [0u8; 68];
        m.read_slice(&mut got, GuestAddress(0x5_0000 + 12)).unwrap();
        assert_eq!(got, [2u8; 68]);
        let stats = rig.stop();
        assert_eq!(stats.bad_chains, 4);
        assert_eq!(
            (stats.tx_frames, stats.rx_frames, stats.rx_dropped),
            (1, 1, 1)
        );
    }

    #[test]
    fn a_dead_tap_is_not_polled_in_a_loop() {
        let m = mem();
        let (tap, peer) = tap_pair();
        drop(peer); // reads now return end-of-file, and epoll says readable for ever
        let rx = [raw(0x5_0000, 2048, W, 0)];
        let rig = Rig::start(&m, tap, &rx, &[]);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rig.status.load(Ordering::Acquire), 0);
        let stats = rig.stop();
        assert_eq!((stats.rx_frames, stats.rx_dropped), (0, 0));
    }

    #[test]
    fn no_interrupt_while_the_driver_says_so() {
        let m = mem();
        let (tap, mut peer) = tap_pair();
        let tx = [raw(0x1_0000, 20, 0, 0)];
        let irq = |rig: &Rig| rig.irq.read().is_ok();
        let rig = Rig::start_with(&m, tap, &[], &tx, |txq| {
            m.write_obj(VRING_AVAIL_F_NO_INTERRUPT, txq.avail_addr())
                .unwrap()
        });
        assert_eq!(rig.wait(0, 1), 0);
        assert_eq!(read_peer(&mut peer).len(), 20);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!irq(&rig), "interrupt despite VRING_AVAIL_F_NO_INTERRUPT");
        rig.stop();
        let (tap, mut peer) = tap_pair();
        let rig = Rig::start(&m, tap, &[], &tx);
        assert_eq!(rig.wait(0, 1), 0);
        assert_eq!(read_peer(&mut peer).len(), 20);
        let t0 = Instant::now();
        while !irq(&rig) {
            assert!(t0.elapsed() < Duration::from_secs(10), "no interrupt");
            std::thread::sleep(Duration::from_millis(1));
        }
        rig.stop();
    }

    #[test]
    fn a_looping_chain_needs_a_reset() {
        let m = mem();
        let (tap, _peer) = tap_pair();
        let tx = [raw(0x1_0000, 12, N, 1), raw(0x2_0000, 64, N, 0)];
        let rig = Rig::start(&m, tap, &[], &tx);
        let s = rig.wait(u16::MAX, u16::MAX);
        assert_ne!(s & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(rig.stop().tx_frames, 0);
    }
}
