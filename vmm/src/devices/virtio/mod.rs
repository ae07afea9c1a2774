//! Virtio devices for the guest: the virtio-mmio transport (`mmio`) and the devices behind it
//! (`block`, `net`). A device implements [`VirtioDevice`]; the transport owns the registers, the
//! feature negotiation and the queue configuration, and hands the device its queues when the
//! driver sets DRIVER_OK. Devices signal completions through an [`Interrupt`] (an irqfd).

pub mod block;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod worker;

pub use worker::{DeviceThread, DeviceWorker};

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::Duration;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: every modern device offers it and the transport requires it.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// InterruptStatus bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The interrupt line of one device: InterruptStatus plus the irqfd that raises the GSI.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    /// The transport's DeviceStatus, so a device can report DEVICE_NEEDS_RESET.
    device_status: Arc<AtomicU32>,
}

impl Interrupt {
    pub fn new(irqfd: EventFd, device_status: Arc<AtomicU32>) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
            device_status,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot signal the virtio irqfd: {e}");
        }
    }

    /// The device is in a state only a reset can fix (virtio 1.2, 2.1.2).
    pub fn needs_reset(&self) {
        self.device_status
            .fetch_or(STATUS_DEVICE_NEEDS_RESET, Ordering::AcqRel);
        self.signal(INT_CONFIG);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("cannot start the device thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// What the transport needs from a device.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 = block).
    fn device_type(&self) -> u32;
    /// The largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered features (bit n of the 64-bit set = feature n).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Starts the device with the negotiated `features` and the driver's queues. `notify` is
    /// written whenever the driver notifies a queue (by ioeventfd or by the transport).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        notify: EventFd,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// Stops the device (the driver wrote 0 to Status); it may be activated again.
    fn reset(&mut self);
}

/// Reads `data.len()` bytes at `offset` of a device's configuration space `config`; bytes past
/// its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// Pauses every device queue thread of the process (one VM per vnode process): while paused,
/// no thread pops or completes a chain. Threads pass [`DevicePause::checkpoint`] each time they
/// wake; `pause` wakes them all and returns once each is parked there.
#[derive(Default)]
pub struct DevicePause {
    state: Mutex<PauseState>,
    cv: Condvar,
}

#[derive(Default)]
struct PauseState {
    paused: bool,
    parked: usize,
    /// The wake eventfd of every running device thread, by thread id.
    threads: Vec<(u64, Arc<EventFd>)>,
    next_id: u64,
}

/// The process's device pause.
pub static DEVICE_PAUSE: LazyLock<DevicePause> = LazyLock::new(DevicePause::default);

impl DevicePause {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().expect("device pause lock poisoned")
    }

    pub(super) fn register(&self, wake: Arc<EventFd>) -> u64 {
        let mut st = self.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.threads.push((id, wake));
        id
    }

    pub(super) fn unregister(&self, id: u64) {
        self.lock().threads.retain(|(i, _)| *i != id);
        self.cv.notify_all();
    }

    /// True while devices are asked to pause (a thread finishes its in-flight work first).
    pub fn pausing(&self) -> bool {
        self.lock().paused
    }

    /// Parks the calling device thread while devices are paused.
    pub fn checkpoint(&self) {
        let mut st = self.lock();
        if !st.paused {
            return;
        }
        st.parked += 1;
        self.cv.notify_all();
        while st.paused {
            st = self.cv.wait(st).expect("device pause lock poisoned");
        }
        st.parked -= 1;
    }

    /// Pauses every device thread; true once all are parked, false if some did not park
    /// within `timeout` (they still park as soon as they wake).
    pub fn pause(&self, timeout: Duration) -> bool {
        let mut st = self.lock();
        st.paused = true;
        for (_, wake) in &st.threads {
            let _ = wake.write(1);
        }
        let deadline = std::time::Instant::now() + timeout;
        while st.parked < st.threads.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .expect("device pause lock poisoned")
                .0;
        }
        true
    }

    /// Lets every device thread go on.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.cv.notify_all();
    }
}
