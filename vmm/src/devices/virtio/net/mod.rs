//! virtio-net backed by a host tap (virtio 1.2 section 5.1).
//!
//! The guest sees one network card with a receive queue (0) and a transmit queue (1) of 256
//! entries, its MAC address in the configuration space, and no offloads: every frame travels
//! whole and checksummed, behind a 12-byte `virtio_net_hdr_v1`. The host sees a tap interface,
//! opened (or created) by name when the device is built; its host-side set-up (link up,
//! addresses, bridge) belongs to whoever owns the tap.

mod device;
mod event_handler;
mod packet;
mod tap;

pub use device::{Net, NetConfig, NetCounters, NetError, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
pub use tap::TapError;

#[cfg(test)]
mod test_host;
#[cfg(test)]
mod tests;
