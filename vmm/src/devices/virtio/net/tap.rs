//! The host side of the network device: a tap interface opened through `/dev/net/tun`.
//!
//! The tap is opened by name with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: every read returns one
//! Ethernet frame behind a 12-byte `virtio_net_hdr_v1`, and every write takes one. If no
//! interface of that name exists, the kernel creates a non-persistent tap that disappears when
//! this file is closed; an existing tap (for example one made persistent with
//! `ip tuntap add dev NAME mode tap`) is attached to. The fd is non-blocking.
//!
//! Offloads are switched off (`TUNSETOFFLOAD` with 0), so the kernel checksums and segments
//! every frame before handing it to us: no frame is larger than the tap's MTU plus the Ethernet
//! header, and the header's checksum and GSO fields are always empty.
//!
//! The tap's host-side configuration (bringing the link up, addresses, bridges, MTU) is left to
//! whoever owns the tap: husk's runtime, or the administrator for a persistent tap.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::packet::VNET_HDR_LEN;

/// Where the kernel's tun/tap driver is reached.
const TUN_PATH: &str = "/dev/net/tun";

/// Why a tap could not be opened. Every variant names the tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// There is no tun/tap driver to talk to.
    #[error("cannot open {TUN_PATH} for tap {tap}: the tun driver is not available")]
    NoTunDevice {
        tap: String,
        #[source]
        source: io::Error,
    },
    /// The process may not create the tap, or may not attach to the existing one.
    #[error(
        "no permission to open tap {tap}: creating a tap needs CAP_NET_ADMIN, and attaching to a \
         persistent one needs to be its owner"
    )]
    PermissionDenied {
        tap: String,
        #[source]
        source: io::Error,
    },
    /// Interface names have at most `IFNAMSIZ - 1` bytes.
    #[error("tap name {tap:?} is too long: at most {} bytes", libc::IFNAMSIZ - 1)]
    NameTooLong { tap: String },
    /// The name is empty, "." or "..", or holds '/', ':', NUL or white space.
    #[error("tap name {tap:?} is not a valid interface name")]
    InvalidName { tap: String },
    /// Another file (another VMM) is already attached to this single-queue tap.
    #[error("tap {tap} is busy: another process has it open")]
    Busy { tap: String },
    /// An interface of that name exists and is not a single-queue tap.
    #[error("interface {tap} exists and is not a single-queue tap")]
    NotATap {
        tap: String,
        #[source]
        source: io::Error,
    },
    /// Any other failure of an open or set-up step.
    #[error("cannot set up tap {tap}: {step}")]
    Setup {
        tap: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Open (or create) the tap `name`, with the virtio-net header in front of every frame and
    /// no offloads.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let ifr_name = interface_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| open_error(name, source))?;
        let tap = Tap { file, name: name.to_owned() };
        tap.attach(ifr_name)?;
        tap.set_vnet_header_size()?;
        tap.disable_offloads()?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Read one packet (virtio-net header and frame) into `buf`. Fails with `WouldBlock` when
    /// the tap has nothing queued.
    pub fn read_packet(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Write one packet (virtio-net header and frame). Fails with `WouldBlock` when the tap
    /// cannot take it now.
    pub fn write_packet(&self, packet: &[u8]) -> io::Result<usize> {
        (&self.file).write(packet)
    }

    /// `TUNSETIFF`: attach this file to the interface, creating it if needed.
    fn attach(&self, ifr_name: [libc::c_char; libc::IFNAMSIZ]) -> Result<(), TapError> {
        // SAFETY: `ifreq` is plain data (byte arrays, integers and a union of them and a raw
        // pointer); all-zero bytes are a valid value of it.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifr_name;
        ifr.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, and `ifr` is a valid, exclusively
        // borrowed `ifreq` that outlives the call; the fd is open.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
        if ret < 0 {
            return Err(attach_error(&self.name, io::Error::last_os_error()));
        }
        Ok(())
    }

    /// `TUNSETVNETHDRSZ`: frames carry a `virtio_net_hdr_v1` (12 bytes).
    fn set_vnet_header_size(&self) -> Result<(), TapError> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points to `size`
        // and outlives the call; the fd is open.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &size) };
        self.check(ret, "TUNSETVNETHDRSZ")
    }

    /// `TUNSETOFFLOAD` with no offloads: the tap never hands us frames that still need a
    /// checksum or segmentation.
    fn disable_offloads(&self) -> Result<(), TapError> {
        let offloads: libc::c_ulong = 0;
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is open.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD as _, offloads) };
        self.check(ret, "TUNSETOFFLOAD")
    }

    fn check(&self, ret: libc::c_int, step: &'static str) -> Result<(), TapError> {
        if ret < 0 {
            let source = io::Error::last_os_error();
            return Err(TapError::Setup { tap: self.name.clone(), step, source });
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Check `name` as the kernel's `dev_valid_name` does and turn it into an `ifr_name`.
fn interface_name(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], TapError> {
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(TapError::NameTooLong { tap: name.to_owned() });
    }
    let bad_byte = |b: &u8| matches!(b, b'/' | b':' | 0) || b.is_ascii_whitespace();
    if bytes.is_empty() || name == "." || name == ".." || bytes.iter().any(bad_byte) {
        return Err(TapError::InvalidName { tap: name.to_owned() });
    }
    let mut ifr_name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, &src) in ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    Ok(ifr_name)
}

/// The error for a failed open of `/dev/net/tun`.
fn open_error(tap: &str, source: io::Error) -> TapError {
    let tap = tap.to_owned();
    match source.raw_os_error() {
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TapError::NoTunDevice { tap, source },
        Some(libc::EACCES | libc::EPERM) => TapError::PermissionDenied { tap, source },
        _ => TapError::Setup { tap, step: "open /dev/net/tun", source },
    }
}

/// The error for a failed `TUNSETIFF`.
fn attach_error(tap: &str, source: io::Error) -> TapError {
    let tap = tap.to_owned();
    match source.raw_os_error() {
        Some(libc::EBUSY) => TapError::Busy { tap },
        Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied { tap, source },
        Some(libc::EINVAL) => TapError::NotATap { tap, source },
        _ => TapError::Setup { tap, step: "TUNSETIFF", source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::test_host::{interface_exists, unique_tap_name};

    #[test]
    fn a_new_tap_exists_while_open_and_vanishes_on_close() {
        let name = unique_tap_name();
        let tap = Tap::open(&name).unwrap();
        assert_eq!(tap.name(), name);
        assert!(interface_exists(&name));
        drop(tap);
        assert!(!interface_exists(&name), "the non-persistent tap must vanish with its fd");
    }

    #[test]
    fn an_empty_tap_would_block() {
        let tap = Tap::open(&unique_tap_name()).unwrap();
        let mut buf = [0u8; 64];
        let err = tap.read_packet(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_name_of_fifteen_bytes_is_accepted_and_sixteen_refused() {
        let base = unique_tap_name();
        let longest = format!("{base:z<15}");
        assert!(Tap::open(&longest).is_ok());
        let too_long = format!("{base:z<16}");
        let err = Tap::open(&too_long).unwrap_err();
        assert!(matches!(err, TapError::NameTooLong { .. }), "{err}");
        assert!(err.to_string().contains(&too_long));
        assert!(!interface_exists(&too_long[..15]));
    }

    #[test]
    fn invalid_names_are_refused() {
        for name in ["", ".", "..", "hk/a", "hk:a", "hk a", "hk\ta", "hk\0a"] {
            let err = Tap::open(name).unwrap_err();
            assert!(matches!(err, TapError::InvalidName { .. }), "{name:?}: {err}");
        }
    }

    #[test]
    fn a_tap_open_elsewhere_is_busy() {
        let name = unique_tap_name();
        let _first = Tap::open(&name).unwrap();
        let err = Tap::open(&name).unwrap_err();
        assert!(matches!(err, TapError::Busy { .. }), "{err}");
        assert!(err.to_string().contains(&name), "{err}");
    }

    #[test]
    fn an_interface_that_is_not_a_tap_is_refused() {
        let err = Tap::open("lo").unwrap_err();
        assert!(matches!(err, TapError::NotATap { .. }), "{err}");
        assert!(err.to_string().contains("lo"));
    }

    #[test]
    fn open_failures_are_classified() {
        let err = |errno| io::Error::from_raw_os_error(errno);
        assert!(matches!(open_error("t", err(libc::ENOENT)), TapError::NoTunDevice { .. }));
        assert!(matches!(open_error("t", err(libc::EACCES)), TapError::PermissionDenied { .. }));
        assert!(matches!(open_error("t", err(libc::EMFILE)), TapError::Setup { .. }));
        assert!(matches!(attach_error("t", err(libc::EPERM)), TapError::PermissionDenied { .. }));
        assert!(matches!(attach_error("t", err(libc::EBUSY)), TapError::Busy { .. }));
        let message = open_error("tap7", err(libc::ENOENT)).to_string();
        assert!(message.contains("tap7") && message.contains(TUN_PATH), "{message}");
    }
}
