//! Address-range buses for port I/O and MMIO. A device owns a range; an access is routed to the
//! device with its offset into that range. Accesses nobody owns are counted and ignored (reads
//! return all ones, as on real hardware with nothing on the bus).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
    Overlap { base: u64, len: u64 },
    #[error("bus range at {0:#x} is empty")]
    Empty(u64),
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// One bus: a map from range start to (length, device).
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at [base, base+len).
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.saturating_add(len);
        let clash = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b.saturating_add(*l) > base);
        if clash {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Routes a read; returns false (and fills `data` with ones) if no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock().expect("device lock poisoned").read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write; returns false if no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .expect("device lock poisoned")
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// The two buses a vCPU exit can be routed to.
#[derive(Clone, Default)]
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let dev = Arc::new(Mutex::new(Recorder(vec![])));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(!bus.read(0x400, &mut d));
        assert_eq!(d, [0xff]);
        assert!(!bus.write(0x3f7, &[1]));
        assert_eq!(dev.lock().unwrap().0, vec![(2, vec![7])]);
    }

    #[test]
    fn refuses_overlaps() {
        let dev = Arc::new(Mutex::new(Recorder(vec![])));
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x108, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0x110, 0x10, dev.clone()).is_ok());
        assert!(bus.insert(0xf0, 0x10, dev.clone()).is_ok());
        assert_eq!(bus.insert(0x200, 0, dev), Err(BusError::Empty(0x200)));
    }
}
