//! The virtio block device model: configuration, construction (the image is opened here, so a
//! bad path fails the VM build), feature bits and configuration space, activation and reset,
//! and the processing of the request queue on the event loop.

use std::io;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::disk::DiskImage;
use super::request::serve_chain;
use super::{QUEUE_SIZE, SECTOR_SIZE};
use crate::devices::virtio::device::{
    device_type, read_config_bytes, ActivateError, Interrupt, VirtioDevice,
};
use crate::memory::GuestMemoryMmap;

/// Most data segments in one request: a chain is at most a queue long, and two of its
/// descriptors are the header and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// What the VMM builder says about one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw disk image (a regular file or a host block device).
    pub path: PathBuf,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO: the guest cannot modify it.
    pub read_only: bool,
    /// The id string VIRTIO_BLK_T_GET_ID returns, at most 20 bytes; by default the image's file
    /// name, truncated to 20 bytes.
    pub id: Option<String>,
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened (missing, not readable, or not writable for a read-write disk).
    #[error(
        "cannot open disk image {} {}: {source}",
        .path.display(),
        if *.read_only { "read-only" } else { "for reading and writing" }
    )]
    Open {
        /// The image's path.
        path: PathBuf,
        /// Whether it was opened read-only.
        read_only: bool,
        /// What the host said.
        #[source]
        source: io::Error,
    },
    /// The path names a directory, a FIFO, a socket or a character device.
    #[error("disk image {} is neither a regular file nor a block device", .path.display())]
    NotADisk {
        /// The image's path.
        path: PathBuf,
    },
    /// The image's size cannot be determined.
    #[error("cannot find the size of disk image {}", .path.display())]
    Size {
        /// The image's path.
        path: PathBuf,
        /// What the host said.
        #[source]
        source: io::Error,
    },
    /// The configured id does not fit the 20 bytes of GET_ID.
    #[error("disk id {id:?} is longer than 20 bytes")]
    IdTooLong {
        /// The configured id.
        id: String,
    },
    /// An eventfd cannot be created.
    #[error("cannot create an event for the block device")]
    EventFd(#[source] io::Error),
    /// The request queue cannot be created.
    #[error("cannot create the block request queue")]
    Queue(#[source] virtio_queue::Error),
}

/// A virtio block device serving one disk image.
pub struct Block {
    pub(super) disk: DiskImage,
    avail_features: u64,
    acked_features: u64,
    config_space: Vec<u8>,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) activate_evt: EventFd,
    /// Whether the queue event is registered with the event loop (done once, at the first
    /// activation).
    pub(super) queue_events_registered: bool,
    interrupt: Arc<Interrupt>,
    /// Guest memory, present while the device is activated.
    mem: Option<GuestMemoryMmap>,
}

impl Block {
    /// Open the image of `config` and build the device; it raises `interrupt` when it
    /// completes requests.
    pub fn new(config: BlockConfig, interrupt: Arc<Interrupt>) -> Result<Self, BlockError> {
        let disk = DiskImage::open(&config.path, config.read_only, config.id.as_deref())?;
        let queue = Queue::new(QUEUE_SIZE).map_err(BlockError::Queue)?;
        let queue_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        let activate_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        Ok(Block {
            avail_features: features(config.read_only),
            acked_features: 0,
            config_space: config_space(disk.capacity()),
            disk,
            queues: vec![queue],
            queue_evts: vec![queue_evt],
            activate_evt,
            queue_events_registered: false,
            interrupt,
            mem: None,
        })
    }

    /// The disk's capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// Serve every request the driver made available, then interrupt the guest if it wants to
    /// hear about the completions. Does nothing unless activated.
    pub(super) fn process_queue(&mut self) {
        let Some(mem) = self.mem.as_ref() else { return };
        let Some(queue) = self.queues.first_mut() else {
            return;
        };
        if serve_queue(queue, mem, &self.disk) == 0 {
            return;
        }
        match queue.needs_notification(mem) {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = self.interrupt.signal_used_queue() {
                    log::error!(
                        "block {}: cannot interrupt the guest: {e}",
                        self.disk.path().display()
                    );
                }
            }
            Err(e) => {
                log::error!("block {}: cannot read used_event: {e}", self.disk.path().display())
            }
        }
    }
}

/// Serve the chains available in `queue` until the driver stops adding them, with driver
/// notifications suppressed meanwhile. Returns how many chains were returned used. A broken
/// queue (bad available index, unusable rings) is logged and left alone.
fn serve_queue(queue: &mut Queue, mem: &GuestMemoryMmap, disk: &DiskImage) -> usize {
    let mut used = 0;
    // A round that finds nothing right after another one means the available ring cannot be
    // read; stop rather than spin.
    let mut empty_rounds = 0;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            log::warn!("block {}: cannot suppress notifications: {e}", disk.path().display());
        }
        let served = match serve_available(queue, mem, disk) {
            Ok(served) => served,
            Err(e) => {
                log::warn!("block {}: request queue is unusable: {e}", disk.path().display());
                return used;
            }
        };
        used += served;
        empty_rounds = if served == 0 { empty_rounds + 1 } else { 0 };
        match queue.enable_notification(mem) {
            Ok(true) if empty_rounds < 2 => continue,
            Ok(_) => return used,
            Err(e) => {
                log::warn!("block {}: cannot enable notifications: {e}", disk.path().display());
                return used;
            }
        }
    }
}

/// Serve the chains available now; returns how many were returned used.
fn serve_available(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &DiskImage,
) -> Result<usize, virtio_queue::Error> {
    let size = queue.size();
    let chains: Vec<_> = queue.iter(mem)?.collect();
    let mut used = 0;
    for chain in chains {
        let head = chain.head_index();
        if head >= size {
            // Such a chain cannot be returned: the used ring only takes heads in range.
            log::debug!("block {}: chain head {head} is out of range", disk.path().display());
            continue;
        }
        let len = serve_chain(disk, mem, chain, usize::from(size));
        queue.add_used(mem, head, len)?;
        used += 1;
    }
    Ok(used)
}

/// The feature bits offered for a read-write or read-only disk.
fn features(read_only: bool) -> u64 {
    let mut features = (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_RING_F_EVENT_IDX)
        | (1u64 << VIRTIO_BLK_F_FLUSH)
        | (1u64 << VIRTIO_BLK_F_SEG_MAX)
        | (1u64 << VIRTIO_BLK_F_BLK_SIZE);
    if read_only {
        features |= 1u64 << VIRTIO_BLK_F_RO;
    }
    features
}

/// The bytes of struct virtio_blk_config: capacity, seg_max and blk_size; the rest is 0.
fn config_space(capacity: u64) -> Vec<u8> {
    let mut config = vec![0u8; size_of::<virtio_blk_config>()];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(offset_of!(virtio_blk_config, capacity), &capacity.to_le_bytes());
    put(offset_of!(virtio_blk_config, seg_max), &SEG_MAX.to_le_bytes());
    put(offset_of!(virtio_blk_config, blk_size), &(SECTOR_SIZE as u32).to_le_bytes());
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "block {}: driver wrote {} bytes of the read-only configuration at {offset:#x}",
            self.disk.path().display(),
            data.len()
        );
    }

    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        let event_idx = self.acked_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.queues.iter_mut().for_each(|q| q.set_event_idx(event_idx));
        self.activate_evt.write(1).map_err(ActivateError::EventFd)?;
        self.mem = Some(mem);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.mem.is_some()
    }

    /// The restored VM's disk may not be the one saved (a VM saved with an empty disk is given
    /// its real one): the driver reads the capacity again.
    fn restored(&mut self) -> bool {
        true
    }

    fn reset(&mut self) {
        self.mem = None;
        self.acked_features = 0;
        self.queues.iter_mut().for_each(|q| q.reset());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let config = config_space(0x1_2345_6789);
        assert_eq!(config.len(), size_of::<virtio_blk_config>());
        assert_eq!(config[0..8], 0x1_2345_6789u64.to_le_bytes());
        assert_eq!(config[12..16], 254u32.to_le_bytes(), "seg_max");
        assert_eq!(config[20..24], 512u32.to_le_bytes(), "blk_size");
        assert!(config[8..12].iter().chain(&config[16..20]).chain(&config[24..]).all(|&b| b == 0));
    }

    #[test]
    fn read_only_is_offered_only_for_read_only_disks() {
        assert_eq!(features(true) & (1 << VIRTIO_BLK_F_RO), 1 << VIRTIO_BLK_F_RO);
        assert_eq!(features(false) & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(features(true) & !(1 << VIRTIO_BLK_F_RO), features(false));
    }
}
