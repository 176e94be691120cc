//! The virtio-vsock device model (virtio 1.2 section 5.10): its configuration, its queues and
//! the [`VirtioDevice`] contract, and the processing of the rx and tx queues on the event loop.
//! Guest packets go to the Unix-socket [`Muxer`]; packets it has for the guest fill rx buffers
//! while the guest provides them.

use crate::error_chain::ErrorChain;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{self, PacketError, RxBuffer, TxPacket, MAX_PKT_PAYLOAD};
use super::unix::{ListenerError, Muxer, MuxerError};
use crate::devices::virtio::device::{
    device_type, read_config_bytes, ActivateError, Interrupt, VirtioDevice,
};
use crate::memory::GuestMemoryMmap;

/// Index of the queue the device puts packets for the guest in.
pub const RX_QUEUE: usize = 0;
/// Index of the queue the guest puts its packets in.
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (transport resets; accepted, never used).
pub const EVENT_QUEUE: usize = 2;
/// Entries of the TX and event queues.
pub const QUEUE_SIZE: u16 = 256;
/// Entries of the RX queue. Linux keeps it full of 4 KiB buffers it allocates up front, so
/// each entry is guest memory every idle VM holds: 64 entries (256 KiB in flight towards the
/// guest: agent requests and container stdin) rather than the 1 MiB of 256.
pub const RX_QUEUE_SIZE: u16 = 64;
const NUM_QUEUES: usize = 3;

/// The first CID a guest may have (0-2 are reserved) and the last (`u32::MAX` is "any").
const GUEST_CIDS: std::ops::RangeInclusive<u64> = 3..=(u32::MAX as u64 - 1);

/// How the VMM sets up the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 to 2^32 - 2).
    pub guest_cid: u64,
    /// The host Unix socket host processes connect to; guest connections to port P go to
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Why the device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved or does not fit in 32 bits.
    #[error("invalid guest CID {0}: it must be between 3 and 4294967294")]
    InvalidCid(u64),
    /// The host socket could not be set up (path in use, missing directory, ...).
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// The deadline timer could not be created.
    #[error("cannot create the vsock timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A queue could not be created.
    #[error("cannot create a virtqueue")]
    Queue(#[source] virtio_queue::Error),
}

impl From<MuxerError> for VsockError {
    fn from(e: MuxerError) -> Self {
        match e {
            MuxerError::Listener(e) => VsockError::Listener(e),
            MuxerError::Timer(e) => VsockError::Timer(e),
        }
    }
}

/// A virtio-vsock device whose host side is Unix sockets.
pub struct Vsock {
    guest_cid: u64,
    pub(super) queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    pub(super) activate_evt: EventFd,
    interrupt: Arc<Interrupt>,
    acked_features: u64,
    mem: Option<GuestMemoryMmap>,
    /// Queue events and timer are registered with the event loop (done once).
    pub(super) registered: bool,
    pub(super) muxer: Muxer,
    /// Scratch space for one packet's payload.
    payload: Vec<u8>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("activated", &self.mem.is_some())
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// Create the device and start listening on `config.uds_path`.
    pub fn new(config: VsockConfig, interrupt: Arc<Interrupt>) -> Result<Self, VsockError> {
        if !GUEST_CIDS.contains(&config.guest_cid) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        let queues = (0..NUM_QUEUES)
            .map(|i| Queue::new(if i == RX_QUEUE { RX_QUEUE_SIZE } else { QUEUE_SIZE }))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VsockError::Queue)?;
        let new_evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd);
        let queue_evts = (0..NUM_QUEUES).map(|_| new_evt()).collect::<Result<Vec<_>, _>>()?;
        Ok(Vsock {
            guest_cid: config.guest_cid,
            queues,
            queue_evts,
            activate_evt: new_evt()?,
            interrupt,
            acked_features: 0,
            mem: None,
            registered: false,
            muxer: Muxer::new(config.guest_cid, &config.uds_path)?,
            payload: vec![0; MAX_PKT_PAYLOAD],
        })
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Written on activation and on reset, for the event loop to catch up.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// Consume the guest's tx packets.
    pub(super) fn process_tx(&mut self) {
        let Some(mem) = self.mem.as_ref() else { return };
        let Vsock { queues, muxer, payload, .. } = self;
        let Some(queue) = queues.get_mut(TX_QUEUE) else {
            return;
        };
        let mut used_any = false;
        drain_queue(queue, mem, |queue, chain| {
            let head = chain.head_index();
            match packet::read_tx_packet(mem, chain, payload) {
                Ok(TxPacket::Valid { hdr, payload_len }) => {
                    let data = payload.get(..payload_len).unwrap_or_default();
                    muxer.handle_guest_packet(&hdr, data);
                }
                Ok(TxPacket::Malformed(bad)) => muxer.handle_malformed_packet(&bad),
                Err(e) => log::warn!("vsock: dropping tx chain {head}: {}", ErrorChain(&e)),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                log::error!("vsock: cannot return tx chain {head}: {e}");
            }
            used_any = true;
        });
        if used_any {
            self.signal_used(TX_QUEUE);
        }
    }

    /// Fill rx buffers with the packets the muxer has for the guest, as long as both last.
    pub(super) fn process_rx(&mut self) {
        let Some(mem) = self.mem.as_ref() else { return };
        let Vsock { queues, muxer, payload, .. } = self;
        let Some(queue) = queues.get_mut(RX_QUEUE) else {
            return;
        };
        let mut used_any = false;
        let mut rearmed = false;
        while muxer.has_pending_rx() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Out of buffers: ask for a kick when more come, unless some just did.
                if !rearmed && queue.enable_notification(mem).unwrap_or(false) {
                    rearmed = true;
                    continue;
                }
                break;
            };
            rearmed = false;
            let head = chain.head_index();
            let written = match RxBuffer::new(mem, chain) {
                Ok(buffer) => match fill_rx_buffer(buffer, muxer, payload) {
                    Some(written) => written,
                    None => {
                        queue.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    log::warn!("vsock: unusable rx chain {head}: {}", ErrorChain(&e));
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written) {
                log::error!("vsock: cannot return rx chain {head}: {e}");
            }
            used_any = true;
        }
        if used_any {
            self.signal_used(RX_QUEUE);
        }
    }

    fn signal_used(&mut self, index: usize) {
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(index)) else {
            return;
        };
        match queue.needs_notification(mem) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Err(e) = self.interrupt.signal_used_queue() {
                    log::error!("vsock: cannot signal queue {index}: {e}");
                }
            }
        }
    }
}

/// Write the muxer's next packet into `buffer`; `None` when it had nothing after all.
fn fill_rx_buffer(buffer: RxBuffer<'_>, muxer: &mut Muxer, payload: &mut [u8]) -> Option<u32> {
    let scratch = payload.get_mut(..buffer.payload_capacity()).unwrap_or_default();
    let hdr = muxer.next_rx_packet(scratch)?;
    let len = usize::try_from(hdr.len).unwrap_or(usize::MAX);
    let written = match scratch.get(..len) {
        Some(data) => buffer.write_packet(&hdr, data),
        None => Err(PacketError::PayloadTooLong(hdr.len)),
    };
    match written {
        Ok(written) => Some(written),
        Err(e) => {
            log::error!("vsock: lost a packet for the guest: {}", ErrorChain(&e));
            Some(0)
        }
    }
}

/// Hand every available chain of `queue` to `handle`, then re-enable notifications, going round
/// again if the driver added chains meanwhile. A queue whose available index makes no sense
/// stops the loop instead of spinning it.
fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut handle: impl FnMut(&mut Queue, virtio_queue::DescriptorChain<&GuestMemoryMmap>),
) {
    let mut idle_rounds = 0;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            log::warn!("vsock: cannot disable notifications: {e}");
        }
        let mut popped = 0;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped += 1;
            handle(queue, chain);
        }
        idle_rounds = if popped == 0 { idle_rounds + 1 } else { 0 };
        match queue.enable_notification(mem) {
            Ok(true) if idle_rounds < 2 => {}
            Ok(_) => return,
            Err(e) => {
                log::warn!("vsock: cannot enable notifications: {e}");
                return;
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!("vsock: guest wrote {} bytes to read-only config at {offset:#x}", data.len());
    }

    fn activate(&mut self, mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        let ready = |index: usize| self.queues.get(index).is_some_and(|q| q.ready());
        if !ready(RX_QUEUE) || !ready(TX_QUEUE) {
            return Err(ActivateError::Device("vsock needs its rx and tx queues".into()));
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.queues.iter_mut().for_each(|q| q.set_event_idx(event_idx));
        self.activate_evt.write(1).map_err(ActivateError::EventFd)?;
        self.mem = Some(mem);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.mem.is_some()
    }

    /// A guest saved with a connection would find it alive after the restore, the host's end
    /// gone; telling it with a transport reset instead races with the host's first new
    /// connection, which the reset would kill on the guest's side alone if the guest handled
    /// it second (its event and rx queues are served by separate work items). So a VM is
    /// saved only without connections, and restored without a reset.
    fn unsaved_state(&self) -> Option<String> {
        match self.muxer.live_state() {
            0 => None,
            n => Some(format!("vsock has {n} connections or packets in flight")),
        }
    }

    fn reset(&mut self) {
        self.mem = None;
        self.acked_features = 0;
        self.queues.iter_mut().for_each(Queue::reset);
        self.muxer.reset();
        // Let the event loop close the dropped connections' sockets now.
        if let Err(e) = self.activate_evt.write(1) {
            log::error!("vsock: cannot wake the event loop after reset: {e}");
        }
    }
}
