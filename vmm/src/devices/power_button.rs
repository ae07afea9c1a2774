//! The ACPI power button a graceful shutdown presses (`PUT /vm/shutdown`). vNode's machine is
//! hardware-reduced (no fixed-feature button, no SCI): the DSDT (arch/x86_64/acpi.rs) declares a
//! control-method power button `\_SB.PWRB` (PNP0C0C) and a Generic Event Device `\_SB.GED_`
//! (ACPI0013) whose one interrupt is [`POWER_BUTTON_GSI`]; its `_EVT` method notifies the button
//! (0x80, "pressed"). Linux's GED driver (built in) runs `_EVT` when that GSI fires, its ACPI
//! button driver (`button.ko`) turns the notification into KEY_POWER, and the guest's user space
//! decides what to do (the project's Linux guest init powers off). A press is one edge on the
//! GSI, through an irqfd: any thread can press without a KVM ioctl. The test guest and a guest
//! without ACPI never see it: for them the shutdown deadline is the stop.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// The GED's interrupt: ISA IRQ 3 (COM2's, which vNode does not emulate), edge-triggered and
/// active-high like every vNode interrupt; virtio-mmio devices start at GSI 5.
pub const POWER_BUTTON_GSI: u32 = 3;

// The GSI is free: not the platform's (0 PIT, 1 keyboard, 2 cascade), not COM1's, below virtio's.
const _: () = {
    use crate::devices::serial::COM1_IRQ;
    use crate::devices::virtio::mmio::FIRST_GSI;
    assert!(POWER_BUTTON_GSI > 2 && POWER_BUTTON_GSI != COM1_IRQ && POWER_BUTTON_GSI < FIRST_GSI);
};

/// The button: writing its eventfd pulses [`POWER_BUTTON_GSI`] (registered as an irqfd).
#[derive(Clone)]
pub struct PowerButton {
    irq: Arc<EventFd>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot press the power button")]
pub struct PressError(#[source] std::io::Error);

impl PowerButton {
    /// A button on `irq`, which the caller registers as an irqfd for [`POWER_BUTTON_GSI`].
    pub fn new(irq: Arc<EventFd>) -> Self {
        Self { irq }
    }

    /// Presses (and releases) the button: one interrupt on the GED's GSI.
    pub fn press(&self) -> Result<(), PressError> {
        self.irq.write(1).map_err(PressError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_press_signals_the_irqfd_once() {
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let button = PowerButton::new(evt.clone());
        button.press().expect("press");
        assert_eq!(evt.read().expect("one press pending"), 1);
        assert!(evt.read().is_err(), "nothing more");
    }
}
