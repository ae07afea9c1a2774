//! The virtio-mmio transport, version 2 ("modern", virtio 1.2 section 4.2.2): the register
//! block a driver uses to find a device, negotiate features, set up queues and drive the
//! device status. One transport per device, at `0xd000_0000 + i * 0x1000` (docs/guest-abi.md).
//!
//! QueueNotify is normally caught by an ioeventfd in KVM (no exit reaches us); when none is
//! registered a write here signals the same eventfd, so the device sees one path either way.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    Interrupt, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use crate::devices::bus::BusDevice;

/// Device i is at `MMIO_BASE + i * MMIO_LEN`, on GSI `FIRST_GSI + i` (docs/guest-abi.md).
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_LEN: u64 = 0x1000;
pub const FIRST_GSI: u32 = 5;
/// GSIs 5..=23 of the IOAPIC.
pub const MAX_DEVICES: usize = 19;
/// Offset of QueueNotify, where the ioeventfd goes.
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x646f_6e76; // "vnod"
const CONFIG_SPACE: u64 = 0x100;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x04;
    pub const DEVICE_ID: u64 = 0x08;
    pub const VENDOR_ID: u64 = 0x0c;
    pub const DEVICE_FEATURES: u64 = 0x10;
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    pub const DRIVER_FEATURES: u64 = 0x20;
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    pub const QUEUE_SEL: u64 = 0x30;
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    pub const QUEUE_NUM: u64 = 0x38;
    pub const QUEUE_READY: u64 = 0x44;
    pub const INTERRUPT_STATUS: u64 = 0x60;
    pub const INTERRUPT_ACK: u64 = 0x64;
    pub const STATUS: u64 = 0x70;
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    pub const QUEUE_DRIVER_LOW: u64 = 0x90;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x94;
    pub const QUEUE_DEVICE_LOW: u64 = 0xa0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0xa4;
    pub const CONFIG_GENERATION: u64 = 0xfc;
}

pub struct MmioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) status: Arc<AtomicU32>,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) notify: EventFd,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) queue_sel: u32,
    pub(super) queues: Vec<Queue>,
    pub(super) active: bool,
}

impl MmioTransport {
    /// `irqfd` raises the device's GSI; `notify` is the queue-notify eventfd (also registered as
    /// an ioeventfd on QueueNotify by the builder, when KVM allows it).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: EventFd,
        notify: EventFd,
    ) -> Self {
        let status = Arc::new(AtomicU32::new(0));
        let queues = Self::fresh_queues(device.as_ref());
        Self {
            interrupt: Arc::new(Interrupt::new(irqfd, status.clone())),
            device,
            mem,
            status,
            notify,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            active: false,
        }
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue max sizes are powers of two"))
            .collect()
    }

    pub(super) fn device_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is frozen once the device runs.
        if self.active {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status.load(Ordering::Acquire),
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.set_addr(|q, v| q.set_desc_table_address(Some(v), None), v),
            reg::QUEUE_DESC_HIGH => {
                self.set_addr(|q, v| q.set_desc_table_address(None, Some(v)), v)
            }
            reg::QUEUE_DRIVER_LOW => {
                self.set_addr(|q, v| q.set_avail_ring_address(Some(v), None), v)
            }
            reg::QUEUE_DRIVER_HIGH => {
                self.set_addr(|q, v| q.set_avail_ring_address(None, Some(v)), v)
            }
            reg::QUEUE_DEVICE_LOW => {
                self.set_addr(|q, v| q.set_used_ring_address(Some(v), None), v)
            }
            reg::QUEUE_DEVICE_HIGH => {
                self.set_addr(|q, v| q.set_used_ring_address(None, Some(v)), v)
            }
            QUEUE_NOTIFY => {
                if let Err(e) = self.notify.write(1) {
                    tracing::warn!("cannot signal a queue notification: {e}");
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            _ => tracing::debug!(
                offset,
                v,
                "virtio-mmio: write to a read-only or unknown register"
            ),
        }
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue, u32), v: u32) {
        if let Some(q) = self.queue() {
            f(q, v);
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        let s = self.status.load(Ordering::Acquire);
        if s & STATUS_DRIVER == 0 || s & STATUS_FEATURES_OK != 0 {
            return; // only between DRIVER and FEATURES_OK
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        self.driver_features = (self.driver_features & !mask) | (u64::from(v) << shift);
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status.load(Ordering::Acquire);
        let mut new = v & !STATUS_DEVICE_NEEDS_RESET | (old & STATUS_DEVICE_NEEDS_RESET);
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.device_features();
            if unknown != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                tracing::warn!(
                    features = self.driver_features,
                    "virtio-mmio: driver features refused (VERSION_1 is required)"
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        if new & STATUS_DRIVER_OK != 0 && !self.active && new & STATUS_FAILED == 0 {
            if new & STATUS_FEATURES_OK == 0 || new & STATUS_ACKNOWLEDGE == 0 {
                new |= STATUS_DEVICE_NEEDS_RESET;
            } else {
                new = self.activate(new);
            }
        }
        self.status.store(new, Ordering::Release);
    }

    pub(super) fn activate(&mut self, status: u32) -> u32 {
        let usable = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
        if !usable {
            tracing::warn!("virtio-mmio: DRIVER_OK with a queue not ready or invalid");
            return status | STATUS_DEVICE_NEEDS_RESET;
        }
        let notify = match self.notify.try_clone() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("virtio-mmio: cannot clone the notify eventfd: {e}");
                return status | STATUS_DEVICE_NEEDS_RESET;
            }
        };
        // The device gets its own copies; ours stay for QueueReady reads.
        let queues = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()).expect("a valid queue's state is valid"))
            .collect();
        let res = self.device.activate(
            self.mem.clone(),
            self.driver_features,
            queues,
            notify,
            self.interrupt.clone(),
        );
        match res {
            Ok(()) => {
                self.active = true;
                status
            }
            Err(e) => {
                tracing::error!("virtio-mmio: cannot activate the device: {e}");
                status | STATUS_DEVICE_NEEDS_RESET
            }
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
        self.status.store(0, Ordering::Release);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            return; // the block config space is read-only
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// Records its activations.
    struct Dummy(Arc<Mutex<Vec<u64>>>);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64]
        }
        fn features(&self) -> u64 {
            1 << 9
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            features: u64,
            queues: Vec<Queue>,
            _notify: EventFd,
            _interrupt: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            assert_eq!(queues[0].size(), 16);
            self.0.lock().unwrap().push(features);
            Ok(())
        }
        fn reset(&mut self) {}
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Vec<u64>>>, EventFd) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Box::new(Dummy(log.clone())),
            mem,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            notify.try_clone().unwrap(),
        );
        (t, log, notify)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, hi: u32) -> u32 {
        w(t, reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 1 << 9);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, hi);
        w(
            t,
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        r(t, reg::STATUS)
    }

    #[test]
    fn identity_features_and_config() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 2);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1); // VERSION_1
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1 << 9);
        let mut b = [0u8; 2];
        t.read(CONFIG_SPACE + 3, &mut b);
        assert_eq!(b, [3, 3]);
    }

    #[test]
    fn version_1_is_required() {
        let (mut t, _, _) = transport();
        assert_eq!(negotiate(&mut t, 0) & STATUS_FEATURES_OK, 0);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_ne!(negotiate(&mut t, 1) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn queue_setup_activation_notify_and_reset() {
        let (mut t, log, notify) = transport();
        negotiate(&mut t, 1);
        w(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 64);
        w(&mut t, reg::QUEUE_NUM, 16);
        for (reg, addr) in [
            (reg::QUEUE_DESC_LOW, 0x1000),
            (reg::QUEUE_DRIVER_LOW, 0x2000),
            (reg::QUEUE_DEVICE_LOW, 0x3000),
        ] {
            w(&mut t, reg, addr);
        }
        w(&mut t, reg::QUEUE_READY, 1);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t, reg::STATUS, ok);
        assert_eq!(r(&mut t, reg::STATUS), ok);
        assert_eq!(*log.lock().unwrap(), vec![(1 << 32) | (1 << 9)]);
        // Queue registers are frozen while running.
        w(&mut t, reg::QUEUE_NUM, 32);
        assert_eq!(t.queues[0].size(), 16);
        w(&mut t, QUEUE_NOTIFY, 0);
        assert_eq!(notify.read().unwrap(), 1);
        t.interrupt.signal(INT_USED);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_USED);
        w(&mut t, reg::INTERRUPT_ACK, INT_USED);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn driver_ok_without_a_ready_queue_needs_reset() {
        let (mut t, log, _) = transport();
        negotiate(&mut t, 1);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t, reg::STATUS, ok);
        assert_ne!(r(&mut t, reg::STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(log.lock().unwrap().is_empty());
    }

    const INT_USED: u32 = crate::devices::virtio::INT_USED_RING;
}
