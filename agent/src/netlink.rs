//! A small rtnetlink (NETLINK_ROUTE) client for the guest's links, addresses and routes:
//! requests sent one at a time and acknowledged, dumps read to their end. The agent is
//! synchronous, so it encodes and decodes the few messages it needs here, in native byte order
//! as the kernel wants them.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

// <linux/netlink.h>
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_CREATE: u16 = 0x400;
// <linux/rtnetlink.h>
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_DELROUTE: u16 = 25;
pub const RTM_GETROUTE: u16 = 26;

/// struct nlmsghdr: length, type, flags, sequence number, port id.
const HEADER_LEN: usize = 16;
/// How long the kernel may take to answer, in seconds.
const TIMEOUT_S: i64 = 10;

/// A NETLINK_ROUTE socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

/// A message the kernel sent: its type and what follows its header.
pub struct Message {
    pub kind: u16,
    pub body: Vec<u8>,
}

impl Netlink {
    pub fn open() -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(TIMEOUT_S, 0))?;
        Ok(Self { fd, seq: 0 })
    }

    /// Send a request (`flags` beyond REQUEST and ACK, e.g. CREATE) and wait for the kernel's
    /// acknowledgement: its error if the request failed.
    pub fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        let seq = self.send(kind, flags | NLM_F_ACK, body)?;
        loop {
            if let Some(m) = self.recv(seq)?.into_iter().find(|m| m.kind == NLMSG_ERROR) {
                return ack(&m.body);
            }
        }
    }

    /// Ask for a dump (`body` the request's fixed header, which filters some dumps) and read
    /// every answer up to its end.
    pub fn dump(&mut self, kind: u16, body: &[u8]) -> io::Result<Vec<Message>> {
        let seq = self.send(kind, NLM_F_DUMP, body)?;
        let mut out = Vec::new();
        loop {
            for m in self.recv(seq)? {
                match m.kind {
                    // Both carry an error number (0 for a complete dump).
                    NLMSG_DONE | NLMSG_ERROR => return ack(&m.body).map(|()| out),
                    _ => out.push(m),
                }
            }
        }
    }

    fn send(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = u32::try_from(HEADER_LEN + body.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        let kernel = NetlinkAddr::new(0, 0);
        socket::sendto(self.fd.as_raw_fd(), &msg, &kernel, MsgFlags::empty())?;
        Ok(self.seq)
    }

    /// One datagram's messages that answer request `seq`.
    fn recv(&self, seq: u32) -> io::Result<Vec<Message>> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut out = Vec::new();
        let mut rest = &buf[..n];
        while rest.len() >= HEADER_LEN {
            let len = u32_at(rest, 0) as usize;
            if len < HEADER_LEN || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            if u32_at(rest, 8) == seq {
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                out.push(Message { kind, body: rest[HEADER_LEN..len].to_vec() });
            }
            rest = &rest[align(len).min(rest.len())..];
        }
        Ok(out)
    }
}

/// An acknowledgement's (or a dump end's) error number: 0, or minus an errno.
fn ack(body: &[u8]) -> io::Result<()> {
    match body.get(..4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])) {
        Some(0) => Ok(()),
        Some(e) => Err(io::Error::from_raw_os_error(-e)),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink acknowledgement")),
    }
}

/// Netlink's 4-byte alignment.
fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The native-endian u32 at `offset` (the caller checked the length).
pub fn u32_at(b: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes([b[offset], b[offset + 1], b[offset + 2], b[offset + 3]])
}

/// Append an attribute (struct rtattr: length, type, then the data, padded).
pub fn put_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len() + align(len) - len, 0);
}

/// The attributes of a message body after its fixed header of `header_len` bytes: (type, data)
/// pairs, the type without its nested and byte-order flags.
pub fn attrs(body: &[u8], header_len: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = body.get(header_len..).unwrap_or_default();
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        if len < 4 || len > rest.len() {
            break;
        }
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        out.push((kind, &rest[4..len]));
        rest = &rest[align(len).min(rest.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding() {
        let mut body = vec![7u8; 8];
        put_attr(&mut body, 3, b"eth0\0");
        put_attr(&mut body, 4, &1500u32.to_ne_bytes());
        // 8 + (4 + 5, padded to 12) + 8
        assert_eq!(body.len(), 28);
        let a = attrs(&body, 8);
        assert_eq!(a, [(3, &b"eth0\0"[..]), (4, &1500u32.to_ne_bytes()[..])]);
        // A truncated attribute ends the list.
        assert_eq!(attrs(&body[..24], 8).len(), 1);
    }

    #[test]
    fn acknowledgements() {
        assert!(ack(&0i32.to_ne_bytes()).is_ok());
        let e = ack(&(-libc::EEXIST).to_ne_bytes()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert!(ack(&[0, 0]).is_err());
    }

    #[test]
    fn dumps_this_namespaces_links() {
        // Reading is harmless: lo is in every network namespace.
        let mut nl = Netlink::open().unwrap();
        let links = nl.dump(RTM_GETLINK, &[0u8; 16]).unwrap();
        assert!(links.iter().all(|m| m.kind == RTM_NEWLINK));
        let names: Vec<_> = links
            .iter()
            .flat_map(|m| attrs(&m.body, 16))
            .filter(|(kind, _)| *kind == 3)
            .map(|(_, name)| name.to_vec())
            .collect();
        assert!(names.contains(&b"lo\0".to_vec()), "{names:?}");
    }
}
