//! The sleep control and status registers of a hardware-reduced ACPI machine (the FADT's
//! SLEEP_CONTROL_REG and SLEEP_STATUS_REG, ACPI 6.5 section 4.8.3.7), one byte each at ports
//! 0x600 and 0x601. Linux powers off (`poweroff -f`) by writing SLP_TYP = the DSDT's `_S5` value
//! with SLP_EN to the control register (arch/x86_64/acpi.rs describes both). vNode treats that as
//! the guest powering off, as it treats an i8042 reset.

use super::bus::BusDevice;
use super::{StopReason, StopSignal};

/// SLEEP_CONTROL_REG; SLEEP_STATUS_REG is the next port.
pub const SLEEP_CONTROL_PORT: u64 = 0x600;
pub const SLEEP_PORTS_LEN: u64 = 2;
/// The SLP_TYP value the DSDT's `\_S5` package gives for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u8 = 1 << 5;

/// Ends the VM when the guest enters S5.
pub struct AcpiSleep(StopSignal);

impl AcpiSleep {
    pub fn new(stop: StopSignal) -> Self {
        Self(stop)
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No wake events: WAK_STS reads 0, so a sleep state other than S5 would never return.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let s5 = S5_SLEEP_TYPE << SLP_TYP_SHIFT;
        if offset == 0 && v & SLP_EN != 0 && v & SLP_TYP_MASK == s5 {
            self.0.stop(StopReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entering_s5_stops_the_vm() {
        let stop = StopSignal::new();
        let mut dev = AcpiSleep::new(stop.clone());
        dev.write(1, &[0x80]); // Linux clears WAK_STS first
        dev.write(0, &[5 << 2]); // SLP_TYP without SLP_EN
        dev.write(0, &[(3 << 2) | SLP_EN]); // S3: not supported, ignored
        assert_eq!(stop.reason(), None);
        dev.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(stop.reason(), Some(StopReason::Reset));
    }
}
