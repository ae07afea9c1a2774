//! Saving and restoring the legacy devices. Only the 16550 UART holds guest-visible state (its
//! registers and the bytes of input the guest has not read yet). The i8042 (vm-superio's holds
//! nothing but its reset line), the ACPI sleep registers (write-only commands; reads are always
//! zero) and the debug-exit and phase ports hold none, so they are rebuilt as new.

use std::io;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::serial::{EventFdTrigger, SerialDevice, SerialWriter};

#[derive(Debug, thiserror::Error)]
pub enum DevicePersistError {
    #[error("serial: {0}")]
    Serial(String),
    #[error("cannot clone the serial interrupt eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// The UART's registers and pending input (vm-superio's `SerialState`, in serde form).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Takes over the saved registers and input, keeping this device's output and interrupt
    /// line. Raises the interrupt again if one was pending.
    pub fn restore_state(&mut self, s: &SerialSnapshot) -> Result<(), DevicePersistError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let irq = self
            .serial
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(DevicePersistError::EventFd)?;
        let out: SerialWriter = std::mem::replace(self.serial.writer_mut(), Box::new(io::sink()));
        match Serial::from_state(&state, EventFdTrigger(irq), NoEvents, out) {
            Ok(serial) => {
                self.serial = serial;
                Ok(())
            }
            Err(e) => Err(DevicePersistError::Serial(format!("{e:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn registers_and_unread_input_move_to_a_new_uart() {
        let mut a = SerialDevice::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Box::new(io::sink()),
        );
        a.write(3, &[0x03]); // LCR: 8N1
        a.write(7, &[0x5a]); // scratch
        a.write(1, &[0x01]); // IER: received data available
        a.enqueue_input(b"hi");
        let saved = a.save_state();
        let saved: SerialSnapshot =
            serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut b = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        b.restore_state(&saved).unwrap();
        assert_eq!(
            irq.read().unwrap(),
            1,
            "pending input interrupt raised again"
        );
        let mut r = [0u8];
        b.read(7, &mut r);
        assert_eq!(r[0], 0x5a);
        b.read(0, &mut r);
        assert_eq!(r[0], b'h');
        b.read(0, &mut r);
        assert_eq!(r[0], b'i');
        b.write(0, b"x");
        assert_eq!(
            &*out.0.lock().unwrap(),
            b"x",
            "output still goes to the new device's writer"
        );
        assert_eq!(b.save_state().line_control, 0x03);
    }
}
