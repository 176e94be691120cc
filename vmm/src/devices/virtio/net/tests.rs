//! End-to-end tests of the network device: a real tap, the virtio-mmio transport, the event
//! manager and a test driver in guest memory. The host side sends and catches frames with a
//! packet socket bound to the tap.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{MAX_FRAME_LEN, VNET_HDR_LEN};
use super::test_host::*;
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{status, MmioTransport};
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::memory::GuestMemoryMmap;

const MEM_SIZE: u64 = 4 << 20;
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x8000;
const BUFFERS: u64 = 0x10000;
const GUEST_MAC: [u8; 6] = [0x02, 0x48, 0x55, 0x53, 0x4b, 0x01];
const VERSION_1: u64 = 1 << 32;
const F_MAC: u64 = 1 << 5;
const EVENT_IDX: u64 = 1 << 29;
const ALL_FEATURES: u64 = VERSION_1 | F_MAC | EVENT_IDX;
/// What a test waits for anything the device does.
const PATIENCE: Duration = Duration::from_secs(5);
/// The header the device puts in front of every received frame.
const RX_HEADER: [u8; VNET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
/// How a test buffer looks before the device writes it.
const UNTOUCHED: u8 = 0xaa;

/// A guest driver and the host's end of the tap around one device on its event loop.
struct Harness {
    mem: GuestMemoryMmap,
    net: Arc<Mutex<Net>>,
    interrupt: Arc<Interrupt>,
    transport: MmioTransport,
    event_manager: EventManager<Arc<Mutex<Net>>>,
    rx: QueueDriver,
    tx: QueueDriver,
    alloc: GuestAlloc,
    host: PacketSocket,
    tap_name: String,
}

impl Harness {
    /// A device on a new tap (up, with a packet socket on it), subscribed to an event
    /// manager, not activated.
    fn new() -> Harness {
        let tap_name = unique_tap_name();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let config = NetConfig { tap_name: tap_name.clone(), mac: Some(GUEST_MAC) };
        let net = Arc::new(Mutex::new(Net::new(config, interrupt.clone()).unwrap()));
        bring_up(&tap_name);
        let host = PacketSocket::bind(&tap_name);
        let mut event_manager = EventManager::new().unwrap();
        event_manager.add_subscriber(net.clone());
        let mem = guest_memory(MEM_SIZE as usize);
        let transport = MmioTransport::new(mem.clone(), net.clone());
        Harness {
            rx: QueueDriver::new(&mem, RX_RING, QUEUE_SIZE),
            tx: QueueDriver::new(&mem, TX_RING, QUEUE_SIZE),
            alloc: GuestAlloc::new(BUFFERS, MEM_SIZE),
            mem,
            net,
            interrupt,
            transport,
            event_manager,
            host,
            tap_name,
        }
    }

    /// A device activated with all its features.
    fn started() -> Harness {
        let mut h = Harness::new();
        h.activate(ALL_FEATURES);
        h
    }

    /// Fresh queues, and the driver's initialisation through the transport.
    fn activate(&mut self, features: u64) -> u32 {
        self.fresh_queues();
        self.activate_queues(features)
    }

    /// Lay the queues out anew, empty.
    fn fresh_queues(&mut self) {
        self.rx = QueueDriver::new(&self.mem, RX_RING, QUEUE_SIZE);
        self.tx = QueueDriver::new(&self.mem, TX_RING, QUEUE_SIZE);
    }

    /// The driver's initialisation through the transport, with the queues as they are.
    fn activate_queues(&mut self, features: u64) -> u32 {
        let status = activate_through_mmio(&mut self.transport, features, &[&self.rx, &self.tx]);
        self.run_until_idle();
        status
    }

    /// Run the event loop until `f` gives something.
    fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&mut Harness) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(found) = f(self) {
                return found;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.event_manager.run_with_timeout(10).unwrap();
        }
    }

    /// Run the event loop until nothing happens for 100 ms.
    fn run_until_idle(&mut self) {
        self.wait_for("an idle event loop", |h| {
            (h.event_manager.run_with_timeout(100).unwrap() == 0).then_some(())
        });
    }

    fn notify(&mut self, queue: usize) {
        write_reg(&mut self.transport, 0x50, queue as u32);
    }

    /// Guest memory of `len` bytes, each [`UNTOUCHED`].
    fn buffer(&mut self, len: usize) -> u64 {
        let addr = self.alloc.alloc(len as u64);
        self.mem.write_slice(&vec![UNTOUCHED; len], GuestAddress(addr)).unwrap();
        addr
    }

    /// Guest memory holding `bytes`.
    fn buffer_with(&mut self, bytes: &[u8]) -> u64 {
        let addr = self.alloc.alloc(bytes.len() as u64);
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        addr
    }

    fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    /// Post an rx chain and notify; the address of the header.
    fn post_rx(&mut self, frame_room: usize) -> u64 {
        let header = self.add_rx_chain(frame_room);
        self.notify(RX_QUEUE);
        header
    }

    /// Post an rx chain, and notify only if the device asked for it (EVENT_IDX), as a
    /// virtio driver does; the address of the header.
    fn post_rx_as_a_driver_does(&mut self, frame_room: usize) -> u64 {
        let old: u16 = self.mem.read_obj(GuestAddress(self.rx.avail_ring() + 2)).unwrap();
        let header = self.add_rx_chain(frame_room);
        let new = old.wrapping_add(1);
        let event = self.avail_event(RX_QUEUE);
        // Linux's vring_need_event().
        if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.notify(RX_QUEUE);
        }
        header
    }

    /// Publish an rx chain of two buffers (header, then `frame_room` bytes) without
    /// notifying; the address of the header.
    fn add_rx_chain(&mut self, frame_room: usize) -> u64 {
        let header = self.buffer(VNET_HDR_LEN + frame_room);
        let frame = header + VNET_HDR_LEN as u64;
        let hdr = Desc::writable(header, VNET_HDR_LEN as u32);
        self.rx.add_chain(&[hdr, Desc::writable(frame, frame_room as u32)]);
        header
    }

    /// Post `frame` on the tx queue and notify.
    fn transmit(&mut self, frame: &[u8]) -> u16 {
        let head = self.add_tx_chain(frame);
        self.notify(TX_QUEUE);
        head
    }

    /// Publish `frame` on the tx queue without notifying, behind a header full of junk (no
    /// offload was negotiated, so the device must ignore it), split over three descriptors.
    fn add_tx_chain(&mut self, frame: &[u8]) -> u16 {
        let header = self.buffer_with(&[0xff; VNET_HDR_LEN]);
        let (a, b) = frame.split_at(frame.len() / 2);
        let (a_addr, b_addr) = (self.buffer_with(a), self.buffer_with(b));
        self.tx.add_chain(&[
            Desc::readable(header, VNET_HDR_LEN as u32),
            Desc::readable(a_addr, a.len() as u32),
            Desc::readable(b_addr, b.len() as u32),
        ])
    }

    fn next_tx_used(&mut self) -> (u32, u32) {
        self.wait_for("a used tx chain", |h| h.tx.pop_used())
    }

    fn next_rx_used(&mut self) -> (u32, u32) {
        self.wait_for("a used rx chain", |h| h.rx.pop_used())
    }

    /// Interrupts raised since the last call.
    fn irqs(&self) -> u64 {
        self.interrupt.irq_evt().read().unwrap_or(0)
    }

    fn counters(&self) -> NetCounters {
        self.net.lock().unwrap().counters()
    }

    /// The frame the host catches next.
    fn host_receives(&self) -> Vec<u8> {
        self.host.recv_test_frame(PATIENCE).expect("a frame on the host")
    }

    /// Check a frame from the host arrives whole in the rx chain at `header`.
    fn assert_received(&mut self, header: u64, frame: &[u8]) {
        let (_, len) = self.next_rx_used();
        assert_eq!(len as usize, VNET_HDR_LEN + frame.len());
        assert_eq!(self.read_guest(header, VNET_HDR_LEN), RX_HEADER);
        assert_eq!(self.read_guest(header + VNET_HDR_LEN as u64, frame.len()), frame);
    }

    /// Set the `used_event` field of a queue's available ring (EVENT_IDX): the driver wants
    /// an interrupt once the used index goes past `idx`.
    fn set_used_event(&self, queue: usize, idx: u16) {
        let q = if queue == RX_QUEUE { &self.rx } else { &self.tx };
        let addr = q.avail_ring() + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem.write_obj(idx, GuestAddress(addr)).unwrap();
    }

    /// The `avail_event` field of a queue's used ring (EVENT_IDX): the device wants a
    /// notification once the available index goes past it.
    fn avail_event(&self, queue: usize) -> u16 {
        let q = if queue == RX_QUEUE { &self.rx } else { &self.tx };
        let addr = q.used_ring() + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

#[test]
fn a_guest_frame_reaches_the_host() {
    let mut h = Harness::started();
    let frame = test_frame([0xff; 6], 1, 100);
    let head = h.transmit(&frame);
    assert_eq!(h.next_tx_used(), (u32::from(head), 0));
    assert_eq!(h.host_receives(), frame);
    assert_eq!(h.irqs(), 1);
    let counters = h.counters();
    assert_eq!((counters.tx_frames, counters.tx_bytes, counters.tx_bad_chains), (1, 100, 0));
}

#[test]
fn a_host_frame_reaches_the_guest() {
    let mut h = Harness::started();
    let header = h.post_rx(1514);
    h.run_until_idle();
    let frame = test_frame(GUEST_MAC, 2, 1514);
    h.host.send(&frame);
    h.assert_received(header, &frame);
    assert_eq!(h.irqs(), 1);
    let counters = h.counters();
    assert_eq!((counters.rx_frames, counters.rx_bytes, counters.rx_dropped), (1, 1514, 0));
}

#[test]
fn frames_wait_in_the_tap_until_the_guest_posts_buffers() {
    let mut h = Harness::started();
    let frames = [test_frame(GUEST_MAC, 3, 60), test_frame(GUEST_MAC, 4, 200)];
    h.host.send(&frames[0]);
    h.host.send(&frames[1]);
    h.run_until_idle();
    assert_eq!(h.rx.pop_used(), None);
    assert_eq!(
        h.event_manager.run_with_timeout(200).unwrap(),
        0,
        "the device must not busy-loop on the tap while the guest has no buffers"
    );
    let first = h.post_rx(1514);
    let second = h.post_rx(1514);
    h.assert_received(first, &frames[0]);
    h.assert_received(second, &frames[1]);
    assert_eq!(h.counters().rx_dropped, 0);
}

#[test]
fn a_frame_too_big_for_the_rx_buffer_is_dropped_whole() {
    let mut h = Harness::started();
    let small = h.post_rx(20);
    h.host.send(&test_frame(GUEST_MAC, 5, 60));
    assert_eq!(h.next_rx_used().1, 0);
    assert_eq!(h.read_guest(small, VNET_HDR_LEN + 20), vec![UNTOUCHED; VNET_HDR_LEN + 20]);
    assert_eq!(h.counters().rx_dropped, 1);
    let big = h.post_rx(1514);
    let frame = test_frame(GUEST_MAC, 6, 60);
    h.host.send(&frame);
    h.assert_received(big, &frame);
}

/// Hostile transmit chains, each written into descriptor slots from 100 on and published.
fn publish_hostile_tx_chains(h: &mut Harness) -> usize {
    let valid = test_frame([0xff; 6], 0xee, 100);
    let packet = [&[0u8; VNET_HDR_LEN][..], &valid].concat();
    let addr = h.buffer_with(&packet);
    let huge = h.buffer_with(&[&packet[..], &vec![0; MAX_FRAME_LEN]].concat());
    let len = packet.len() as u32;
    let (next, write) = (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE);
    let chains: [&[(u64, u32, u16, u16)]; 12] = [
        // Zero length.
        &[(addr, 0, 0, 0)],
        // A header shorter than 12 bytes.
        &[(addr, 8, 0, 0)],
        // A header and a frame shorter than an Ethernet header.
        &[(addr, 12, next, 1), (addr + 12, 10, 0, 0)],
        // Outside guest memory, partly outside, and wrapping around the address space.
        &[(MEM_SIZE + 0x1000, len, 0, 0)],
        &[(addr, 12, next, 1), (MEM_SIZE - 50, 100, 0, 0)],
        &[(addr, 12, next, 1), (u64::MAX - 50, 100, 0, 0)],
        // A loop on itself, and a loop of two.
        &[(addr, len, next, 0)],
        &[(addr, 12, next, 1), (addr + 12, len - 12, next, 0)],
        // Next index out of the table.
        &[(addr, 12, next, QUEUE_SIZE)],
        // Longer than a packet.
        &[(huge, VNET_HDR_LEN as u32 + MAX_FRAME_LEN as u32 + 1, 0, 0)],
        // A device-writable frame.
        &[(addr, 12, next, 1), (addr + 12, len - 12, write, 0)],
        // A malformed indirect table.
        &[(addr, 17, VIRTQ_DESC_F_INDIRECT, 0)],
    ];
    for (i, chain) in chains.iter().enumerate() {
        let base = 100 + 2 * i as u16;
        for (j, &(addr, len, flags, next)) in chain.iter().enumerate() {
            // `next` is relative to the chain's first slot, except when out of the table.
            let next = if next >= QUEUE_SIZE { next } else { base + next };
            h.tx.write_descriptor(base + j as u16, addr, len, flags, next);
        }
        h.tx.publish(base);
    }
    chains.len()
}

#[test]
fn hostile_tx_chains_are_returned_unused_and_nothing_reaches_the_host() {
    let mut h = Harness::started();
    let hostile = publish_hostile_tx_chains(&mut h);
    // A head outside the descriptor table: refused, and it cannot even be returned.
    h.tx.publish(QUEUE_SIZE + 7);
    h.notify(TX_QUEUE);
    for i in 0..hostile {
        assert_eq!(h.next_tx_used(), (100 + 2 * i as u32, 0));
    }
    let good = test_frame([0xff; 6], 7, 80);
    h.transmit(&good);
    assert_eq!(h.next_tx_used().1, 0);
    assert_eq!(h.host_receives(), good, "the first frame on the host is the good one");
    let counters = h.counters();
    assert_eq!(counters.tx_bad_chains, hostile as u64 + 1);
    assert_eq!(counters.tx_frames, 1);
}

#[test]
fn hostile_rx_chains_are_returned_empty_and_the_frame_waits_for_a_good_one() {
    let mut h = Harness::started();
    let addr = h.buffer(2000);
    let (next, write) = (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE);
    // Device-readable, outside guest memory, looping.
    h.rx.write_descriptor(100, addr, 2000, 0, 0);
    h.rx.write_descriptor(101, MEM_SIZE - 100, 2000, write, 0);
    h.rx.write_descriptor(102, addr, 12, write | next, 103);
    h.rx.write_descriptor(103, addr + 12, 1988, write | next, 102);
    for head in [100, 101, 102] {
        h.rx.publish(head);
    }
    let good = h.post_rx(1514);
    let frame = test_frame(GUEST_MAC, 8, 300);
    h.host.send(&frame);
    for head in [100, 101, 102] {
        assert_eq!(h.next_rx_used(), (head, 0));
    }
    h.assert_received(good, &frame);
    assert_eq!(h.read_guest(addr, 2000), vec![UNTOUCHED; 2000]);
    let counters = h.counters();
    assert_eq!((counters.rx_bad_chains, counters.rx_frames, counters.rx_dropped), (3, 1, 0));
}

#[test]
fn the_config_space_and_features_describe_the_card() {
    let mut h = Harness::new();
    assert_eq!(read_reg(&mut h.transport, 0x08), 1, "device id: network card");
    write_reg(&mut h.transport, 0x14, 0);
    assert_eq!(u64::from(read_reg(&mut h.transport, 0x10)), F_MAC | EVENT_IDX);
    write_reg(&mut h.transport, 0x14, 1);
    assert_eq!(u64::from(read_reg(&mut h.transport, 0x10)) << 32, VERSION_1);
    let mut mac = [0u8; 6];
    h.transport.read(0x100, &mut mac);
    assert_eq!(mac, GUEST_MAC);
    h.activate(ALL_FEATURES);
    h.transport.write(0x100, &[0x01; 6]);
    h.transport.read(0x100, &mut mac);
    assert_eq!(mac, GUEST_MAC, "the MAC is read-only");
    let mut beyond = [0xffu8; 4];
    h.transport.read(0x106, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn the_default_mac_is_local_unicast_and_stable_for_the_tap_name() {
    let name = unique_tap_name();
    let mac = Net::default_mac(&name);
    assert_eq!(mac[0], 0x02);
    assert_eq!(mac, Net::default_mac(&name));
    assert_ne!(mac, Net::default_mac(&unique_tap_name()));
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let net = Net::new(NetConfig { tap_name: name, mac: None }, interrupt).unwrap();
    let mut config = [0u8; 6];
    net.read_config(0, &mut config);
    assert_eq!(config, mac);
}

#[test]
fn bad_configurations_fail_the_build_and_name_the_tap() {
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let build = |tap_name: &str, mac| {
        let config = NetConfig { tap_name: tap_name.to_owned(), mac };
        Net::new(config, interrupt.clone()).err().expect("a failed build")
    };
    let name = unique_tap_name();
    let err = build(&name, Some([0x03, 0, 0, 0, 0, 1]));
    assert!(matches!(err, NetError::MulticastMac(_)), "{err}");
    assert!(!interface_exists(&name), "no tap is created for a refused configuration");
    let _first = build_net(&name);
    let err = build(&name, None);
    assert!(matches!(err, NetError::Tap(TapError::Busy { .. })), "{err}");
    assert!(err.to_string().contains(&name), "{err}");
    let err = build("a-name-far-too-long", None);
    assert!(matches!(err, NetError::Tap(TapError::NameTooLong { .. })), "{err}");
    let err = build("bad/name", None);
    assert!(matches!(err, NetError::Tap(TapError::InvalidName { .. })), "{err}");
}

fn build_net(tap_name: &str) -> Net {
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    Net::new(NetConfig { tap_name: tap_name.to_owned(), mac: None }, interrupt).unwrap()
}

#[test]
fn the_tap_vanishes_with_the_device() {
    let h = Harness::started();
    let name = h.tap_name.clone();
    assert!(interface_exists(&name));
    drop(h);
    assert!(!interface_exists(&name));
}

#[test]
fn activation_without_version_1_is_refused() {
    let mut h = Harness::new();
    let status = h.activate(F_MAC);
    assert_ne!(status & status::DEVICE_NEEDS_RESET, 0);
    assert!(!h.net.lock().unwrap().is_activated());
}

#[test]
fn events_before_activation_are_ignored_and_frames_wait_for_it() {
    let mut h = Harness::new();
    let frame = test_frame(GUEST_MAC, 9, 90);
    h.host.send(&frame);
    h.notify(RX_QUEUE);
    h.notify(TX_QUEUE);
    h.run_until_idle();
    let status = h.activate(ALL_FEATURES);
    assert_eq!(status & status::DRIVER_OK, status::DRIVER_OK);
    let header = h.post_rx(1514);
    h.assert_received(header, &frame);
}

#[test]
fn the_device_works_again_after_a_reset_and_loses_no_frame_to_it() {
    let mut h = Harness::started();
    let header = h.post_rx(1514);
    let frame = test_frame(GUEST_MAC, 10, 64);
    h.host.send(&frame);
    h.assert_received(header, &frame);
    let held = test_frame(GUEST_MAC, 11, 70);
    h.host.send(&held);
    h.run_until_idle();

    write_reg(&mut h.transport, 0x70, 0);
    assert!(!h.net.lock().unwrap().is_activated());
    h.transmit(&test_frame([0xff; 6], 12, 64));
    h.post_rx(1514);
    let queued = test_frame(GUEST_MAC, 13, 80);
    h.host.send(&queued);
    h.run_until_idle();
    assert_eq!(h.tx.pop_used(), None, "a reset device serves no queue");
    assert_eq!(h.rx.pop_used(), None, "a reset device serves no queue");

    h.activate(ALL_FEATURES);
    let first = h.post_rx(1514);
    let second = h.post_rx(1514);
    h.assert_received(first, &held);
    h.assert_received(second, &queued);
    let frame = test_frame([0xff; 6], 14, 64);
    h.transmit(&frame);
    assert_eq!(h.next_tx_used().1, 0);
    assert_eq!(h.host_receives(), frame, "the chain posted before the reset was dropped");
}

#[test]
fn chains_published_before_driver_ok_are_served_at_activation() {
    let mut h = Harness::started();
    write_reg(&mut h.transport, 0x70, 0);
    let incoming = test_frame(GUEST_MAC, 15, 64);
    h.host.send(&incoming);
    h.run_until_idle();
    h.fresh_queues();
    let header = h.add_rx_chain(1514);
    let outgoing = test_frame([0xff; 6], 16, 64);
    h.add_tx_chain(&outgoing);
    h.activate_queues(ALL_FEATURES);
    h.assert_received(header, &incoming);
    assert_eq!(h.next_tx_used().1, 0);
    assert_eq!(h.host_receives(), outgoing);
}

#[test]
fn with_event_idx_interrupts_follow_used_event() {
    let mut h = Harness::started();
    h.irqs();
    h.set_used_event(TX_QUEUE, 1);
    h.transmit(&test_frame([0xff; 6], 14, 64));
    h.next_tx_used();
    h.run_until_idle();
    assert_eq!(h.irqs(), 0, "the driver asked for an interrupt after the second chain only");
    h.transmit(&test_frame([0xff; 6], 15, 64));
    h.next_tx_used();
    assert_eq!(h.irqs(), 1);
}

#[test]
fn with_event_idx_a_driver_that_notifies_only_when_asked_gets_every_frame() {
    let mut h = Harness::started();
    for tag in 20..24 {
        let frame = test_frame(GUEST_MAC, tag, 64);
        h.host.send(&frame);
        h.run_until_idle();
        let header = h.post_rx_as_a_driver_does(1514);
        h.assert_received(header, &frame);
    }
}

#[test]
fn with_event_idx_the_device_asks_for_the_rx_notification_it_waits_for() {
    let mut h = Harness::started();
    let header = h.post_rx(1514);
    let frame = test_frame(GUEST_MAC, 16, 64);
    h.host.send(&frame);
    h.assert_received(header, &frame);
    h.host.send(&test_frame(GUEST_MAC, 17, 64));
    h.run_until_idle();
    assert_eq!(h.avail_event(RX_QUEUE), 1, "notify me when you add chain 1");
}

#[test]
fn without_event_idx_every_used_batch_interrupts() {
    let mut h = Harness::new();
    h.activate(VERSION_1 | F_MAC);
    for tag in [18, 19] {
        h.transmit(&test_frame([0xff; 6], tag, 64));
        h.next_tx_used();
        h.run_until_idle();
        assert_eq!(h.irqs(), 1);
    }
}
