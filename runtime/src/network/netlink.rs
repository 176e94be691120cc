//! A small, synchronous rtnetlink client: one `NETLINK_ROUTE` socket, messages built attribute
//! by attribute, requests that wait for the kernel's acknowledgement and dumps that collect
//! every reply. Only what the network module needs: links, addresses, routes, qdiscs and
//! filters.
//!
//! The socket belongs to the network namespace of the thread that opened it, whatever thread
//! uses it later.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `struct nlmsghdr`: length, type, flags, sequence number, port id.
const HEADER_LEN: usize = 16;
/// `struct nlattr`: length and type.
const ATTR_HEADER_LEN: usize = 4;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// On an error message: only the request's header is echoed (`NETLINK_CAP_ACK`).
const NLM_F_CAPPED: u16 = 0x100;
/// On an error message: extended-ack attributes follow the echoed request.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// On a dump's reply: the objects changed while the dump ran, it may be inconsistent.
const NLM_F_DUMP_INTR: u16 = 0x10;
/// `NLM_F_ROOT | NLM_F_MATCH`.
const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;

const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;
/// The extended-ack attribute that holds the kernel's error message.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// `SO_NETNS_COOKIE` (Linux 5.14) on the architectures husk runs on (x86_64, aarch64).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Attribute types carry two flag bits (nested, network byte order) above the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;

/// How often a dump is asked for before an inconsistent one is taken.
const DUMP_TRIES: usize = 3;

/// Largest message the kernel sends in one datagram is far below this.
const RECV_BUF_LEN: usize = 1 << 16;

/// A netlink operation that failed: the socket itself, or the kernel's answer to a request.
#[derive(Debug, thiserror::Error)]
#[error("netlink {op} failed{}", kernel_message(.message))]
pub struct NetlinkError {
    /// What was asked, e.g. "RTM_NEWQDISC ingress on eth0".
    pub op: String,
    /// The kernel's extended-ack message, when it gave one.
    pub message: Option<String>,
    #[source]
    pub source: io::Error,
}

impl NetlinkError {
    /// The errno the kernel answered with.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

fn kernel_message(message: &Option<String>) -> String {
    message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default()
}

/// One rtnetlink message being built: header, family header, attributes.
#[derive(Clone)]
pub struct Message {
    buf: Vec<u8>,
    op: String,
}

impl Message {
    /// A request of `msg_type` with `flags` (besides `NLM_F_REQUEST`), described as `op` in
    /// errors, starting with the family header `family_header` (ifinfomsg, rtmsg, ...).
    pub fn new(msg_type: u16, flags: u16, family_header: &[u8], op: impl Into<String>) -> Self {
        let mut buf = vec![0; HEADER_LEN];
        buf[4..6].copy_from_slice(&msg_type.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(family_header);
        pad(&mut buf);
        Message { buf, op: op.into() }
    }

    /// Append the attribute `kind` holding `value`.
    pub fn attr(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = (ATTR_HEADER_LEN + value.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        pad(&mut self.buf);
        self
    }

    /// Append a string attribute (NUL-terminated, as the kernel wants names).
    pub fn attr_str(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes)
    }

    pub fn attr_u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// Append a nested attribute `kind` whose contents `fill` appends.
    pub fn nested(&mut self, kind: u16, fill: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.buf.len();
        self.attr(kind | NLA_F_NESTED, &[]);
        fill(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn finish(mut self, seq: u32) -> (Vec<u8>, String) {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        (self.buf, self.op)
    }
}

/// Pad `buf` to the 4-byte alignment of netlink messages and attributes.
fn pad(buf: &mut Vec<u8>) {
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The attributes in `buf`, as (type without flag bits, value). Stops at the first malformed
/// one.
pub fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let header = rest.get(..ATTR_HEADER_LEN)?;
        let len = u16::from_ne_bytes([header[0], header[1]]) as usize;
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        let value = rest.get(ATTR_HEADER_LEN..len.max(ATTR_HEADER_LEN))?;
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, value))
    })
}

/// A string attribute's value without its NUL.
pub fn attr_string(value: &[u8]) -> String {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

pub fn attr_u32(value: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(value.get(..4)?.try_into().ok()?))
}

/// A `NETLINK_ROUTE` socket in the network namespace of the thread that opened it.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> Result<Socket, NetlinkError> {
        let fail = |source| NetlinkError { op: "socket".into(), message: None, source };
        let kind = libc::SOCK_RAW | libc::SOCK_CLOEXEC;
        // SAFETY: plain socket creation; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, kind, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(fail(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Errors without the echoed request, but with the kernel's message. Both options are
        // best effort: old kernels answer without them.
        for option in [NETLINK_CAP_ACK, NETLINK_EXT_ACK] {
            let on: libc::c_int = 1;
            let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            let ptr = (&on as *const libc::c_int).cast();
            // SAFETY: the option value is one int at `ptr`, which outlives the call.
            unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_NETLINK, option, ptr, len) };
        }
        Ok(Socket { fd, seq: 0 })
    }

    /// The cookie of the socket's network namespace: unique among all namespaces since boot.
    pub fn netns_cookie(&self) -> Result<u64, NetlinkError> {
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let ptr = (&mut cookie as *mut u64).cast();
        // SAFETY: the kernel writes at most `len` bytes to `ptr`, which points to `cookie`,
        // a u64 that outlives the call.
        let ret = unsafe {
            libc::getsockopt(self.fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, ptr, &mut len)
        };
        if ret < 0 {
            let source = io::Error::last_os_error();
            return Err(NetlinkError { op: "SO_NETNS_COOKIE".into(), message: None, source });
        }
        Ok(cookie)
    }

    /// Send `message` and wait for the kernel's acknowledgement.
    pub fn request(&mut self, message: Message) -> Result<(), NetlinkError> {
        let op = self.send(message, NLM_F_ACK)?;
        self.receive(&op, |msg_type, _, _| msg_type == NLMSG_ERROR)
    }

    /// Send the dump request `message` and return the payload of every reply (family header
    /// and attributes). A dump that the kernel marks inconsistent (the objects changed while
    /// it ran) is asked for again, a few times.
    pub fn dump(&mut self, message: Message) -> Result<Vec<Vec<u8>>, NetlinkError> {
        for _ in 1..DUMP_TRIES {
            let (replies, consistent) = self.collect(message.clone(), NLM_F_DUMP)?;
            if consistent {
                return Ok(replies);
            }
        }
        Ok(self.collect(message, NLM_F_DUMP)?.0)
    }

    /// Send the request `message` for one object and return the payload of the reply, if any.
    pub fn get(&mut self, message: Message) -> Result<Option<Vec<u8>>, NetlinkError> {
        Ok(self.collect(message, NLM_F_ACK)?.0.into_iter().next())
    }

    /// Send `message` with `flags` and collect the replies up to the end of a dump or the
    /// acknowledgement, and whether none of them was marked inconsistent.
    fn collect(
        &mut self,
        message: Message,
        flags: u16,
    ) -> Result<(Vec<Vec<u8>>, bool), NetlinkError> {
        let op = self.send(message, flags)?;
        let mut replies = Vec::new();
        let mut consistent = true;
        self.receive(&op, |msg_type, msg_flags, payload| {
            consistent &= msg_flags & NLM_F_DUMP_INTR == 0;
            match msg_type {
                NLMSG_DONE | NLMSG_ERROR => true,
                _ => {
                    replies.push(payload.to_vec());
                    false
                }
            }
        })?;
        Ok((replies, consistent))
    }

    /// Send `message` with `flags` added under the next sequence number; returns its `op`.
    fn send(&mut self, message: Message, flags: u16) -> Result<String, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let (mut buf, op) = message.finish(self.seq);
        let old = u16::from_ne_bytes([buf[6], buf[7]]);
        buf[6..8].copy_from_slice(&(old | flags).to_ne_bytes());
        // SAFETY: the pointer and length describe `buf`, which outlives the call. A netlink
        // socket that is not connected sends to the kernel (port 0).
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if sent < 0 {
            let source = io::Error::last_os_error();
            return Err(NetlinkError { op, message: None, source });
        }
        Ok(op)
    }

    /// Read the replies to the last request and hand each (type, flags, payload) to `handle`
    /// until it says it has seen the last one. An error message, or the end of a dump, with a
    /// non-zero code ends with that error.
    fn receive(
        &mut self,
        op: &str,
        mut handle: impl FnMut(u16, u16, &[u8]) -> bool,
    ) -> Result<(), NetlinkError> {
        let fail = |message, source| NetlinkError { op: op.to_owned(), message, source };
        let mut buf = vec![0u8; RECV_BUF_LEN];
        loop {
            // SAFETY: the pointer and length describe `buf`, which outlives the call. With
            // MSG_TRUNC the result is the datagram's real length, which may exceed `buf`.
            let n = unsafe {
                libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC)
            };
            if n < 0 {
                let source = io::Error::last_os_error();
                if source.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(fail(None, source));
            }
            let n = n as usize;
            if n > buf.len() {
                let source = io::Error::other(format!("reply of {n} bytes truncated"));
                return Err(fail(None, source));
            }
            let mut rest = &buf[..n];
            while rest.len() >= HEADER_LEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                if len < HEADER_LEN || len > rest.len() {
                    let source = io::Error::other("malformed reply");
                    return Err(fail(None, source));
                }
                let msg_type = u16::from_ne_bytes([rest[4], rest[5]]);
                let flags = u16::from_ne_bytes([rest[6], rest[7]]);
                let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                let payload = &rest[HEADER_LEN..len];
                rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
                if msg_seq != self.seq {
                    // A late answer to an earlier request of this socket.
                    continue;
                }
                match msg_type {
                    NLMSG_ERROR => check_error(payload, flags).map_err(|(m, e)| fail(m, e))?,
                    NLMSG_DONE => {
                        let code = payload
                            .get(..4)
                            .map_or(0, |code| i32::from_ne_bytes(code.try_into().unwrap()));
                        if code < 0 {
                            return Err(fail(None, io::Error::from_raw_os_error(-code)));
                        }
                    }
                    _ => {}
                }
                if handle(msg_type, flags, payload) {
                    return Ok(());
                }
            }
        }
    }
}

/// The error code of an `NLMSG_ERROR` payload (0 is an acknowledgement) and, with extended
/// acks, the kernel's message.
fn check_error(payload: &[u8], flags: u16) -> Result<(), (Option<String>, io::Error)> {
    let code = payload.get(..4).map(|b| i32::from_ne_bytes(b.try_into().unwrap()));
    match code {
        Some(0) => Ok(()),
        Some(code) => {
            // The request follows the code: its header alone when capped, else all of it.
            let echoed = match payload.get(4..8) {
                _ if flags & NLM_F_CAPPED != 0 => HEADER_LEN,
                Some(len) => u32::from_ne_bytes(len.try_into().unwrap()) as usize,
                None => HEADER_LEN,
            };
            let tlvs = payload.get(4 + echoed.next_multiple_of(4)..).unwrap_or_default();
            let message = (flags & NLM_F_ACK_TLVS != 0)
                .then(|| attrs(tlvs).find(|(kind, _)| *kind == NLMSGERR_ATTR_MSG))
                .flatten()
                .map(|(_, value)| attr_string(value));
            Err((message, io::Error::from_raw_os_error(-code)))
        }
        None => Err((None, io::Error::other("short error message"))),
    }
}
