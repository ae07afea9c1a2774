//! VM-exit dispatch as a free function, so tests (and fuzzers) can feed it exits directly.

use kvm_ioctls::VcpuExit;

use crate::devices::bus::IoBuses;
use crate::metrics::{RateLimit, METRICS};

/// What the vCPU loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Run the vCPU again.
    Continue,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    Shutdown,
    /// KVM could not handle the exit itself (usually an instruction its emulator lacks).
    InternalError,
    /// The CPU refused to enter the guest.
    FailEntry(u64),
    /// An exit vNode does not handle.
    Unhandled(String),
}

static UNOWNED_PIO_LOG: RateLimit = RateLimit::new(16);
static UNOWNED_MMIO_LOG: RateLimit = RateLimit::new(16);

/// Routes one exit to the device buses.
pub fn handle_exit(exit: VcpuExit<'_>, buses: &IoBuses) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            METRICS.exits_pio.inc();
            if !buses.pio.read(u64::from(port), data) {
                METRICS.pio_unowned.inc();
                if UNOWNED_PIO_LOG.allow() {
                    tracing::debug!(port = format_args!("{port:#x}"), "read of an unowned port");
                }
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            METRICS.exits_pio.inc();
            if !buses.pio.write(u64::from(port), data) {
                METRICS.pio_unowned.inc();
                if UNOWNED_PIO_LOG.allow() {
                    tracing::debug!(port = format_args!("{port:#x}"), "write to an unowned port");
                }
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            METRICS.exits_mmio.inc();
            if !buses.mmio.read(addr, data) {
                METRICS.mmio_unowned.inc();
                if UNOWNED_MMIO_LOG.allow() {
                    tracing::debug!(addr = format_args!("{addr:#x}"), "read of unowned MMIO");
                }
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            METRICS.exits_mmio.inc();
            if !buses.mmio.write(addr, data) {
                METRICS.mmio_unowned.inc();
                if UNOWNED_MMIO_LOG.allow() {
                    tracing::debug!(addr = format_args!("{addr:#x}"), "write to unowned MMIO");
                }
            }
            ExitAction::Continue
        }
        VcpuExit::Hlt => {
            METRICS.exits_hlt.inc();
            ExitAction::Continue
        }
        VcpuExit::Shutdown => ExitAction::Shutdown,
        VcpuExit::InternalError => ExitAction::InternalError,
        VcpuExit::FailEntry(reason, _cpu) => ExitAction::FailEntry(reason),
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => {
            METRICS.exits_other.inc();
            ExitAction::Continue
        }
        other => {
            METRICS.exits_other.inc();
            ExitAction::Unhandled(format!("{other:?}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(self.0);
        }
        fn write(&mut self, _o: u64, d: &[u8]) {
            self.0 = d[0];
        }
    }

    #[test]
    fn port_io_reaches_the_device() {
        let mut buses = IoBuses::default();
        buses
            .pio
            .insert(0x80, 1, Arc::new(Mutex::new(Echo(0))))
            .unwrap();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x80, &[9]), &buses),
            ExitAction::Continue
        );
        let mut d = [0u8; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x80, &mut d), &buses),
            ExitAction::Continue
        );
        assert_eq!(d, [9]);
    }

    #[test]
    fn unowned_mmio_reads_all_ones() {
        let buses = IoBuses::default();
        let mut d = [0u8; 4];
        assert_eq!(
            handle_exit(VcpuExit::MmioRead(0xd000_0000, &mut d), &buses),
            ExitAction::Continue
        );
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn fatal_exits_are_reported() {
        let buses = IoBuses::default();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &buses),
            ExitAction::Shutdown
        );
        assert_eq!(
            handle_exit(VcpuExit::FailEntry(7, 0), &buses),
            ExitAction::FailEntry(7)
        );
        assert!(matches!(
            handle_exit(VcpuExit::Debug(Default::default()), &buses),
            ExitAction::Unhandled(_)
        ));
    }
}
