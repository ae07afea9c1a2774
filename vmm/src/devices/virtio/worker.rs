//! A virtio device's worker thread (`blk<i>`, `net<i>`): started with the device at build time
//! and kept for the VM's life, it runs the device's queue loop from each DRIVER_OK to the next
//! reset. It is started then, not at DRIVER_OK, because DRIVER_OK arrives on a vCPU thread: a
//! thread started there would inherit the vCPU's seccomp filter on top of its own (filters
//! stack), so it enters its own sandbox (`sandbox::ThreadKind::Device`) once, at its start.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;

use vmm_sys_util::eventfd::EventFd;

use super::ActivateError;
use crate::sandbox::{self, ThreadKind};

type Job = Box<dyn FnOnce() + Send>;

/// The thread; it ends once this is dropped and its current loop (if any) has stopped.
pub struct DeviceWorker {
    name: String,
    jobs: Sender<Job>,
}

impl DeviceWorker {
    /// Starts the thread `name`.
    pub fn new(name: &str) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                sandbox::enter_thread(ThreadKind::Device);
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(Self {
            name: name.to_owned(),
            jobs: tx,
        })
    }

    /// Runs `run` (a queue loop that returns once `stop` is set and `wake` written) on the
    /// thread, then wakes it once for what the driver queued before DRIVER_OK.
    pub fn start<T: Send + 'static>(
        &self,
        stop: Arc<AtomicBool>,
        wake: Arc<EventFd>,
        run: impl FnOnce() -> T + Send + 'static,
    ) -> Result<DeviceThread<T>, ActivateError> {
        let (done_tx, done) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = done_tx.send(run());
        });
        self.jobs
            .send(job)
            .map_err(|_| ActivateError::Spawn(std::io::Error::other("device thread is gone")))?;
        let _ = wake.write(1);
        let pause_id = super::DEVICE_PAUSE.register(wake.clone());
        Ok(DeviceThread {
            name: self.name.clone(),
            done,
            stop,
            wake,
            pause_id,
        })
    }
}

/// A device's queue loop running on its worker, from DRIVER_OK to reset: it runs until `stop`
/// is set, and the queue-notify eventfd `wake` wakes it (for notifications and to stop).
pub struct DeviceThread<T> {
    name: String,
    done: Receiver<T>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    /// Its place in the device pause (`DEVICE_PAUSE`).
    pause_id: u64,
}

impl<T> DeviceThread<T> {
    /// Stops the loop and returns what it returned (None if it could not be stopped).
    pub fn stop(self) -> Option<T> {
        super::DEVICE_PAUSE.unregister(self.pause_id);
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            tracing::error!(dev = %self.name, "cannot wake the device thread to stop it: {e}");
            return None;
        }
        match self.done.recv() {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::error!(dev = %self.name, "device thread ended without an answer");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_each_activation_on_the_same_named_thread() {
        let w = DeviceWorker::new("worker-test").unwrap();
        for round in 0..3u32 {
            let stop = Arc::new(AtomicBool::new(false));
            let wake = Arc::new(EventFd::new(0).unwrap());
            let (s, k) = (stop.clone(), wake.clone());
            let t = w
                .start(stop, wake, move || {
                    while !s.load(Ordering::Acquire) {
                        k.read().unwrap();
                    }
                    (round, thread::current().name().map(str::to_owned))
                })
                .unwrap();
            assert_eq!(t.stop(), Some((round, Some("worker-test".to_owned()))));
        }
    }
}
