//! The virtio block device (virtio 1.2 section 5.2): a raw disk image file, read-write or
//! read-only, served to the guest through one request queue.
//!
//! - `device`: the [`Block`] device, its [`BlockConfig`], its [`BlockError`] and the
//!   `VirtioDevice` implementation (features, configuration space, queue processing).
//! - `event_handler`: the event-manager subscriber that runs the device on the VMM's event loop.
//! - `request`: framing a descriptor chain (header, data, status byte) and parsing, checking and
//!   executing the request it carries.
//! - `disk`: the image file: opening it, its capacity and id, positional I/O straight between
//!   the file and guest memory.
//!
//! Every disk is its own `Block` instance; nothing is shared between them.

mod device;
mod disk;
mod event_handler;
mod request;
#[cfg(test)]
mod tests;

pub use device::{Block, BlockConfig, BlockError};

/// Bytes per sector: the unit of the capacity and of request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of the id string returned by VIRTIO_BLK_T_GET_ID.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
