//! The contract between the virtio-mmio transport and a device model, and the interrupt line
//! the device raises towards the guest.
//!
//! A device owns its queues and its negotiated features; the transport programs them on the
//! driver's behalf and calls [`VirtioDevice::activate`] once the driver sets DRIVER_OK. A device
//! does its I/O on the VMM's event loop (it is also an event-manager subscriber): `activate`
//! only records the memory and wakes the loop through the device's activation event.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

/// Interrupt status bit: the device used buffers in a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the device's configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Virtio device ids (virtio 1.2, section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver made a queue ready whose rings do not fit in guest memory.
    #[error("queue {0} is not valid")]
    InvalidQueue(usize),
    /// Waking the event loop failed.
    #[error("cannot signal the activation event")]
    EventFd(#[source] std::io::Error),
    /// The device cannot work with what the driver negotiated or with its backend.
    #[error("{0}")]
    Device(String),
}

/// The device's interrupt line: the status register the driver reads, and the irqfd that makes
/// KVM inject the interrupt.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq_evt: EventFd,
}

impl Interrupt {
    /// An interrupt that fires `irq_evt` (registered as an irqfd for the device's GSI).
    pub fn new(irq_evt: EventFd) -> Self {
        Interrupt { status: AtomicU32::new(0), irq_evt }
    }

    /// Tell the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Tell the driver that the configuration space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq_evt.write(1)
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges the bits in `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Set the pending bits of a restored device, raising the line again if any is set.
    pub fn restore_status(&self, bits: u32) -> std::io::Result<()> {
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0 {
            self.irq_evt.write(1)?;
        }
        Ok(())
    }

    /// Clear every pending bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The event KVM listens on for this line.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// The virtio device id ([`device_type`]).
    fn device_type(&self) -> u32;

    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;

    /// The feature bits the driver accepted.
    fn acked_features(&self) -> u64;

    /// Record the features the driver accepted (already masked with the offered ones).
    fn set_acked_features(&mut self, features: u64);

    /// The device's queues, in index order.
    fn queues(&self) -> &[Queue];

    /// The device's queues, for the transport to program.
    fn queues_mut(&mut self) -> &mut [Queue];

    /// One event per queue, written when the driver notifies that queue (an ioeventfd in a VM).
    fn queue_events(&self) -> &[EventFd];

    /// The device's interrupt line.
    fn interrupt(&self) -> &Arc<Interrupt>;

    /// Read the device-specific configuration space at `offset`. Bytes beyond its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write the device-specific configuration space. Writes to read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Start serving the queues: the driver set DRIVER_OK.
    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError>;

    /// Whether the device has been activated and not reset since.
    fn is_activated(&self) -> bool;

    /// Why the device cannot be saved now, if it cannot: host-side state that a snapshot
    /// does not keep (open connections) and that the guest has a part of.
    fn unsaved_state(&self) -> Option<String> {
        None
    }

    /// A device restored from a snapshot has just been activated again; returns whether its
    /// configuration space may differ from what the driver read before the snapshot (the
    /// transport then tells the driver so).
    fn restored(&mut self) -> bool {
        false
    }

    /// The driver wrote 0 to the status register: forget the activation, the queues and the
    /// negotiated features, drop backend state tied to the session (connections), and ignore
    /// queue events until the next activation. The backend itself (file, tap) stays.
    fn reset(&mut self);

    /// Accept the 32 feature bits of page `page` that the driver wrote. Bits the device did not
    /// offer are dropped.
    fn ack_features_by_page(&mut self, page: u32, value: u32) {
        let shift = match page {
            0 => 0,
            1 => 32,
            _ => {
                log::warn!("driver acked features in unknown page {page}");
                return;
            }
        };
        let requested = u64::from(value) << shift;
        let unrequested = requested & !self.avail_features();
        if unrequested != 0 {
            log::warn!("driver acked features the device did not offer: {unrequested:#x}");
        }
        let page_mask = 0xffff_ffffu64 << shift;
        let features = (self.acked_features() & !page_mask) | (requested & self.avail_features());
        self.set_acked_features(features);
    }
}

/// Copy the part of `config` at `offset` into `data`, zero-filling what lies outside it. Shared
/// by devices whose configuration space is a plain byte array.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_status_and_ack() {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        irq.signal_used_queue().unwrap();
        irq.signal_config_change().unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.irq_evt().read().unwrap(), 2);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn config_bytes_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 4, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
