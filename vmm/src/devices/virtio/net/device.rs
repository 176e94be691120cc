//! The virtio-net device: its configuration, its errors, the `VirtioDevice` contract, and the
//! two data paths between the guest's queues and the tap.
//!
//! - Transmit: each chain of the tx queue is gathered into one packet (header and frame) and
//!   written to the tap in one write. A write the tap refuses (it would block, or fails) drops
//!   the frame and counts it; the chain is returned either way, used with length 0.
//! - Receive: a frame is read from the tap only when it can be placed: the device keeps at
//!   most one pending frame, and while the guest has no rx buffer it stops reading the tap and
//!   waits for the rx queue's notification (frames then queue up in the kernel, which drops
//!   them only when its own tap queue overflows). A frame that does not fit in the next rx
//!   chain is dropped and counted, and that chain is returned used with length 0: no partial
//!   frame is ever given to the guest. A reset keeps the frame the device holds, as the tap
//!   keeps the ones queued behind it: they go to the driver of the next activation.

use crate::error_chain::ErrorChain;
use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{self, Chain, ChainError, RxBuffers, MAX_PACKET_LEN, VNET_HDR_LEN};
use super::tap::{Tap, TapError};
use crate::devices::virtio::device::{
    device_type, read_config_bytes, ActivateError, Interrupt, VirtioDevice,
};
use crate::memory::GuestMemoryMmap;

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// The features the device offers.
const AVAIL_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_RING_F_EVENT_IDX;

/// How to build a network device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host tap interface: attached to if it exists, else created (and removed again when
    /// the device is dropped). At most 15 bytes.
    pub tap_name: String,
    /// The guest's MAC address; when `None`, one derived from the tap name
    /// ([`Net::default_mac`]).
    pub mac: Option<[u8; 6]>,
}

/// Why a network device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A group address cannot be a card's own address.
    #[error("MAC address {} is a multicast address", format_mac(.0))]
    MulticastMac([u8; 6]),
    /// An event fd could not be created.
    #[error("cannot create an event fd")]
    EventFd(#[source] io::Error),
    /// A queue could not be created.
    #[error("cannot create a virtio queue")]
    Queue(#[source] virtio_queue::Error),
}

/// What the device did since it was built (not cleared by a reset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: u64,
    /// Well-formed frames the tap did not take (it would block, or refused them).
    pub tx_dropped: u64,
    /// Transmit chains refused as malformed.
    pub tx_bad_chains: u64,
    /// Frames given to the guest.
    pub rx_frames: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames from the tap dropped because they did not fit the guest's buffer.
    pub rx_dropped: u64,
    /// Receive chains refused as malformed (the pending frame waits for the next chain).
    pub rx_bad_chains: u64,
}

/// A virtio-net device backed by a host tap.
pub struct Net {
    pub(super) tap: Tap,
    mac: [u8; 6],
    acked_features: u64,
    queues: [Queue; 2],
    pub(super) queue_evts: [EventFd; 2],
    pub(super) activate_evt: EventFd,
    interrupt: Arc<Interrupt>,
    mem: Option<GuestMemoryMmap>,
    /// Whether the queue events and the tap are in the event loop (done once, at the first
    /// activation).
    pub(super) io_events_registered: bool,
    /// The packet read from the tap, of which the first `rx_pending` bytes wait for a buffer.
    rx_packet: Box<[u8]>,
    rx_pending: Option<usize>,
    tx_packet: Vec<u8>,
    counters: NetCounters,
}

impl Net {
    /// Open the tap and build the device.
    pub fn new(config: NetConfig, interrupt: Arc<Interrupt>) -> Result<Self, NetError> {
        let mac = config.mac.unwrap_or_else(|| Net::default_mac(&config.tap_name));
        if mac[0] & 1 != 0 {
            return Err(NetError::MulticastMac(mac));
        }
        let tap = Tap::open(&config.tap_name)?;
        let queue = || Queue::new(QUEUE_SIZE).map_err(NetError::Queue);
        let event = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Net {
            tap,
            mac,
            acked_features: 0,
            queues: [queue()?, queue()?],
            queue_evts: [event()?, event()?],
            activate_evt: event()?,
            interrupt,
            mem: None,
            io_events_registered: false,
            rx_packet: vec![0; MAX_PACKET_LEN].into_boxed_slice(),
            rx_pending: None,
            tx_packet: Vec::with_capacity(MAX_PACKET_LEN),
            counters: NetCounters::default(),
        })
    }

    /// The MAC address used when none is configured: locally administered and unicast
    /// (`02:xx:xx:xx:xx:xx`), the rest from an FNV-1a hash of the tap name, so that a tap name
    /// always gives the same address.
    pub fn default_mac(tap_name: &str) -> [u8; 6] {
        let hash = tap_name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        let [a, b, c, d, e, ..] = hash.to_le_bytes();
        [0x02, a, b, c, d, e]
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The name of the tap.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// What the device did so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Send every chain the guest put in the tx queue to the tap (nothing until activated).
    pub(super) fn process_tx(&mut self) {
        let Some(mem) = self.mem.as_ref() else { return };
        let queue = &mut self.queues[TX_QUEUE];
        let mut used = false;
        while let Some(chain) = next_chain(queue, mem) {
            let head = chain.head_index();
            match packet::read_tx_packet(chain, mem, &mut self.tx_packet) {
                Ok(()) => send_to_tap(&self.tap, &mut self.tx_packet, &mut self.counters),
                Err(e) => {
                    log::warn!(
                        "net {}: transmit chain {head} refused: {}",
                        self.tap.name(),
                        ErrorChain(&e)
                    );
                    self.counters.tx_bad_chains += 1;
                }
            }
            used |= add_used(queue, mem, head, 0);
        }
        if used {
            notify_guest(queue, mem, &self.interrupt);
        }
    }

    /// Move frames from the tap to the guest until the tap is empty or the guest has no more
    /// rx buffers (nothing until activated: frames stay in the tap).
    pub(super) fn process_rx(&mut self) {
        let Some(mem) = self.mem.as_ref() else { return };
        let queue = &mut self.queues[RX_QUEUE];
        let mut used = false;
        loop {
            if self.rx_pending.is_none() {
                self.rx_pending = read_from_tap(&self.tap, &mut self.rx_packet, &mut self.counters);
            }
            let Some(len) = self.rx_pending else { break };
            let Some(chain) = next_chain(queue, mem) else {
                break;
            };
            let head = chain.head_index();
            let packet = self.rx_packet.get_mut(..len).unwrap_or_default();
            let (used_len, consumed) = deliver(chain, mem, packet, &mut self.counters);
            if consumed {
                self.rx_pending = None;
            }
            used |= add_used(queue, mem, head, used_len);
        }
        if used {
            notify_guest(queue, mem, &self.interrupt);
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & AVAIL_FEATURES;
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The configuration space is the `mac` field of `virtio_net_config`; the fields after it
    /// belong to features the device does not offer and read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "net {}: driver wrote {} bytes of read-only config at {offset:#x}",
            self.tap.name(),
            data.len()
        );
    }

    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(ActivateError::Device(format!(
                "net {}: the driver did not accept VIRTIO_F_VERSION_1",
                self.tap.name()
            )));
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for queue in &mut self.queues {
            queue.set_event_idx(event_idx);
        }
        self.activate_evt.write(1).map_err(ActivateError::EventFd)?;
        self.mem = Some(mem);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.mem.is_some()
    }

    fn reset(&mut self) {
        self.mem = None;
        self.acked_features = 0;
        self.queues.iter_mut().for_each(Queue::reset);
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The next chain of a ready queue. When the queue looks empty, notifications are re-enabled
/// (with EVENT_IDX: the driver is asked to notify once it adds the next chain) and the queue
/// is checked once more, so that a chain added meanwhile is not missed.
fn next_chain<'m>(queue: &mut Queue, mem: &'m GuestMemoryMmap) -> Option<Chain<'m>> {
    if !queue.ready() {
        return None;
    }
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    match queue.enable_notification(mem) {
        Ok(true) => queue.pop_descriptor_chain(mem),
        Ok(false) => None,
        Err(e) => {
            log::error!("net: cannot enable queue notifications: {e}");
            None
        }
    }
}

/// Return chain `head` to the guest; whether it was added to the used ring.
fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("net: cannot return chain {head} to the guest: {e}");
            false
        }
    }
}

/// Interrupt the guest if it asked to be told about the chains just used.
fn notify_guest(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    match queue.needs_notification(mem) {
        Ok(true) => {
            if let Err(e) = interrupt.signal_used_queue() {
                log::error!("net: cannot interrupt the guest: {e}");
            }
        }
        Ok(false) => {}
        Err(e) => log::error!("net: cannot read the used event: {e}"),
    }
}

/// Write a gathered transmit packet to the tap.
fn send_to_tap(tap: &Tap, packet: &mut [u8], counters: &mut NetCounters) {
    packet::clear_tx_header(packet);
    match tap.write_packet(packet) {
        Ok(_) => {
            counters.tx_frames += 1;
            counters.tx_bytes += packet.len().saturating_sub(VNET_HDR_LEN) as u64;
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            log::debug!("net {}: tap full, frame dropped", tap.name());
            counters.tx_dropped += 1;
        }
        Err(e) => {
            log::warn!("net {}: frame dropped: cannot write to the tap: {e}", tap.name());
            counters.tx_dropped += 1;
        }
    }
}

/// Read the next packet from the tap into `buf`; its length, or `None` when the tap has
/// nothing (more) to give.
fn read_from_tap(tap: &Tap, buf: &mut [u8], counters: &mut NetCounters) -> Option<usize> {
    loop {
        match tap.read_packet(buf) {
            Ok(0) => return None,
            Ok(len) if len < VNET_HDR_LEN + packet::ETH_HLEN => {
                log::warn!("net {}: runt packet of {len} bytes from the tap", tap.name());
                counters.rx_dropped += 1;
            }
            Ok(len) => return Some(len),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => {
                log::error!("net {}: cannot read from the tap: {e}", tap.name());
                return None;
            }
        }
    }
}

/// Put `packet` in the rx chain; the used length for the chain, and whether the packet is
/// done with (delivered or dropped) rather than kept for the next chain.
fn deliver(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    packet: &mut [u8],
    counters: &mut NetCounters,
) -> (u32, bool) {
    let head = chain.head_index();
    let result = RxBuffers::new(chain, mem).and_then(|buffers| {
        packet::set_rx_header(packet);
        buffers.write_packet(mem, packet)
    });
    match result {
        Ok(()) => {
            counters.rx_frames += 1;
            counters.rx_bytes += packet.len().saturating_sub(VNET_HDR_LEN) as u64;
            (packet.len() as u32, true)
        }
        Err(e @ ChainError::TooSmall { .. }) => {
            log::debug!("net: received frame dropped: {}", ErrorChain(&e));
            counters.rx_dropped += 1;
            (0, true)
        }
        Err(e) => {
            log::warn!("net: receive chain {head} refused: {}", ErrorChain(&e));
            counters.rx_bad_chains += 1;
            (0, false)
        }
    }
}
