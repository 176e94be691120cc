//! virtio-vsock, hybrid flavour: guest AF_VSOCK streams end on host Unix sockets instead of
//! host AF_VSOCK sockets (there is no vhost-vsock here), as Firecracker does it.
//!
//! - [`device`]: the device model, its configuration and the rx/tx queue processing;
//! - [`event_handler`]: its life on the VMM's event loop;
//! - [`packet`]: the `virtio_vsock_hdr` wire format and packet (de)serialisation;
//! - [`unix`]: the host side: the listener, the connections and their state machine.
//!
//! The guest needs no kernel command line for it: it is found on the virtio-mmio bus like any
//! other device, and its CID comes from the configuration space.

pub mod device;
pub mod event_handler;
pub mod packet;
pub mod unix;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use device::{Vsock, VsockConfig, VsockError};
pub use unix::ListenerError;

/// The host's context id.
pub const HOST_CID: u64 = 2;
