//! Test-only helpers for the vsock device: a temporary directory for sockets (the test
//! library's), and a harness that plays the guest's virtio-vsock driver (rx buffers, tx
//! packets, reading rx packets back) against a device driven by a real `EventManager` and
//! activated through `MmioTransport`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::RX_QUEUE_SIZE;
use super::packet::{op, VsockHeader, HDR_LEN, TYPE_STREAM};
use super::{Vsock, VsockConfig, HOST_CID};
use crate::devices::virtio::device::Interrupt;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::{MmioTransport, VirtioDevice};
use crate::memory::GuestMemoryMmap;

pub use husk_tests::tiny_guest::TempDir;

pub const GUEST_CID: u64 = 3;
pub const GUEST_MEM: usize = 48 << 20;
const RXQ_BASE: u64 = 0x1_0000;
const TXQ_BASE: u64 = 0x2_0000;
const EVQ_BASE: u64 = 0x3_0000;
/// Rx buffer of the chain whose head is h: `RX_BASE + h * SLOT`.
const RX_BASE: u64 = 0x10_0000;
/// Tx packet of the chain whose head is h: header at `TX_BASE + h * SLOT`, payload 64 after.
const TX_BASE: u64 = RX_BASE + 256 * SLOT;
const SLOT: u64 = 0x1_1000;
/// Scratch area for hostile tests.
pub const SCRATCH: u64 = TX_BASE + 256 * SLOT;
/// `VIRTIO_F_VERSION_1`.
pub const VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const EVENT_IDX: u64 = 1 << 29;

/// One packet the device put in an rx buffer.
#[derive(Debug, Clone)]
pub struct RxPacket {
    pub hdr: VsockHeader,
    pub payload: Vec<u8>,
}

/// The device, its event loop, and the guest driver's side of its three queues.
pub struct Harness {
    pub dir: TempDir,
    pub uds: PathBuf,
    pub mem: GuestMemoryMmap,
    pub vsock: Arc<Mutex<Vsock>>,
    pub transport: MmioTransport,
    pub em: EventManager<Arc<Mutex<Vsock>>>,
    pub rxq: QueueDriver,
    pub txq: QueueDriver,
    pub evq: QueueDriver,
    pub rx_buf_len: u32,
    rx_next: u16,
    tx_next: u16,
}

impl Harness {
    /// A device activated with `VIRTIO_F_VERSION_1`.
    pub fn new() -> Self {
        Self::with_features(VERSION_1)
    }

    pub fn with_features(features: u64) -> Self {
        let dir = TempDir::new("vsock");
        let uds = dir.path().join("v.sock");
        let mem = guest_memory(GUEST_MEM);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let config = VsockConfig { guest_cid: GUEST_CID, uds_path: uds.clone() };
        let vsock = Arc::new(Mutex::new(Vsock::new(config, interrupt).unwrap()));
        let transport = MmioTransport::new(mem.clone(), vsock.clone());
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(vsock.clone());
        let mut harness = Harness {
            rxq: QueueDriver::new(&mem, RXQ_BASE, RX_QUEUE_SIZE),
            txq: QueueDriver::new(&mem, TXQ_BASE, 256),
            evq: QueueDriver::new(&mem, EVQ_BASE, 256),
            dir,
            uds,
            mem,
            vsock,
            transport,
            em,
            rx_buf_len: 4096,
            rx_next: 0,
            tx_next: 0,
        };
        harness.activate(features);
        harness
    }

    /// Reset the device's queues on the driver side and bring it up with `features`.
    pub fn activate(&mut self, features: u64) {
        self.rxq = QueueDriver::new(&self.mem, RXQ_BASE, RX_QUEUE_SIZE);
        self.txq = QueueDriver::new(&self.mem, TXQ_BASE, 256);
        self.evq = QueueDriver::new(&self.mem, EVQ_BASE, 256);
        self.rx_next = 0;
        self.tx_next = 0;
        let status = activate_through_mmio(
            &mut self.transport,
            features,
            &[&self.rxq, &self.txq, &self.evq],
        );
        assert_eq!(status & 0x40, 0, "device needs reset after activation");
        self.run(10);
    }

    /// Drop the device and its event loop, keeping the directory.
    pub fn into_dir(self) -> TempDir {
        self.dir
    }

    /// Write 0 to the status register, as a driver resetting the device does.
    pub fn reset_device(&mut self) {
        write_reg(&mut self.transport, 0x70, 0);
    }

    /// One turn of the event loop, waiting at most `ms`; returns the events dispatched.
    pub fn run(&mut self, ms: i32) -> usize {
        self.em.run_with_timeout(ms).unwrap()
    }

    /// Run the loop until it goes idle for `ms`; a loop that never goes idle within 5 s is
    /// spinning, which fails the test.
    pub fn settle(&mut self, ms: i32) {
        let end = Instant::now() + Duration::from_secs(5);
        while self.run(ms) > 0 {
            assert!(Instant::now() < end, "the event loop never goes idle");
        }
    }

    /// The number of interrupts raised since the last call.
    pub fn interrupts(&self) -> u64 {
        self.vsock.lock().unwrap().interrupt().irq_evt().read().unwrap_or(0)
    }

    /// Post `n` rx buffers of `rx_buf_len` bytes and kick the rx queue.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let head = self.rx_next;
            self.rx_next = (head + 1) % RX_QUEUE_SIZE;
            self.rxq.write_descriptor(head, rx_slot(head), self.rx_buf_len, VIRTQ_DESC_F_WRITE, 0);
            self.rxq.publish(head);
        }
        write_reg(&mut self.transport, 0x50, 0);
    }

    /// Send `hdr` and `payload` as one tx chain (header and payload in separate descriptors)
    /// and kick the tx queue.
    pub fn send(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        self.place_tx(hdr, payload);
        self.kick_tx();
    }

    /// Put a packet in the tx queue without kicking.
    pub fn place_tx(&mut self, hdr: &VsockHeader, payload: &[u8]) {
        let head = self.tx_next;
        let base = TX_BASE + u64::from(head) * SLOT;
        assert!(payload.len() as u64 <= SLOT - 64);
        self.mem.write_slice(&hdr.to_bytes(), GuestAddress(base)).unwrap();
        self.mem.write_slice(payload, GuestAddress(base + 64)).unwrap();
        let second = (head + 1) % 256;
        if payload.is_empty() {
            self.txq.write_descriptor(head, base, HDR_LEN as u32, 0, 0);
            self.tx_next = second;
        } else {
            self.txq.write_descriptor(head, base, HDR_LEN as u32, VIRTQ_DESC_F_NEXT, second);
            self.txq.write_descriptor(second, base + 64, payload.len() as u32, 0, 0);
            self.tx_next = (head + 2) % 256;
        }
        self.txq.publish(head);
    }

    /// Publish a chain of raw descriptors (for hostile tests) at the next free slots and kick
    /// the tx queue; `next` fields are taken as given, relative slot numbers are not rewritten.
    pub fn send_raw_chain(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.tx_next;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            self.txq.write_descriptor((head + i as u16) % 256, addr, len, flags, next);
        }
        self.tx_next = (head + descs.len() as u16) % 256;
        self.txq.publish(head);
        self.kick_tx();
        head
    }

    /// Publish raw descriptors in the rx queue (for hostile tests) and kick it.
    pub fn post_raw_rx(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.rx_next;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            self.rxq.write_descriptor((head + i as u16) % RX_QUEUE_SIZE, addr, len, flags, next);
        }
        self.rx_next = (head + descs.len() as u16) % RX_QUEUE_SIZE;
        self.rxq.publish(head);
        write_reg(&mut self.transport, 0x50, 0);
        head
    }

    /// Index of the next tx descriptor slot.
    pub fn tx_slot_index(&self) -> u16 {
        self.tx_next
    }

    pub fn kick_tx(&mut self) {
        write_reg(&mut self.transport, 0x50, 1);
    }

    /// The rx packets the device returned since the last call.
    pub fn recv(&mut self) -> Vec<RxPacket> {
        let mut packets = Vec::new();
        while let Some((head, len)) = self.rxq.pop_used() {
            let addr = rx_slot(head as u16);
            assert!(len as usize >= HDR_LEN, "rx buffer returned with {len} bytes");
            let mut raw = [0u8; HDR_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = VsockHeader::from_bytes(&raw);
            assert_eq!(hdr.len as usize, len as usize - HDR_LEN, "used length matches the header");
            let mut payload = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut payload, GuestAddress(addr + HDR_LEN as u64)).unwrap();
            packets.push(RxPacket { hdr, payload });
        }
        packets
    }

    /// Run the loop until an rx packet arrives or `timeout` passes.
    pub fn recv_within(&mut self, timeout: Duration) -> Vec<RxPacket> {
        let end = Instant::now() + timeout;
        loop {
            let packets = self.recv();
            if !packets.is_empty() || Instant::now() >= end {
                return packets;
            }
            self.run(10);
        }
    }

    /// Run the loop until exactly one rx packet arrives, and return it.
    pub fn expect_packet(&mut self) -> RxPacket {
        let mut packets = self.recv_within(Duration::from_secs(5));
        assert_eq!(packets.len(), 1, "expected one packet, got {packets:?}");
        packets.remove(0)
    }
}

pub fn rx_slot(head: u16) -> u64 {
    RX_BASE + u64::from(head) * SLOT
}

/// A header from the guest for the stream between guest port `guest_port` and host port
/// `host_port`, advertising `buf_alloc` and `fwd_cnt`.
pub fn guest_hdr(guest_port: u32, host_port: u32, op: u16) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 64 * 1024,
        ..VsockHeader::default()
    }
}

/// Check that `pkt` is `op` on the stream between `guest_port` and `host_port`.
pub fn assert_packet(pkt: &RxPacket, op: u16, guest_port: u32, host_port: u32) {
    let hdr = &pkt.hdr;
    assert_eq!(hdr.op, op, "unexpected packet {hdr:?}");
    assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID), "{hdr:?}");
    assert_eq!((hdr.src_port, hdr.dst_port), (host_port, guest_port), "{hdr:?}");
    assert_eq!(hdr.type_, TYPE_STREAM);
}

/// RST from the host for the stream between `guest_port` and `host_port`.
pub fn assert_rst(pkt: &RxPacket, guest_port: u32, host_port: u32) {
    assert_packet(pkt, op::RST, guest_port, host_port);
}

/// A deterministic byte stream, to check data arrives whole and in order.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let x = (offset ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8
}
