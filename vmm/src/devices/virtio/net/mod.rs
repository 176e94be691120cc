//! virtio-net backed by a host tap (virtio 1.2 section 5.1).
//!
//! The guest sees one network card with a receive queue (0) and a transmit queue (1) of 256
//! entries, its MAC address in the configuration space, and no offloads: every frame travels
//! whole and checksummed, behind a 12-byte `virtio_net_hdr_v1`. The host sees a tap interface,
//! opened (or created) by name when the device is built.
//!
//! The device does not configure the host side of the tap. Whoever owns it must bring the link
//! up and connect it (an address and routing/NAT, or a bridge), e.g.
//! `ip link set dev TAP up && ip addr add 10.0.0.1/30 dev TAP`; until the link is up, frames
//! the guest sends are dropped by the kernel and none come back. No MTU is offered to the
//! guest, which therefore uses 1500: keep the tap's MTU at 1500, as larger frames do not fit
//! the guest's receive buffers and are dropped. A tap the device creates (one that did not
//! exist) is not persistent and disappears when the device is dropped.

mod device;
mod event_handler;
mod packet;
mod tap;

pub use device::{
    format_mac, Net, NetConfig, NetCounters, NetError, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
pub use tap::TapError;

#[cfg(test)]
mod test_host;
#[cfg(test)]
mod tests;
