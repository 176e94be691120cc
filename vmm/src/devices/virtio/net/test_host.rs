//! The host's side of a test tap: unique tap names, bringing the link up, and a packet socket
//! bound to the tap that sends frames into the device and catches the frames it writes.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The EtherType of test frames (IEEE 802 local experimental), so that a test only ever looks
/// at its own frames.
pub const TEST_ETHERTYPE: u16 = 0x88b5;

/// A tap name no other test (of this or another test process) uses: "hk", the pid, a counter.
pub fn unique_tap_name() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!("hk{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    assert!(name.len() < libc::IFNAMSIZ, "{name} is too long for an interface name");
    name
}

/// Whether an interface of that name exists.
pub fn interface_exists(name: &str) -> bool {
    interface_index(name) != 0
}

fn interface_index(name: &str) -> libc::c_uint {
    let c_name = CString::new(name).expect("interface name without NUL");
    // SAFETY: `c_name` is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) }
}

fn check(ret: libc::c_int, what: &str) {
    assert!(ret >= 0, "{what}: {}", io::Error::last_os_error());
}

fn owned(fd: libc::c_int, what: &str) -> OwnedFd {
    check(fd, what);
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Bring the interface up, with IPv6 switched off first so that the kernel sends nothing of
/// its own (router solicitations, DAD) into the tap.
pub fn bring_up(name: &str) {
    let sysctl = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if std::path::Path::new(&sysctl).exists() {
        std::fs::write(&sysctl, "1").expect("disable IPv6 on the test tap");
    }
    // SAFETY: plain socket creation; the result is checked.
    let sock = owned(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) }, "socket");
    // SAFETY: `ifreq` is plain data; all-zero bytes are a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the flags of the valid `ifreq` it is given.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) }, "get flags");
    // SAFETY: SIOCGIFFLAGS has just written `ifru_flags`, the union's active field.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the valid `ifreq` it is given.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr) }, "set flags");
}

/// A raw packet socket bound to one interface.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Bind to interface `name`. The socket is created listening to no protocol and only
    /// starts receiving once bound, so it never holds frames of other interfaces.
    pub fn bind(name: &str) -> PacketSocket {
        let kind = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
        // SAFETY: plain socket creation; the result is checked.
        let fd = owned(unsafe { libc::socket(libc::AF_PACKET, kind, 0) }, "packet socket");
        // SAFETY: `sockaddr_ll` is plain data; all-zero bytes are a valid value of it.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = interface_index(name) as libc::c_int;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let ptr = (&addr as *const libc::sockaddr_ll).cast();
        // SAFETY: `ptr` points to a `sockaddr_ll` of `len` bytes that outlives the call.
        check(unsafe { libc::bind(fd.as_raw_fd(), ptr, len) }, "bind packet socket");
        PacketSocket { fd }
    }

    /// Send `frame` out of the interface: into the tap, towards the device.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: the pointer and length describe `frame`, which outlives the call.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(sent, frame.len() as isize, "send: {}", io::Error::last_os_error());
    }

    /// The next test frame the interface receives within `timeout`.
    pub fn recv_test_frame(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 1 << 17];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd =
                libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: `pfd` is one valid pollfd that outlives the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
            check(ready, "poll");
            if ready == 0 {
                return None;
            }
            let flags = libc::MSG_DONTWAIT;
            // SAFETY: the pointer and length describe `buf`, which outlives the call.
            let n = unsafe {
                libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags)
            };
            check(n as libc::c_int, "recv");
            let frame = &buf[..n as usize];
            if frame.get(12..14) == Some(&TEST_ETHERTYPE.to_be_bytes()[..]) {
                return Some(frame.to_vec());
            }
        }
    }
}

/// An Ethernet frame of `len` bytes to `dst`, of the test EtherType, its payload derived from
/// `tag`.
pub fn test_frame(dst: [u8; 6], tag: u8, len: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&[0x02, 0x68, 0x6f, 0x73, 0x74, 0x01]);
    frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    frame.extend((frame.len()..len).map(|i| tag ^ (i as u8)));
    frame
}
