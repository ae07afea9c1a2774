//! Fuzzes the virtio-mmio transport (`devices/virtio/mmio.rs`) as a guest drives it: the input is
//! a sequence of 8-byte accesses (a read or write, an offset in the 4 KiB window, a size of 1, 2,
//! 4 or 8 bytes, a 32-bit value), replayed on a transport in front of a two-queue device whose
//! guest memory is 64 KiB. Nothing may panic, and the device is only ever activated with what
//! the transport promises: FEATURES_OK negotiated features it offered (with VERSION_1), every
//! queue ready and valid in guest memory, one activation per reset.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::mmio::MmioTransport;
use vmm::devices::virtio::{ActivateError, Interrupt, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

const RAM: usize = 0x1_0000;
const OFFERED: u64 = 0b1011 | (1 << 32); // a few device bits and VERSION_1

#[derive(Default)]
struct Seen {
    active: bool,
}

/// Checks every activation against what the transport promised.
struct Checker(Arc<Mutex<Seen>>, GuestMemoryMmap);

impl VirtioDevice for Checker {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 16]
    }
    fn features(&self) -> u64 {
        OFFERED
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        vmm::devices::virtio::read_config_bytes(b"0123456789abcdef", offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        _notify: EventFd,
        _interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let mut s = self.0.lock().expect("not poisoned");
        assert!(!s.active, "activated twice without a reset");
        assert_eq!(
            features & !(OFFERED | (1 << 32)),
            0,
            "features never offered"
        );
        assert_ne!(features & (1 << 32), 0, "VERSION_1 not negotiated");
        assert_eq!(queues.len(), 2);
        for q in &queues {
            assert!(q.ready() && q.is_valid(&self.1));
        }
        drop(mem);
        s.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().expect("not poisoned").active = false;
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).expect("64 KiB guest");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let notify = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let mut t = MmioTransport::new(
        Box::new(Checker(seen.clone(), mem.clone())),
        mem,
        irq,
        notify,
    );
    for op in data.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0xfff);
        let len = 1usize << (op[3] & 3);
        let value = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
        let mut buf = [0u8; 8];
        if op[0] & 1 == 0 {
            t.read(offset, &mut buf[..len]);
        } else {
            buf[..4].copy_from_slice(&value.to_le_bytes());
            t.write(offset, &buf[..len]);
        }
    }
});
