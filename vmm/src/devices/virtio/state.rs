//! A virtio-mmio device's state in a snapshot: its transport's registers, the features the
//! driver accepted, its queues and pending interrupt bits. Restoring it into a device built
//! from the same configuration activates the device again if the driver had.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::mmio::{status, MmioTransport};
use crate::snapshot::SnapshotError;

/// virtio-queue's `QueueState` (which has no serde) as a snapshot stores it.
#[derive(Serialize, Deserialize)]
#[serde(remote = "QueueState")]
struct QueueStateDef {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// One virtio queue in a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct QueueSnapshot(#[serde(with = "QueueStateDef")] QueueState);

/// The virtio-mmio transport's own registers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransportRegisters {
    pub(super) device_features_select: u32,
    pub(super) driver_features_select: u32,
    pub(super) queue_select: u32,
    pub(super) device_status: u32,
    pub(super) config_generation: u32,
}

/// A virtio-mmio device: transport registers, device features and queues.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    device_type: u32,
    transport: TransportRegisters,
    acked_features: u64,
    interrupt_status: u32,
    queues: Vec<QueueSnapshot>,
}

impl MmioTransport {
    /// This device's state, for a snapshot (nothing runs on it meanwhile).
    pub fn snapshot(&self) -> VirtioSnapshot {
        let device = self.locked_device();
        VirtioSnapshot {
            device_type: device.device_type(),
            transport: self.registers(),
            acked_features: device.acked_features(),
            interrupt_status: device.interrupt().status(),
            queues: device.queues().iter().map(|q| QueueSnapshot(q.state())).collect(),
        }
    }

    /// Put `saved` into this device, just built from the configuration it was saved with, and
    /// activate it if the driver had; then let it tell the driver what the snapshot did not
    /// keep.
    pub fn restore(&mut self, saved: &VirtioSnapshot) -> Result<(), SnapshotError> {
        {
            let mut device = self.locked_device();
            if device.device_type() != saved.device_type {
                return Err(SnapshotError::Mismatch(format!(
                    "virtio device type {} where the snapshot has {}",
                    device.device_type(),
                    saved.device_type
                )));
            }
            if device.queues().len() != saved.queues.len() {
                return Err(SnapshotError::Mismatch(format!(
                    "virtio device with {} queues where the snapshot has {}",
                    device.queues().len(),
                    saved.queues.len()
                )));
            }
            let offered = device.avail_features();
            device.set_acked_features(saved.acked_features & offered);
            for (queue, saved) in device.queues_mut().iter_mut().zip(&saved.queues) {
                *queue = Queue::try_from(saved.0).map_err(SnapshotError::Queue)?;
            }
        }
        self.set_registers(&saved.transport);
        let driver_ok = saved.transport.device_status & status::DRIVER_OK != 0;
        if driver_ok {
            self.activate_restored().map_err(SnapshotError::Activate)?;
        }
        let mut device = self.locked_device();
        let io = |e: std::io::Error| SnapshotError::Activate(e.to_string());
        device.interrupt().restore_status(saved.interrupt_status).map_err(io)?;
        if driver_ok {
            // A notification the guest made just before the save reached only the saved VM's
            // event: the device looks at each queue once, as if notified.
            for evt in device.queue_events() {
                evt.write(1).map_err(io)?;
            }
        }
        if driver_ok && device.restored() {
            drop(device);
            self.config_changed().map_err(io)?;
        }
        Ok(())
    }
}
