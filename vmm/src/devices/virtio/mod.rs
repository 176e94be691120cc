//! Virtio devices: the device contract, the virtio-mmio transport, and the device models.

pub mod block;
pub mod device;
pub mod mmio;
pub mod net;
pub mod state;
pub mod vsock;

#[cfg(test)]
pub mod test_utils;

pub use device::{ActivateError, Interrupt, VirtioDevice};
pub use mmio::MmioTransport;
