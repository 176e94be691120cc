//! Port-I/O and MMIO buses: route a vCPU's I/O or MMIO exit to the device that owns the address.
//!
//! A bus is built once, before the vCPUs start, and then shared read-only between vCPU threads;
//! each device sits behind its own mutex so that different devices are served concurrently.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes on a bus. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    /// Fill `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Take what the guest writes at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors when placing a device on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("invalid bus range: base {base:#x}, length {len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
}

/// A shared, lockable device as it sits on a bus.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct BusRange {
    len: u64,
    device: SharedBusDevice,
}

/// An address space (port I/O or MMIO) with devices at non-overlapping ranges.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedBusDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The closest device below `end` is the only one that can overlap.
        if let Some((&other_base, other)) = self.ranges.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` within it, if the whole access of
    /// `size` bytes fits inside that device's range.
    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &BusRange)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then_some((offset, range))
    }

    /// Read from the device at `addr`. Returns false, leaving `data` untouched, if no device
    /// covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, range)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Write to the device at `addr`. Returns false if no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, range)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Lock a device, carrying on if another thread panicked while holding it: device state is
/// plain data and a poisoned lock must not take the whole VM down with a second panic.
fn lock(device: &SharedBusDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_accesses_by_range() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, a.clone()).unwrap();
        bus.insert(0x110, 0x10, b.clone()).unwrap();

        let mut data = [0u8; 2];
        assert!(bus.read(0x104, &mut data));
        assert_eq!(data, [4, 4]);
        assert!(bus.write(0x11f, &[7]));
        assert_eq!(b.lock().unwrap().writes, vec![(0xf, vec![7])]);
        assert!(a.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn rejects_unmapped_and_straddling_accesses() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Recorder::default()))).unwrap();
        let mut data = [0xaau8; 4];
        assert!(!bus.read(0xff, &mut data));
        assert!(!bus.read(0x10e, &mut data), "access crossing the end of a device");
        assert!(!bus.write(0x110, &[1]));
        assert!(!bus.read(u64::MAX, &mut data));
        assert_eq!(data, [0xaa; 4]);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let dev = || -> SharedBusDevice { Arc::new(Mutex::new(Recorder::default())) };
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev()).unwrap();
        assert!(matches!(bus.insert(0x10f, 1, dev()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0xf0, 0x11, dev()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x0, 0x1000, dev()), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x200, 0, dev()), Err(BusError::InvalidRange { .. })));
        assert!(matches!(bus.insert(u64::MAX, 2, dev()), Err(BusError::InvalidRange { .. })));
        bus.insert(0xf0, 0x10, dev()).unwrap();
        bus.insert(0x110, 0x10, dev()).unwrap();
    }
}
