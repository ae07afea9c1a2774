//! A virtio-net device (virtio 1.2, 5.1): one receive and one transmit queue, no control queue,
//! features VERSION_1 and MAC, frames to and from a TAP (`tap`). The TAP stays open across
//! driver resets; the queue thread (`handler`) runs from DRIVER_OK to reset.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::handler::{Handler, NetStats};
use super::tap::Tap;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, DeviceThread, DeviceWorker, Interrupt, VirtioDevice,
};

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_NET_F_MAC: u32 = 5;
pub const VIRTIO_NET_F_STATUS: u32 = 16;
/// Config space `status`: link up.
const VIRTIO_NET_S_LINK_UP: u16 = 1;
const QUEUE_SIZE: u16 = 256;

pub struct Net {
    name: String,
    tap: Arc<Tap>,
    mac: [u8; 6],
    worker: DeviceWorker,
    running: Option<DeviceThread<NetStats>>,
}

/// A locally administered unicast MAC (52:54:00:xx:xx:xx) derived from the TAP's name, so a
/// guest on the same TAP keeps its address from run to run.
pub fn default_mac(tap: &str) -> [u8; 6] {
    // FNV-1a: small, stable across Rust versions (unlike DefaultHasher).
    let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0] ^ b[3], b[1] ^ b[4], b[2] ^ b[5]]
}

impl Net {
    /// Net device `index` (its thread, started now, is `net<index>`) on an open TAP.
    pub fn new(index: usize, tap: Tap, mac: [u8; 6]) -> std::io::Result<Self> {
        let name = format!("net{index}");
        Ok(Self {
            worker: DeviceWorker::new(&name)?,
            name,
            tap: Arc::new(tap),
            mac,
            running: None,
        })
    }

    /// virtio_net_config up to `status`: the MAC and the link state.
    fn config_bytes(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    /// receiveq1, transmitq1.
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        mut queues: Vec<Queue>,
        notify: EventFd,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let tx = queues
            .pop()
            .expect("the transport gives one queue per max size");
        let rx = queues
            .pop()
            .expect("the transport gives one queue per max size");
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(notify);
        let handler = Handler {
            mem,
            rx,
            tx,
            tap: self.tap.clone(),
            wake: wake.clone(),
            stop: stop.clone(),
            interrupt,
            name: self.name.clone(),
        };
        let thread = self.worker.start(stop, wake, move || handler.run())?;
        self.running = Some(thread);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(stats) = self.running.take().and_then(DeviceThread::stop) {
            tracing::info!(dev = %self.name, ?stats, "net device reset");
        }
    }
}
