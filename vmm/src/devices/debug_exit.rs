//! Two test ports (docs/guest-abi.md): the debug-exit port, through which a guest ends the VM
//! with a status, and the phase marker, through which it reports progress. The phase marker
//! carries a debug hook that corrupts one byte of guest RAM at a chosen phase, so tests can prove
//! that verification catches corruption.

use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::bus::BusDevice;
use super::{StopReason, StopSignal};

pub const DEBUG_EXIT_PORT: u64 = 0xf4;
pub const PHASE_PORT: u64 = 0xf5;

fn value_of(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Port 0xf4: a write ends the VM with exit status `value & 0xff`.
pub struct DebugExit(StopSignal);

impl DebugExit {
    pub fn new(stop: StopSignal) -> Self {
        Self(stop)
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        self.0
            .stop(StopReason::GuestExit((value_of(data) & 0xff) as u8));
    }
}

/// Flip one byte of guest RAM at `gpa` when the guest reports phase `phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CorruptHook {
    pub gpa: u64,
    pub phase: u32,
}

/// Port 0xf5: the guest reports the phase it reached.
pub struct PhaseMarker {
    mem: GuestMemoryMmap,
    hook: Option<CorruptHook>,
    started: Instant,
}

impl PhaseMarker {
    pub fn new(mem: GuestMemoryMmap, hook: Option<CorruptHook>) -> Self {
        Self {
            mem,
            hook,
            started: Instant::now(),
        }
    }
}

impl BusDevice for PhaseMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let phase = value_of(data);
        tracing::info!(
            phase,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "guest phase"
        );
        let Some(hook) = self.hook.filter(|h| h.phase == phase) else {
            return;
        };
        let addr = GuestAddress(hook.gpa);
        match self.mem.read_obj::<u8>(addr) {
            Ok(b) => {
                let _ = self.mem.write_obj(!b, addr);
                tracing::warn!(
                    gpa = hook.gpa,
                    phase,
                    "debug hook corrupted one byte of guest RAM"
                );
            }
            Err(e) => tracing::error!(gpa = hook.gpa, "debug hook cannot reach guest RAM: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_exit_reports_low_byte() {
        let stop = StopSignal::new();
        DebugExit::new(stop.clone()).write(0, &0x1_03u32.to_le_bytes());
        assert_eq!(stop.reason(), Some(StopReason::GuestExit(3)));
    }

    #[test]
    fn corrupt_hook_flips_a_byte_only_at_its_phase() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(0x5au8, GuestAddress(0x1234)).unwrap();
        let mut p = PhaseMarker::new(
            mem.clone(),
            Some(CorruptHook {
                gpa: 0x1234,
                phase: 2,
            }),
        );
        p.write(0, &1u32.to_le_bytes());
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1234)).unwrap(), 0x5a);
        p.write(0, &2u32.to_le_bytes());
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1234)).unwrap(), !0x5au8);
    }
}
