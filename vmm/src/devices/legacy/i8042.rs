//! The i8042 keyboard controller, reduced to what a micro-VM needs: Linux's `reboot=k` pulses
//! the CPU reset line through it, which ends the VM. The reset also raises a stop flag that the
//! vCPU loops check right after the I/O exit, so the guest never runs on into its fallback
//! reboot methods (BIOS restart, triple fault) while the VMM is stopping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// The reset line: sets the VM's stop flag, then wakes the event loop.
#[derive(Debug)]
pub struct ResetTrigger {
    stop: Arc<AtomicBool>,
    evt: EventFd,
}

impl Trigger for ResetTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.evt.write(1)
    }
}

/// The i8042 at ports 0x60-0x64.
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A controller whose reset sets `stop` and writes `reset_evt`.
    pub fn new(stop: Arc<AtomicBool>, reset_evt: EventFd) -> Self {
        I8042(I8042Device::new(ResetTrigger { stop, evt: reset_evt }))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] => *byte = self.0.read(offset as u8),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [byte] = data {
            if let Err(e) = self.0.write(offset as u8, *byte) {
                log::error!("i8042 reset line: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_sets_stop_and_signals() {
        let stop = Arc::new(AtomicBool::new(false));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut i8042 = I8042::new(stop.clone(), evt.try_clone().unwrap());
        i8042.write(4, &[0x20]);
        assert!(!stop.load(Ordering::SeqCst));
        i8042.write(4, &[0xfe]);
        assert!(stop.load(Ordering::SeqCst));
        assert_eq!(evt.read().unwrap(), 1);
    }
}
