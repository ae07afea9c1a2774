//! Emulated devices and the buses that route guest port I/O and MMIO to them.
pub mod acpi_sleep;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod persist;
pub mod power_button;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Condvar, Mutex};

/// Why the VM stopped. The first reason reported wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote its exit status to the debug-exit port.
    GuestExit(u8),
    /// The guest asked for a reset (i8042 pulse): a clean power-off for a one-shot VMM.
    Reset,
    /// Something outside the guest asked for a stop (the API, a shutdown deadline, a signal).
    Requested(String),
    /// Something fatal happened: a triple fault, an emulation failure, a lost memory server.
    Fatal(String),
}

/// Shared by everything that can end the VM; the runner waits on it.
#[derive(Clone, Default)]
pub struct StopSignal {
    inner: Arc<(Mutex<Option<StopReason>>, Condvar)>,
}

impl StopSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `reason` unless another was recorded first, and wakes the waiter.
    pub fn stop(&self, reason: StopReason) {
        let (lock, cv) = &*self.inner;
        let mut r = lock.lock().expect("stop signal lock poisoned");
        if r.is_none() {
            *r = Some(reason);
        }
        cv.notify_all();
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<StopReason> {
        self.inner
            .0
            .lock()
            .expect("stop signal lock poisoned")
            .clone()
    }

    /// Waits until a reason is recorded, or until `timeout` passes.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<StopReason> {
        let (lock, cv) = &*self.inner;
        let guard = lock.lock().expect("stop signal lock poisoned");
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |r| r.is_none())
            .expect("stop signal lock poisoned");
        guard.clone()
    }
}
