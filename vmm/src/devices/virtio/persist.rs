//! Saving and restoring a virtio-mmio transport with the device behind it: the registers the
//! driver wrote (status, feature selectors, negotiated features, queue selector, interrupt
//! status), each queue's configuration and ring positions, and the device's identity (type,
//! offered features, configuration space: a virtio-blk's capacity and limits, a virtio-net's
//! MAC and link status). vNode's block and net devices keep no other state between requests, so
//! with the VM paused and the device quiet this is all of it.
//!
//! Ring positions are taken from guest memory, not from the device thread: `next_used` is the
//! used ring's `idx`, and `next_avail` is set equal to it. Once the device has completed every
//! request it started (the pause drains them), every chain it popped has been used except, for a
//! net device, the receive chain it held waiting for a frame; rewinding `next_avail` makes the
//! restored device pop that chain again instead of losing it.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::mmio::MmioTransport;
use super::{STATUS_DRIVER_OK, STATUS_FAILED};

/// Bytes of configuration space saved (and compared at restore): more than any device here has.
const CONFIG_BYTES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPersistError {
    #[error("cannot read the used ring of queue {queue} at {addr:#x}: {source}")]
    UsedRing {
        queue: usize,
        addr: u64,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("the saved device is a virtio device of type {saved}, this one is type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("the device differs from the saved one: {0}")]
    Mismatch(&'static str),
    #[error("saved queue {queue} is invalid: {source}")]
    Queue {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
}

/// One virtqueue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueSnapshot {
    fn from_state(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }

    fn to_state(&self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        }
    }
}

/// A transport and its device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSnapshot {
    pub device_type: u32,
    pub device_features: u64,
    /// The device's configuration space (first CONFIG_BYTES bytes).
    pub config: Vec<u8>,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
}

impl MmioTransport {
    fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_BYTES];
        self.device.read_config(0, &mut c);
        c
    }

    /// Saves the transport. The VM is paused and the device has completed what it started.
    pub fn save_state(&self) -> Result<MmioSnapshot, VirtioPersistError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            let mut s = q.state();
            if self.active {
                let used = q.used_idx(&self.mem, Ordering::Acquire).map_err(|source| {
                    VirtioPersistError::UsedRing {
                        queue: i,
                        addr: s.used_ring,
                        source,
                    }
                })?;
                s.next_used = used.0;
                s.next_avail = used.0;
            }
            queues.push(QueueSnapshot::from_state(s));
        }
        Ok(MmioSnapshot {
            device_type: self.device.device_type(),
            device_features: self.device_features(),
            config: self.config_space(),
            status: self.status.load(Ordering::Acquire),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: 0,
            queues,
        })
    }

    /// Restores a transport that was just created for the same device (same type, features and
    /// configuration space: a disk of another size or a NIC with another MAC is refused). A
    /// device the driver had started is started again on its saved queues.
    pub fn restore_state(&mut self, s: &MmioSnapshot) -> Result<(), VirtioPersistError> {
        let here = self.device.device_type();
        if s.device_type != here {
            return Err(VirtioPersistError::DeviceType {
                saved: s.device_type,
                here,
            });
        }
        if s.device_features != self.device_features() {
            return Err(VirtioPersistError::Mismatch(
                "offered features (a read-only flag or a feature set differs)",
            ));
        }
        if s.config != self.config_space() {
            return Err(VirtioPersistError::Mismatch(
                "configuration space (disk capacity or MAC address)",
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(VirtioPersistError::Mismatch("number of queues"));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.iter().enumerate() {
            let q = Queue::try_from(q.to_state())
                .map_err(|source| VirtioPersistError::Queue { queue: i, source })?;
            queues.push(q);
        }
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        let running = s.status & STATUS_DRIVER_OK != 0 && s.status & STATUS_FAILED == 0;
        let status = if running {
            self.activate(s.status)
        } else {
            s.status
        };
        self.status.store(status, Ordering::Release);
        self.interrupt.ack(u32::MAX);
        if s.interrupt_status != 0 {
            // Raise the line again: an interrupt the guest had not yet handled must not be lost
            // (a spurious one is harmless: the driver finds nothing new).
            self.interrupt.signal(s.interrupt_status);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::{
        ActivateError, Interrupt, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
        STATUS_FEATURES_OK,
    };
    use std::sync::{Arc, Mutex};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    /// Records the queues it is activated with; `cfg` is its configuration space.
    struct Dev {
        cfg: u8,
        got: Arc<Mutex<Vec<QueueState>>>,
    }

    impl VirtioDevice for Dev {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[64]
        }
        fn features(&self) -> u64 {
            1 << 9
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(self.cfg);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _features: u64,
            queues: Vec<Queue>,
            _notify: EventFd,
            _interrupt: Arc<Interrupt>,
        ) -> Result<(), ActivateError> {
            *self.got.lock().unwrap() = queues.iter().map(|q| q.state()).collect();
            Ok(())
        }
        fn reset(&mut self) {}
    }

    fn transport(mem: &GuestMemoryMmap, cfg: u8) -> (MmioTransport, Arc<Mutex<Vec<QueueState>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let dev = Dev {
            cfg,
            got: got.clone(),
        };
        let t = MmioTransport::new(
            Box::new(dev),
            mem.clone(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        (t, got)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    const USED: u64 = 0x3000;
    const OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    /// Drives a transport the way a driver does, up to DRIVER_OK.
    fn start(t: &mut MmioTransport) {
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VERSION_1
        w(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(t, 0x38, 16);
        w(t, 0x80, 0x1000);
        w(t, 0x90, 0x2000);
        w(t, 0xa0, USED as u32);
        w(t, 0x44, 1);
        w(t, 0x70, OK);
    }

    #[test]
    fn a_running_transport_restarts_at_the_used_index() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mut t, _) = transport(&mem, 7);
        start(&mut t);
        assert!(t.active);
        // The device completed five chains.
        mem.write_obj(5u16, GuestAddress(USED + 2)).unwrap();
        t.interrupt.signal(1);
        let saved = t.save_state().expect("save");
        assert_eq!(saved.status, OK);
        assert_eq!(
            (saved.queues[0].next_avail, saved.queues[0].next_used),
            (5, 5)
        );
        let saved: MmioSnapshot =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

        let (mut t2, got) = transport(&mem, 7);
        t2.restore_state(&saved).expect("restore");
        assert!(t2.active);
        let q = got.lock().unwrap()[0];
        assert_eq!((q.next_avail, q.next_used, q.size), (5, 5, 16));
        assert_eq!(
            (q.desc_table, q.avail_ring, q.used_ring),
            (0x1000, 0x2000, USED)
        );
        let mut st = [0u8; 4];
        t2.read(0x70, &mut st);
        assert_eq!(u32::from_le_bytes(st), OK);
        t2.read(0x60, &mut st);
        assert_eq!(u32::from_le_bytes(st), 1, "interrupt status kept");
        assert_eq!(t2.save_state().unwrap(), saved);
    }

    #[test]
    fn another_device_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (mut t, _) = transport(&mem, 7);
        start(&mut t);
        let saved = t.save_state().unwrap();
        let (mut other, got) = transport(&mem, 8);
        assert!(matches!(
            other.restore_state(&saved),
            Err(VirtioPersistError::Mismatch(_))
        ));
        assert!(got.lock().unwrap().is_empty(), "nothing started");
        let mut wrong_type = saved.clone();
        wrong_type.device_type = 1;
        assert!(matches!(
            transport(&mem, 7).0.restore_state(&wrong_type),
            Err(VirtioPersistError::DeviceType { saved: 1, here: 2 })
        ));
    }

    #[test]
    fn a_transport_the_driver_never_started_stays_stopped() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (t, _) = transport(&mem, 7);
        let saved = t.save_state().unwrap();
        let (mut t2, got) = transport(&mem, 7);
        t2.restore_state(&saved).unwrap();
        assert!(!t2.active);
        assert!(got.lock().unwrap().is_empty());
    }
}
