//! The boot timer: a guest write of [`BOOT_TIMER_MAGIC`] to the first byte of its MMIO window
//! marks the moment userspace started, timestamped against the VMM's start (as Firecracker's
//! boot timer does), so boot time is measured without reading the console.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::bus::BusDevice;

/// The value the guest writes.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// The boot-timer device.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    boot_time: Arc<Mutex<Option<Duration>>>,
}

impl BootTimer {
    /// A timer counting from `start` (when the VMM began building the VM).
    pub fn new(start: Instant) -> Self {
        BootTimer { start, boot_time: Arc::new(Mutex::new(None)) }
    }

    /// Where the first mark is kept, to read after the VM ends.
    pub fn boot_time(&self) -> Arc<Mutex<Option<Duration>>> {
        self.boot_time.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        let elapsed = self.start.elapsed();
        let mut boot_time = self.boot_time.lock().unwrap_or_else(|e| e.into_inner());
        if boot_time.is_none() {
            log::info!(
                "boot-timer: guest userspace after {} us ({:.1} ms)",
                elapsed.as_micros(),
                elapsed.as_secs_f64() * 1000.0
            );
            *boot_time = Some(elapsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_magic_write_only() {
        let mut timer = BootTimer::new(Instant::now());
        let boot_time = timer.boot_time();
        timer.write(1, &[BOOT_TIMER_MAGIC]);
        timer.write(0, &[1]);
        assert!(boot_time.lock().unwrap().is_none());
        timer.write(0, &[BOOT_TIMER_MAGIC, 0, 0, 0]);
        let first = boot_time.lock().unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(boot_time.lock().unwrap().unwrap(), first);
    }
}
