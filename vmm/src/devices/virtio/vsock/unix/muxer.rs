//! The vsock backend over host Unix sockets ("hybrid vsock", as Firecracker does it): routes
//! guest packets to connections, accepts host clients on the listening socket, connects guest
//! requests to `<uds_path>_<port>`, queues what the guest must receive, and keeps the epoll
//! interest of every socket and the deadline timer in step with what each one needs.
//!
//! Sockets are never closed behind the event manager's back: a socket leaving service (reset,
//! closed connection, rejected client) is parked in `retired` until [`Muxer::sync`] has removed it
//! from epoll, because the event manager tracks registrations by fd number.

use crate::error_chain::ErrorChain;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{rst_header, ConnKey, Connection, RxOutcome, Verdict};
use super::host_client::{HostClient, LineStatus};
use super::socket::{connect_nonblocking, HostListener, ListenerError};
use crate::devices::virtio::vsock::event_handler::token;
use crate::devices::virtio::vsock::packet::{op, MalformedPacket, VsockHeader, TYPE_STREAM};
use crate::devices::virtio::vsock::HOST_CID;

/// Most host clients plus connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most control packets (RSTs) waiting for rx buffers; beyond that a misbehaving guest's
/// RSTs are dropped.
const MAX_PENDING_CONTROL: usize = 2 * MAX_CONNECTIONS;
/// First host-side port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long the guest has to answer a host-initiated REQUEST.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host client has to send its `CONNECT` line.
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the listener rests after accept(2) failed (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Most clients accepted per listener event.
const ACCEPT_BATCH: usize = 32;

/// Something the guest must receive, in order.
#[derive(Debug)]
enum Ticket {
    /// A packet not tied to a live connection (an RST).
    Control(VsockHeader),
    /// Ask this connection for its next packet.
    Conn(ConnKey),
}

/// The Unix-socket vsock backend.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: HostListener,
    listener_registered: bool,
    listener_paused_until: Option<Instant>,
    timer: TimerFd,
    timer_registered: bool,
    timer_armed_for: Option<Instant>,
    clients: HashMap<RawFd, HostClient>,
    connections: HashMap<ConnKey, Connection>,
    conn_by_fd: HashMap<RawFd, ConnKey>,
    tickets: VecDeque<Ticket>,
    queued: HashSet<ConnKey>,
    pending_control: usize,
    /// Stream fds registered with epoll, with their interest.
    registered: HashMap<RawFd, EventSet>,
    retired: Vec<UnixStream>,
    next_local_port: u32,
}

impl Muxer {
    /// Listen on `uds_path` for host clients of guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        let listener = HostListener::bind(uds_path)?;
        let timer = TimerFd::new().map_err(MuxerError::Timer)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            listener_registered: false,
            listener_paused_until: None,
            timer,
            timer_registered: false,
            timer_armed_for: None,
            clients: HashMap::new(),
            connections: HashMap::new(),
            conn_by_fd: HashMap::new(),
            tickets: VecDeque::new(),
            queued: HashSet::new(),
            pending_control: 0,
            registered: HashMap::new(),
            retired: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// Drop every client and connection (device reset); the listener stays.
    pub fn reset(&mut self) {
        let clients = self.clients.drain().map(|(_, client)| client.into_stream());
        let connections = self.connections.drain().map(|(_, conn)| conn.into_stream());
        self.retired.extend(clients.chain(connections));
        self.conn_by_fd.clear();
        self.tickets.clear();
        self.queued.clear();
        self.pending_control = 0;
    }

    /// Connections the guest has with the host and packets for the guest not yet delivered:
    /// host-side state a snapshot of the VM would lose.
    pub fn live_state(&self) -> usize {
        self.connections.len() + self.pending_control + self.clients.len()
    }

    /// Whether the guest has packets waiting for rx buffers.
    pub fn has_pending_rx(&self) -> bool {
        !self.tickets.is_empty()
    }

    /// A well-formed tx packet from the guest.
    pub fn handle_guest_packet(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            log::warn!("vsock: dropping packet with spoofed source cid {}", hdr.src_cid);
            return;
        }
        if hdr.type_ != TYPE_STREAM || hdr.dst_cid != HOST_CID {
            log::debug!("vsock: refusing type {} packet to cid {}", hdr.type_, hdr.dst_cid);
            self.refuse(hdr);
            return;
        }
        let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
        if hdr.op == op::RST {
            if self.connections.contains_key(&key) {
                self.apply(key, Verdict::Close);
            }
            return;
        }
        match self.connections.get_mut(&key) {
            Some(conn) => {
                let verdict = conn.on_guest_packet(hdr, payload);
                self.apply(key, verdict);
            }
            None if hdr.op == op::REQUEST => self.guest_connect(key, hdr),
            None => self.refuse(hdr),
        }
    }

    /// A tx packet whose length field is unusable: the stream it belongs to cannot go on.
    pub fn handle_malformed_packet(&mut self, packet: &MalformedPacket) {
        let hdr = &packet.hdr;
        log::warn!("vsock: malformed packet from the guest: {}", ErrorChain(&packet.error));
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
        if self.connections.contains_key(&key) {
            self.apply(key, Verdict::Reset);
        } else {
            self.refuse(hdr);
        }
    }

    /// The next packet for the guest, its RW payload written to the front of `payload` (which
    /// must have room for at least one byte). A connection that turns out to have nothing to
    /// say has nothing pending any more, so each ticket is looked at once.
    pub fn next_rx_packet(&mut self, payload: &mut [u8]) -> Option<VsockHeader> {
        while let Some(ticket) = self.tickets.pop_front() {
            let key = match ticket {
                Ticket::Control(hdr) => {
                    self.pending_control -= 1;
                    return Some(hdr);
                }
                Ticket::Conn(key) => key,
            };
            self.queued.remove(&key);
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            match conn.next_rx_packet(payload) {
                RxOutcome::Packet(hdr) => {
                    self.schedule(key);
                    return Some(hdr);
                }
                RxOutcome::Idle => {}
                RxOutcome::Reset => self.apply(key, Verdict::Reset),
            }
        }
        None
    }

    /// The listener is readable: take in new host clients.
    pub fn accept_clients(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.listener().accept() {
                Ok((stream, _)) => self.admit_client(stream),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: accept failed, pausing the listener: {e}");
                    self.listener_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Readiness of a client or connection socket.
    pub fn handle_stream_event(&mut self, fd: RawFd, events: EventSet) {
        if self.clients.contains_key(&fd) {
            self.read_connect_line(fd);
        } else if let Some(&key) = self.conn_by_fd.get(&fd) {
            if let Some(conn) = self.connections.get_mut(&key) {
                let verdict = conn.on_host_event(events);
                self.apply(key, verdict);
            }
        }
    }

    /// The deadline timer fired: expire what is due.
    pub fn handle_timer(&mut self) {
        if let Err(e) = self.timer.clear() {
            log::error!("vsock: cannot disarm the timer: {e}");
        }
        self.timer_armed_for = None;
        let now = Instant::now();
        if self.listener_paused_until.is_some_and(|until| until <= now) {
            self.listener_paused_until = None;
        }
        let late_clients: Vec<RawFd> =
            self.clients.iter().filter(|(_, c)| c.deadline() <= now).map(|(fd, _)| *fd).collect();
        for fd in late_clients {
            log::debug!("vsock: host client sent no CONNECT line in time");
            self.retire_client(fd);
        }
        let late_conns: Vec<ConnKey> = self
            .connections
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(key, _)| *key)
            .collect();
        for key in late_conns {
            if let Some(conn) = self.connections.get(&key) {
                let verdict = conn.on_deadline();
                self.apply(key, verdict);
            }
        }
    }

    /// Bring epoll and the timer in line with what every socket needs now: release retired
    /// sockets, (un)register the listener (`accepting`: the device is active), and set each
    /// stream's interest. Called after every event.
    pub fn sync(&mut self, ops: &mut EventOps, accepting: bool) {
        self.release_retired(ops);
        self.sync_listener(ops, accepting);
        self.sync_timer(ops);
        let Muxer { clients, connections, registered, .. } = self;
        for (fd, _) in clients.iter() {
            watch_stream(ops, registered, *fd, EventSet::IN);
        }
        for conn in connections.values() {
            watch_stream(ops, registered, conn.stream().as_raw_fd(), conn.wanted_events());
        }
    }

    fn admit_client(&mut self, stream: UnixStream) {
        if self.clients.len() + self.connections.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections open, turning a host client away");
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("vsock: cannot make a host client non-blocking: {e}");
            return;
        }
        let deadline = Instant::now() + CONNECT_LINE_TIMEOUT;
        self.clients.insert(stream.as_raw_fd(), HostClient::new(stream, deadline));
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        match client.read_line() {
            LineStatus::Incomplete => {}
            LineStatus::Rejected(why) => {
                log::debug!("vsock: dropping host client: {why}");
                self.retire_client(fd);
            }
            LineStatus::Connect(port) => {
                if let Some(client) = self.clients.remove(&fd) {
                    self.host_connect(client.into_stream(), port);
                }
            }
        }
    }

    /// A host client asked for guest port `peer_port`: offer the guest a connection.
    fn host_connect(&mut self, stream: UnixStream, peer_port: u32) {
        let Some(local_port) = self.allocate_local_port() else {
            log::warn!("vsock: no free host port for a new connection");
            self.retired.push(stream);
            return;
        };
        let key = ConnKey { local_port, peer_port };
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let conn = Connection::host_initiated(key, self.guest_cid, stream, deadline);
        self.insert(key, conn);
    }

    /// The guest asked for host port `key.local_port`: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, request: &VsockHeader) {
        if self.clients.len() + self.connections.len() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections open, refusing the guest");
            self.refuse(request);
            return;
        }
        let path = service_path(&self.uds_path, key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::guest_initiated(key, self.guest_cid, stream, request);
                self.insert(key, conn);
            }
            Err(e) => {
                log::debug!("vsock: guest connect to {} failed: {e}", path.display());
                self.refuse(request);
            }
        }
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) {
        self.conn_by_fd.insert(conn.stream().as_raw_fd(), key);
        self.connections.insert(key, conn);
        self.schedule(key);
    }

    /// A host port no live connection uses, counting up from [`FIRST_LOCAL_PORT`].
    fn allocate_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.connections.keys().any(|key| key.local_port == port) {
                return Some(port);
            }
        }
        None
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.schedule(key),
            Verdict::Reset => {
                self.retire_connection(key);
                self.push_control(rst_header(self.guest_cid, key));
            }
            Verdict::Close => self.retire_connection(key),
        }
    }

    /// Queue the connection for the rx queue if it has something to say and is not queued.
    fn schedule(&mut self, key: ConnKey) {
        let pending = self.connections.get(&key).is_some_and(Connection::has_pending_rx);
        if pending && self.queued.insert(key) {
            self.tickets.push_back(Ticket::Conn(key));
        }
    }

    /// Answer a packet that has no connection with an RST (never an RST with an RST).
    fn refuse(&mut self, hdr: &VsockHeader) {
        if hdr.op != op::RST {
            let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
            self.push_control(rst_header(self.guest_cid, key));
        }
    }

    fn push_control(&mut self, hdr: VsockHeader) {
        if self.pending_control >= MAX_PENDING_CONTROL {
            log::warn!("vsock: guest is not taking control packets, dropping an RST");
            return;
        }
        self.pending_control += 1;
        self.tickets.push_back(Ticket::Control(hdr));
    }

    fn retire_connection(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.remove(&key) {
            self.conn_by_fd.remove(&conn.stream().as_raw_fd());
            self.retired.push(conn.into_stream());
        }
    }

    fn retire_client(&mut self, fd: RawFd) {
        if let Some(client) = self.clients.remove(&fd) {
            self.retired.push(client.into_stream());
        }
    }

    fn release_retired(&mut self, ops: &mut EventOps) {
        for stream in self.retired.drain(..) {
            if self.registered.remove(&stream.as_raw_fd()).is_some() {
                if let Err(e) = ops.remove(Events::empty(&stream)) {
                    log::error!("vsock: cannot unregister a closed socket: {e:?}");
                }
            }
        }
    }

    fn sync_listener(&mut self, ops: &mut EventOps, accepting: bool) {
        let wanted = accepting && self.listener_paused_until.is_none();
        if wanted == self.listener_registered {
            return;
        }
        let events = Events::with_data(&self.listener, token::LISTENER, EventSet::IN);
        let result = if wanted { ops.add(events) } else { ops.remove(events) };
        match result {
            Ok(()) => self.listener_registered = wanted,
            Err(e) => log::error!("vsock: cannot update the listener's registration: {e:?}"),
        }
    }

    fn sync_timer(&mut self, ops: &mut EventOps) {
        if !self.timer_registered {
            match ops.add(Events::with_data(&self.timer, token::TIMER, EventSet::IN)) {
                Ok(()) => self.timer_registered = true,
                Err(e) => log::error!("vsock: cannot register the timer: {e:?}"),
            }
        }
        let next = self.next_deadline();
        if next == self.timer_armed_for {
            return;
        }
        let result = match next {
            Some(at) => {
                let wait = at.saturating_duration_since(Instant::now());
                self.timer.reset(wait.max(Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        match result {
            Ok(()) => self.timer_armed_for = next,
            Err(e) => log::error!("vsock: cannot arm the timer: {e}"),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let clients = self.clients.values().map(HostClient::deadline);
        let connections = self.connections.values().filter_map(Connection::deadline);
        clients.chain(connections).chain(self.listener_paused_until).min()
    }
}

/// Register, modify or unregister `fd` so that epoll watches exactly `wanted` (nothing at all
/// when empty: an unregistered socket cannot report a hang-up we are not ready to act on).
fn watch_stream(
    ops: &mut EventOps,
    registered: &mut HashMap<RawFd, EventSet>,
    fd: RawFd,
    wanted: EventSet,
) {
    let current = registered.get(&fd).copied();
    let events = Events::with_data_raw(fd, token::STREAM, wanted);
    let result = match current {
        None if wanted.is_empty() => return,
        None => ops.add(events),
        Some(_) if wanted.is_empty() => ops.remove(events),
        Some(now) if now == wanted => return,
        Some(_) => ops.modify(events),
    };
    match result {
        Ok(()) if wanted.is_empty() => {
            registered.remove(&fd);
        }
        Ok(()) => {
            registered.insert(fd, wanted);
        }
        Err(e) => log::error!("vsock: cannot update a socket's epoll interest: {e:?}"),
    }
}

/// The host socket a guest connection to `port` goes to: `<uds_path>_<port>`.
pub fn service_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = uds_path.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Why the backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The listening socket.
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// The deadline timer.
    #[error("cannot create the vsock timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::test_support::{guest_hdr, TempDir, GUEST_CID};

    #[test]
    fn local_ports_wrap_and_skip_live_connections() {
        let dir = TempDir::new("vsock");
        let mut muxer = Muxer::new(GUEST_CID, &dir.path().join("v.sock")).unwrap();
        let (stream, _peer) = UnixStream::pair().unwrap();
        let key = ConnKey { local_port: FIRST_LOCAL_PORT, peer_port: 5 };
        let request = guest_hdr(5, FIRST_LOCAL_PORT, op::REQUEST);
        muxer.insert(key, Connection::guest_initiated(key, GUEST_CID, stream, &request));
        muxer.next_local_port = u32::MAX;
        assert_eq!(muxer.allocate_local_port(), Some(u32::MAX));
        assert_eq!(muxer.allocate_local_port(), Some(FIRST_LOCAL_PORT + 1), "wrapped, skipped");
    }

    #[test]
    fn refusals_queue_up_to_a_bound() {
        let dir = TempDir::new("vsock");
        let mut muxer = Muxer::new(GUEST_CID, &dir.path().join("v.sock")).unwrap();
        for port in 0..MAX_PENDING_CONTROL as u32 + 100 {
            muxer.handle_guest_packet(&guest_hdr(port, 9, op::RW), &[]);
        }
        assert_eq!(muxer.tickets.len(), MAX_PENDING_CONTROL);
        let mut payload = [0u8; 16];
        let first = muxer.next_rx_packet(&mut payload).unwrap();
        assert_eq!((first.op, first.dst_port, first.src_port), (op::RST, 0, 9));
        assert_eq!(muxer.pending_control, MAX_PENDING_CONTROL - 1);
        muxer.handle_guest_packet(&guest_hdr(1, 9, op::RW), &[]);
        assert_eq!(muxer.tickets.len(), MAX_PENDING_CONTROL, "room for one more");
    }

    #[test]
    fn guest_services_live_next_to_the_socket() {
        let path = service_path(Path::new("/run/vm/v.sock"), 52);
        assert_eq!(path, Path::new("/run/vm/v.sock_52"));
    }
}
