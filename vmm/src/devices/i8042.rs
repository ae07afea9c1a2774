//! The i8042 keyboard controller, for its one job in a VM: the reset line (command 0xfe on port
//! 0x64), which Linux pulses to reboot. vNode treats a reset as the guest powering off.

use std::convert::Infallible;

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use super::{StopReason, StopSignal};

pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

/// Ends the VM when the guest pulses reset.
pub struct ResetTrigger(StopSignal);

impl Trigger for ResetTrigger {
    type E = Infallible;
    fn trigger(&self) -> Result<(), Infallible> {
        self.0.stop(StopReason::Reset);
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(stop: StopSignal) -> Self {
        Self(I8042Device::new(ResetTrigger(stop)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            let Ok(()) = self.0.write(offset as u8, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm() {
        let stop = StopSignal::new();
        let mut dev = I8042::new(stop.clone());
        assert_eq!(stop.reason(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(stop.reason(), Some(StopReason::Reset));
    }
}
