//! Creating the persistent tap that the VMM attaches to.
//!
//! The tap is made with `TUNSETIFF` (a single-queue `IFF_TAP | IFF_NO_PI` tap) and kept after
//! this file is closed with `TUNSETPERSIST`, in the namespace of the calling thread. The VMM
//! later attaches to it by name (its own `TUNSETIFF` with `IFF_VNET_HDR` added, which an
//! existing tap accepts) and the tap then carries traffic; until then, and after the VMM
//! closes it, it has no carrier and drops what is sent to it. Being persistent, it survives
//! the VMM, killed or not, until it is deleted (`teardown`) or its namespace goes away.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use super::NetworkError;

/// Create the persistent tap `name` in the calling thread's network namespace. `TUNSETIFF`
/// attaches to an existing tap of that name instead of failing: the caller checks first that
/// there is none.
pub fn create_persistent(name: &str) -> Result<(), NetworkError> {
    let fail = |step, source| NetworkError::CreateTap { tap: name.to_owned(), step, source };
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| fail("open /dev/net/tun", e))?;

    // SAFETY: `ifreq` is plain data (byte arrays, integers and a union of them and a raw
    // pointer); all-zero bytes are a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= libc::IFNAMSIZ {
        return Err(fail("name", io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, and `ifr` is a valid, exclusively
    // borrowed `ifreq` that outlives the call; the fd is open.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
    if ret < 0 {
        return Err(fail("TUNSETIFF", io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes its argument (1: persistent) by value; the fd is open and
    // attached to the tap.
    let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST as _, 1 as libc::c_ulong) };
    if ret < 0 {
        // Closing the file removes the tap again, as it is not persistent.
        return Err(fail("TUNSETPERSIST", io::Error::last_os_error()));
    }
    Ok(())
}

/// Switch IPv6 off on interface `name` of the calling thread's namespace, so that the host
/// side sends nothing of its own (router solicitations, duplicate address detection) through
/// the tap to the guest. Nothing to do on a kernel without IPv6.
pub fn disable_ipv6(name: &str) -> Result<(), NetworkError> {
    // /proc/sys/net shows the network namespace of the thread that opens the file.
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(NetworkError::CreateTap { tap: name.to_owned(), step: "disable IPv6", source: e })
        }
        _ => Ok(()),
    }
}
