//! One vsock stream between a guest socket and a host Unix stream: the handshake state, the
//! credit accounting in both directions, half-close, and the buffer that holds guest bytes the
//! host socket cannot take yet.
//!
//! Flow control (virtio 1.2 section 5.10.6.3): every packet carries the sender's `buf_alloc`
//! and `fwd_cnt`. Towards the guest we never send more than
//! `guest_buf_alloc - (sent - guest_fwd_cnt)` bytes. Towards the host we advertise
//! [`CONN_BUF_ALLOC`] and count in `fwd_cnt` the guest bytes actually written to the host socket,
//! so the guest can never have more than `CONN_BUF_ALLOC` unconsumed bytes with us: the host-bound
//! buffer is bounded by that, and a guest that overruns its credit is reset. When the guest's
//! view of our free space gets low and we have forwarded bytes since we last told it, a credit
//! update is queued.
//!
//! The connection never touches the virtqueues or epoll: it reports what it wants (packets for
//! the guest, epoll interest, a deadline) and the muxer acts on that.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::EventSet;

use super::socket::send_nosignal;
use crate::devices::virtio::vsock::packet::{
    op, VsockHeader, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::devices::virtio::vsock::HOST_CID;

/// Receive buffer space advertised to the guest for each connection.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Below this much free space as the guest last heard it, forwarded bytes are reported.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 2;
/// How long a guest that closed both directions waits for its last bytes to reach the host.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection's identity: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The host-side port (the guest's destination port).
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
}

/// What the muxer must do with a connection after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Carry on.
    Keep,
    /// Close the host socket and send the guest an RST.
    Reset,
    /// Close the host socket; the guest already knows (it sent an RST).
    Close,
}

/// What a connection put in an rx buffer.
#[derive(Debug)]
pub enum RxOutcome {
    /// A packet with this header; an RW packet's payload is at the front of the buffer.
    Packet(VsockHeader),
    /// Nothing to send after all; nothing is pending any more either.
    Idle,
    /// The host socket failed: reset the connection.
    Reset,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: the guest has not accepted yet.
    AwaitingResponse,
    /// Data may flow.
    Established,
}

/// A guest-host stream.
#[derive(Debug)]
pub struct Connection {
    key: ConnKey,
    guest_cid: u64,
    stream: UnixStream,
    state: State,
    deadline: Option<Instant>,
    /// Bytes for the host socket: first `reply_len` bytes of our own `OK` line, then guest data.
    to_host: VecDeque<u8>,
    reply_len: usize,
    /// Guest bytes received, ever.
    received: Wrapping<u32>,
    /// Guest bytes written to the host socket, ever.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_told: Wrapping<u32>,
    /// Bytes sent to the guest, ever.
    sent: Wrapping<u32>,
    guest_buf_alloc: u32,
    guest_fwd_cnt: Wrapping<u32>,
    /// The host socket has (or may have) bytes for the guest.
    host_readable: bool,
    host_eof: bool,
    host_hung_up: bool,
    /// The shutdown flags the guest sent so far.
    guest_shutdown: u32,
    write_shut: bool,
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
}

impl Connection {
    /// A connection a host client asked for; the guest gets a REQUEST and must answer by
    /// `deadline`.
    pub fn host_initiated(
        key: ConnKey,
        guest_cid: u64,
        stream: UnixStream,
        deadline: Instant,
    ) -> Self {
        let mut conn = Self::new(key, guest_cid, stream, State::AwaitingResponse);
        conn.deadline = Some(deadline);
        conn.send_request = true;
        conn
    }

    /// A connection the guest asked for with `request`, already connected on the host side; the
    /// guest gets a RESPONSE.
    pub fn guest_initiated(
        key: ConnKey,
        guest_cid: u64,
        stream: UnixStream,
        request: &VsockHeader,
    ) -> Self {
        let mut conn = Self::new(key, guest_cid, stream, State::Established);
        conn.update_guest_credit(request);
        conn.send_response = true;
        conn
    }

    fn new(key: ConnKey, guest_cid: u64, stream: UnixStream, state: State) -> Self {
        Connection {
            key,
            guest_cid,
            stream,
            state,
            deadline: None,
            to_host: VecDeque::new(),
            reply_len: 0,
            received: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            sent: Wrapping(0),
            guest_buf_alloc: 0,
            guest_fwd_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            host_hung_up: false,
            guest_shutdown: 0,
            write_shut: false,
            send_request: false,
            send_response: false,
            send_credit_update: false,
        }
    }

    /// The host socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Give up the host socket (the connection is over).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// When the connection is reset unless something happens first.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// A packet from the guest for this connection (not an RST: the muxer handles those).
    pub fn on_guest_packet(&mut self, hdr: &VsockHeader, payload: &[u8]) -> Verdict {
        self.update_guest_credit(hdr);
        match (self.state, hdr.op) {
            (State::AwaitingResponse, op::RESPONSE) => self.accepted_by_guest(),
            (State::Established, op::RW) => self.forward_to_host(payload),
            (State::Established, op::SHUTDOWN) => self.guest_shuts(hdr.flags),
            (State::Established, op::CREDIT_UPDATE) => Verdict::Keep,
            (State::Established, op::CREDIT_REQUEST) => {
                self.send_credit_update = true;
                Verdict::Keep
            }
            (state, op) => {
                log::debug!("vsock {:?}: op {op} in state {state:?}, resetting", self.key);
                Verdict::Reset
            }
        }
    }

    /// Readiness of the host socket.
    pub fn on_host_event(&mut self, events: EventSet) -> Verdict {
        if events.contains(EventSet::HANG_UP) {
            self.host_hung_up = true;
        }
        let readable = EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR;
        if self.can_send_to_guest() && events.intersects(readable) {
            self.host_readable = true;
        }
        let writable = EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR;
        if !self.to_host.is_empty() && events.intersects(writable) {
            return self.flush_to_host();
        }
        Verdict::Keep
    }

    /// The deadline passed: give up on the handshake or on flushing before close.
    pub fn on_deadline(&self) -> Verdict {
        log::debug!("vsock {:?}: deadline passed in state {:?}", self.key, self.state);
        Verdict::Reset
    }

    /// Whether [`Self::next_rx_packet`] has something to say.
    pub fn has_pending_rx(&self) -> bool {
        self.send_request
            || self.send_response
            || self.send_credit_update
            || (self.host_readable && self.can_send_to_guest() && self.guest_credit() > 0)
    }

    /// The next packet for the guest, with up to `payload.len()` bytes of data read from the host
    /// socket into `payload`.
    pub fn next_rx_packet(&mut self, payload: &mut [u8]) -> RxOutcome {
        if std::mem::take(&mut self.send_request) {
            return RxOutcome::Packet(self.header(op::REQUEST, 0, 0));
        }
        if std::mem::take(&mut self.send_response) {
            return RxOutcome::Packet(self.header(op::RESPONSE, 0, 0));
        }
        if self.host_readable && self.can_send_to_guest() {
            match self.read_host(payload) {
                RxOutcome::Idle => {}
                outcome => return outcome,
            }
        }
        if self.send_credit_update {
            return RxOutcome::Packet(self.header(op::CREDIT_UPDATE, 0, 0));
        }
        RxOutcome::Idle
    }

    /// The epoll events the connection needs on its host socket now (empty: none at all).
    pub fn wanted_events(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.state != State::Established {
            return events;
        }
        if !self.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        if self.can_send_to_guest() && !self.host_readable && self.guest_credit() > 0 {
            events |= EventSet::IN;
        }
        events
    }

    fn update_guest_credit(&mut self, hdr: &VsockHeader) {
        self.guest_buf_alloc = hdr.buf_alloc;
        self.guest_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can take now. A guest claiming to have consumed more than it was sent
    /// gets nothing rather than an overflowed window.
    fn guest_credit(&self) -> u32 {
        let in_flight = (self.sent - self.guest_fwd_cnt).0;
        self.guest_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_to_guest(&self) -> bool {
        self.state == State::Established
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && !self.host_eof
    }

    fn header(&mut self, op: u16, flags: u32, len: u32) -> VsockHeader {
        self.fwd_cnt_told = self.fwd_cnt;
        self.send_credit_update = false;
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Read from the host socket as much as the guest's credit and the buffer allow.
    fn read_host(&mut self, payload: &mut [u8]) -> RxOutcome {
        let credit = usize::try_from(self.guest_credit()).unwrap_or(usize::MAX);
        let max = payload.len().min(credit);
        let Some(buf) = payload.get_mut(..max).filter(|buf| !buf.is_empty()) else {
            return RxOutcome::Idle;
        };
        let read = loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                result => break result,
            }
        };
        match read {
            Ok(0) => {
                self.host_eof = true;
                self.host_readable = false;
                let rcv = if self.host_hung_up { SHUTDOWN_RCV } else { 0 };
                RxOutcome::Packet(self.header(op::SHUTDOWN, SHUTDOWN_SEND | rcv, 0))
            }
            Ok(n) => {
                // A read that filled the rx buffer (not the credit) probably left more behind.
                self.host_readable = n == max && max < credit;
                self.sent += byte_count(n);
                RxOutcome::Packet(self.header(op::RW, 0, byte_count(n).0))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                RxOutcome::Idle
            }
            Err(e) => {
                log::debug!("vsock {:?}: host socket read failed: {e}", self.key);
                RxOutcome::Reset
            }
        }
    }

    fn accepted_by_guest(&mut self) -> Verdict {
        self.state = State::Established;
        self.deadline = None;
        let reply = format!("OK {}\n", self.key.local_port);
        self.reply_len = reply.len();
        self.to_host.extend(reply.as_bytes());
        self.flush_to_host()
    }

    fn forward_to_host(&mut self, payload: &[u8]) -> Verdict {
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            log::debug!("vsock {:?}: data after the guest's send shutdown", self.key);
            return Verdict::Reset;
        }
        let unconsumed = u64::from((self.received - self.fwd_cnt).0);
        if unconsumed + payload.len() as u64 > u64::from(CONN_BUF_ALLOC) {
            log::warn!("vsock {:?}: guest sent beyond its credit, resetting", self.key);
            return Verdict::Reset;
        }
        self.received += byte_count(payload.len());
        self.to_host.extend(payload);
        self.flush_to_host()
    }

    fn guest_shuts(&mut self, flags: u32) -> Verdict {
        self.guest_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        if self.guest_shutdown & SHUTDOWN_RCV != 0 {
            self.host_readable = false;
        }
        if self.guest_closed_both() && !self.to_host.is_empty() {
            self.deadline = Some(Instant::now() + CLOSE_FLUSH_TIMEOUT);
        }
        self.flush_to_host()
    }

    fn guest_closed_both(&self) -> bool {
        self.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND
    }

    /// Write what the host socket takes now; then apply a pending half or full close.
    fn flush_to_host(&mut self) -> Verdict {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.account_forwarded(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("vsock {:?}: host socket write failed: {e}", self.key);
                    return Verdict::Reset;
                }
            }
        }
        self.note_credit_progress();
        if self.to_host.is_empty() {
            self.after_drain()
        } else {
            Verdict::Keep
        }
    }

    fn account_forwarded(&mut self, n: usize) {
        let reply = n.min(self.reply_len);
        self.reply_len -= reply;
        self.fwd_cnt += byte_count(n - reply);
    }

    /// Queue a credit update if the guest's idea of our free space is low and out of date.
    fn note_credit_progress(&mut self) {
        let told_free = CONN_BUF_ALLOC.saturating_sub((self.received - self.fwd_cnt_told).0);
        if self.fwd_cnt != self.fwd_cnt_told && told_free < CREDIT_UPDATE_THRESHOLD {
            self.send_credit_update = true;
        }
    }

    /// Everything the guest sent reached the host socket.
    fn after_drain(&mut self) -> Verdict {
        if self.guest_closed_both() {
            return Verdict::Reset;
        }
        if self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            self.write_shut = true;
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                log::debug!("vsock {:?}: host socket shutdown failed: {e}", self.key);
            }
        }
        Verdict::Keep
    }
}

/// A byte count in the protocol's wrapping 32-bit counters. Counts passed here are bounded by a
/// packet payload or by the host-bound buffer, far below 4 GiB.
fn byte_count(n: usize) -> Wrapping<u32> {
    Wrapping(n as u32)
}

/// An RST from the host for the connection `key` of guest `guest_cid`.
pub fn rst_header(guest_cid: u64, key: ConnKey) -> VsockHeader {
    VsockHeader {
        src_cid: HOST_CID,
        dst_cid: guest_cid,
        src_port: key.local_port,
        dst_port: key.peer_port,
        type_: TYPE_STREAM,
        op: op::RST,
        buf_alloc: CONN_BUF_ALLOC,
        ..VsockHeader::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::test_support::GUEST_CID;

    const KEY: ConnKey = ConnKey { local_port: 1 << 30, peer_port: 77 };

    fn guest_packet(op: u16, buf_alloc: u32, fwd_cnt: u32) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: KEY.peer_port,
            dst_port: KEY.local_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc,
            fwd_cnt,
            ..VsockHeader::default()
        }
    }

    /// An established guest-initiated connection and the host end of its socket.
    fn established(buf_alloc: u32) -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let request = guest_packet(op::REQUEST, buf_alloc, 0);
        let mut conn = Connection::guest_initiated(KEY, GUEST_CID, ours, &request);
        let mut buf = [0u8; 64];
        assert!(
            matches!(conn.next_rx_packet(&mut buf), RxOutcome::Packet(h) if h.op == op::RESPONSE)
        );
        (conn, host)
    }

    fn read_rw(conn: &mut Connection, buf: &mut [u8]) -> VsockHeader {
        conn.on_host_event(EventSet::IN);
        match conn.next_rx_packet(buf) {
            RxOutcome::Packet(hdr) if hdr.op == op::RW => hdr,
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn credit_towards_the_guest_survives_counter_wraparound() {
        let (mut conn, mut host) = established(100);
        conn.sent = Wrapping(u32::MAX - 5);
        conn.on_guest_packet(&guest_packet(op::CREDIT_UPDATE, 100, u32::MAX - 5), &[]);
        assert_eq!(conn.guest_credit(), 100);
        std::io::Write::write_all(&mut host, &[7; 10]).unwrap();
        let hdr = read_rw(&mut conn, &mut [0u8; 64]);
        assert_eq!(hdr.len, 10);
        assert_eq!(conn.sent, Wrapping(4), "the counter wrapped");
        assert_eq!(conn.guest_credit(), 90);
    }

    #[test]
    fn guest_claiming_more_than_it_was_sent_gets_no_credit() {
        let (mut conn, _host) = established(100);
        conn.on_guest_packet(&guest_packet(op::CREDIT_UPDATE, 100, 10), &[]);
        assert_eq!(conn.guest_credit(), 0);
        assert!(!conn.wanted_events().contains(EventSet::IN));
    }

    #[test]
    fn reads_never_exceed_the_guest_window() {
        let (mut conn, mut host) = established(6);
        std::io::Write::write_all(&mut host, b"0123456789").unwrap();
        assert_eq!(read_rw(&mut conn, &mut [0u8; 64]).len, 6);
        assert!(!conn.has_pending_rx(), "window closed");
        assert!(conn.wanted_events().is_empty(), "no polling without credit");
    }

    #[test]
    fn guest_window_is_enforced_across_counter_wraparound() {
        let (mut conn, _host) = established(100);
        conn.received = Wrapping(u32::MAX - 2);
        conn.fwd_cnt = Wrapping(u32::MAX - 2);
        let rw = guest_packet(op::RW, 100, 0);
        assert_eq!(conn.on_guest_packet(&rw, &[1; 8]), Verdict::Keep);
        assert_eq!(conn.fwd_cnt, Wrapping(5), "forwarded count wrapped");
        conn.fwd_cnt = Wrapping(5) - Wrapping(CONN_BUF_ALLOC);
        assert_eq!(conn.on_guest_packet(&rw, &[1]), Verdict::Reset, "window overrun");
    }

    #[test]
    fn ok_line_is_not_counted_as_forwarded_guest_data() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut conn = Connection::host_initiated(KEY, GUEST_CID, ours, deadline);
        let mut buf = [0u8; 64];
        assert!(
            matches!(conn.next_rx_packet(&mut buf), RxOutcome::Packet(h) if h.op == op::REQUEST)
        );
        assert!(conn.wanted_events().is_empty(), "host socket unread before the guest accepts");
        let response = guest_packet(op::RESPONSE, 4096, 0);
        assert_eq!(conn.on_guest_packet(&response, &[]), Verdict::Keep);
        assert_eq!(conn.deadline(), None);
        assert_eq!(conn.on_guest_packet(&guest_packet(op::RW, 4096, 0), b"hi"), Verdict::Keep);
        assert_eq!(conn.fwd_cnt, Wrapping(2));
        let mut got = vec![0u8; format!("OK {}\nhi", KEY.local_port).len()];
        std::io::Read::read_exact(&mut host, &mut got).unwrap();
        assert_eq!(got, format!("OK {}\nhi", KEY.local_port).as_bytes());
    }

    #[test]
    fn handshake_packets_out_of_place_reset() {
        let (mut conn, _host) = established(100);
        assert_eq!(conn.on_guest_packet(&guest_packet(op::RESPONSE, 100, 0), &[]), Verdict::Reset);
        let (mut conn, _host) = established(100);
        assert_eq!(conn.on_guest_packet(&guest_packet(op::REQUEST, 100, 0), &[]), Verdict::Reset);
        let (mut conn, _host) = established(100);
        let shut = VsockHeader { flags: SHUTDOWN_SEND, ..guest_packet(op::SHUTDOWN, 100, 0) };
        assert_eq!(conn.on_guest_packet(&shut, &[]), Verdict::Keep);
        assert_eq!(conn.on_guest_packet(&guest_packet(op::RW, 100, 0), b"x"), Verdict::Reset);
    }
}
