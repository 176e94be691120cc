//! The host side of the hybrid vsock device: guest streams end on host Unix sockets.
//!
//! - A host process reaches guest port P by connecting to `uds_path` and sending
//!   `CONNECT <P>\n`; once the guest accepts it reads `OK <host port>\n` and the socket becomes
//!   the stream ([`host_client`], [`connection`]).
//! - A guest connection to host port P is connected to the Unix socket `<uds_path>_<P>`.
//!
//! [`muxer`] ties the connections, the listener and the event loop together; [`socket`] holds
//! the raw socket calls.

pub mod connection;
pub mod host_client;
pub mod muxer;
pub mod socket;

pub use muxer::{service_path, Muxer, MuxerError};
pub use socket::ListenerError;
