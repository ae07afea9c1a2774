//! COM1: a 16550 UART (vm-superio) on ports 0x3f8-0x3ff with IRQ 4 delivered through an irqfd.
//! Output goes to stdout or a file; input comes from stdin through the event loop.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::metrics::METRICS;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// An interrupt line backed by an eventfd registered with KVM as an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialWriter = Box<dyn Write + Send>;

/// The UART as a bus device.
pub struct SerialDevice {
    pub(super) serial: Serial<EventFdTrigger, NoEvents, SerialWriter>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialWriter) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues input bytes for the guest to read. Returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Flushes guest output written so far.
    pub fn flush(&mut self) -> io::Result<()> {
        self.serial.writer_mut().flush()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            if self.serial.write(offset as u8, *b).is_err() {
                METRICS.serial_errors.inc();
            }
        }
    }
}

/// Feeds stdin to the guest's serial input.
pub struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
}

impl StdinInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        Self { serial }
    }
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            io::stdin().lock().read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // EOF, hang-up or error: stop watching stdin; the guest keeps running.
            let _ = ops.remove(Events::new(&io::stdin(), EventSet::IN));
            return;
        }
        let mut s = self.serial.lock().expect("serial lock poisoned");
        s.enqueue_input(&buf[..n]);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A stdin that epoll cannot watch (a regular file, /dev/null) just gives no input.
        if ops.add(Events::new(&io::stdin(), EventSet::IN)).is_err() {
            tracing::debug!("stdin cannot be polled: the guest gets no serial input");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(out.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty bit set");
    }

    #[test]
    fn input_is_readable_by_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(io::sink()));
        assert_eq!(dev.enqueue_input(b"x"), 1);
        let mut d = [0u8];
        dev.read(0, &mut d);
        assert_eq!(d[0], b'x');
    }
}
