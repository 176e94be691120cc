//! The virtio-mmio transport, version 2 ("modern", virtio 1.2 section 4.2.2): the register
//! window through which the guest driver discovers a device, negotiates features, programs the
//! queues and drives the status state machine.
//!
//! Every register access comes from the guest and is checked: wrong widths, unknown offsets,
//! out-of-order status changes and queue programming outside the allowed states are ignored
//! (with a warning), never trusted.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::QueueT;

use super::device::VirtioDevice;
use super::state::TransportRegisters;
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemoryMmap;

/// "virt" in little endian.
const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio layout.
const MMIO_VERSION: u32 = 2;
/// "HUSK" in little endian.
const VENDOR_ID: u32 = 0x4b53_5548;

/// Size of one device's register window (registers plus configuration space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the queue-notify register, where the VMM puts the queues' ioeventfds.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space.
const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device may process queues.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// A virtio device behind its virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    device_features_select: u32,
    driver_features_select: u32,
    queue_select: u32,
    device_status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// Wrap `device`; `mem` is the guest memory handed to it at activation.
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        MmioTransport {
            device,
            mem,
            device_features_select: 0,
            driver_features_select: 0,
            queue_select: 0,
            device_status: 0,
            config_generation: 0,
        }
    }

    /// The device behind the window.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// The current device status register.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    pub(super) fn locked_device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether all bits of `set` and none of `clear` are in the status.
    fn status_is(&self, set: u32, clear: u32) -> bool {
        self.device_status & set == set && self.device_status & clear == 0
    }

    /// Apply `f` to the selected queue, if queue programming is allowed now: after
    /// FEATURES_OK and before DRIVER_OK, and only while that queue is not ready (except for the
    /// ready bit itself, which `allow_ready` lets through).
    fn with_selected_queue(&mut self, allow_ready: bool, f: impl FnOnce(&mut virtio_queue::Queue)) {
        if !self.status_is(status::FEATURES_OK, status::DRIVER_OK | status::FAILED) {
            log::warn!("queue programmed in device status {:#x}", self.device_status);
            return;
        }
        let sel = self.queue_select as usize;
        let mut device = self.locked_device();
        match device.queues_mut().get_mut(sel) {
            Some(q) if allow_ready || !q.ready() => f(q),
            Some(_) => log::warn!("queue {sel} changed while ready"),
            None => log::warn!("queue {sel} selected but the device has no such queue"),
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let device = self.locked_device();
        let selected_queue = device.queues().get(self.queue_select as usize);
        match offset {
            0x00 => MMIO_MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_select {
                0 => device.avail_features() as u32,
                1 => (device.avail_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => selected_queue.map_or(0, |q| u32::from(q.max_size())),
            0x44 => selected_queue.map_or(0, |q| u32::from(q.ready())),
            0x60 => device.interrupt().status(),
            0x70 => self.device_status,
            0xfc => self.config_generation,
            _ => {
                log::warn!("virtio-mmio read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.device_features_select = v,
            0x20 => {
                if self.status_is(status::DRIVER, status::FEATURES_OK | status::FAILED) {
                    self.locked_device().ack_features_by_page(self.driver_features_select, v);
                } else {
                    log::warn!("features acked in device status {:#x}", self.device_status);
                }
            }
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 => self.with_selected_queue(false, |q| q.set_size(v as u16)),
            0x44 => self.with_selected_queue(true, |q| q.set_ready(v == 1)),
            0x50 => self.notify_queue(v),
            0x64 => self.locked_device().interrupt().ack(v),
            0x70 => self.set_device_status(v),
            0x80 => self.with_selected_queue(false, |q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.with_selected_queue(false, |q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.with_selected_queue(false, |q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.with_selected_queue(false, |q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.with_selected_queue(false, |q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.with_selected_queue(false, |q| q.set_used_ring_address(None, Some(v))),
            _ => log::warn!("virtio-mmio write of unknown register {offset:#x}"),
        }
    }

    /// A queue notification that reached the transport instead of an ioeventfd.
    fn notify_queue(&self, index: u32) {
        let device = self.locked_device();
        match device.queue_events().get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::error!("cannot signal queue {index}: {e}");
                }
            }
            None => log::warn!("notification for unknown queue {index}"),
        }
    }

    /// The driver writes the whole status; only the next step of the initialisation sequence,
    /// FAILED, or 0 (reset) are accepted.
    fn set_device_status(&mut self, new: u32) {
        use status::*;
        if new == 0 {
            self.reset();
            return;
        }
        if new & FAILED != 0 {
            self.device_status |= FAILED;
            return;
        }
        let old = self.device_status;
        let added = new & !old;
        let expected_before = match added {
            ACKNOWLEDGE => 0,
            DRIVER => ACKNOWLEDGE,
            FEATURES_OK => ACKNOWLEDGE | DRIVER,
            DRIVER_OK => ACKNOWLEDGE | DRIVER | FEATURES_OK,
            _ => {
                log::warn!("invalid device status change {old:#x} -> {new:#x}");
                return;
            }
        };
        if old != expected_before || new & old != old {
            log::warn!("invalid device status change {old:#x} -> {new:#x}");
            return;
        }
        self.device_status = new;
        if added == DRIVER_OK {
            self.activate();
        }
    }

    fn try_activate(&mut self) -> Result<(), super::device::ActivateError> {
        let mem = self.mem.clone();
        let mut device = self.locked_device();
        match device.queues().iter().position(|q| q.ready() && !q.is_valid(&mem)) {
            Some(index) => Err(super::device::ActivateError::InvalidQueue(index)),
            None if device.is_activated() => Ok(()),
            None => device.activate(mem),
        }
    }

    fn activate(&mut self) {
        if let Err(e) = self.try_activate() {
            log::error!("cannot activate virtio device: {e}");
            self.device_status |= status::DEVICE_NEEDS_RESET;
            if let Err(e) = self.config_changed() {
                log::error!("cannot signal the configuration change: {e}");
            }
        }
    }

    /// Activate a device restored with DRIVER_OK in its status.
    pub(super) fn activate_restored(&mut self) -> Result<(), String> {
        self.try_activate().map_err(|e| e.to_string())
    }

    /// Tell the driver the configuration space changed (a new generation).
    pub(super) fn config_changed(&mut self) -> std::io::Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.locked_device().interrupt().signal_config_change()
    }

    /// The transport's own registers, for a snapshot.
    pub(super) fn registers(&self) -> TransportRegisters {
        TransportRegisters {
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            device_status: self.device_status,
            config_generation: self.config_generation,
        }
    }

    /// Set the transport's own registers from a snapshot.
    pub(super) fn set_registers(&mut self, regs: &TransportRegisters) {
        self.device_features_select = regs.device_features_select;
        self.driver_features_select = regs.driver_features_select;
        self.queue_select = regs.queue_select;
        self.device_status = regs.device_status;
        self.config_generation = regs.config_generation;
    }

    fn reset(&mut self) {
        {
            let mut device = self.locked_device();
            device.reset();
            device.interrupt().clear();
        }
        self.device_status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.locked_device().read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::warn!("virtio-mmio register read of {} bytes at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.status_is(status::DRIVER, status::FAILED) {
                self.locked_device().write_config(offset - CONFIG_SPACE_OFFSET, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            } else {
                log::warn!("config written in device status {:#x}", self.device_status);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::warn!("virtio-mmio register write of {} bytes at {offset:#x}", data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            log::warn!("unaligned virtio-mmio register write at {offset:#x}");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
