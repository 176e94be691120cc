//! Tests of the block device as a guest driver sees it: requests laid out in guest memory,
//! served through the virtio-mmio transport and the queue (directly or from a real
//! `EventManager`) against real image files, normal and hostile, without a guest.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

use super::disk::tests::patterned_image;
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::device::{device_type, Interrupt, VirtioDevice};
use crate::devices::virtio::mmio::{status, MmioTransport};
use crate::devices::virtio::test_utils::*;
use crate::memory::GuestMemoryMmap;

const MEM_SIZE: u64 = 1 << 20;
/// Queue size the tests' driver picks (the device allows up to 256).
const DRIVER_QUEUE_SIZE: u16 = 64;
const FIRST_QUEUE_BASE: u64 = 0x1000;
const SECOND_QUEUE_BASE: u64 = 0x8000;
/// Where test buffers are allocated.
const BUFFERS_START: u64 = 0x10000;
/// Sectors of the test images.
const SECTORS: u64 = 64;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// What the status byte holds before the device writes it.
const UNWRITTEN: u8 = 0xee;

/// The byte at `offset` of a fresh patterned image.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A block device on a temporary image, its transport, and a driver for its queue.
struct Harness {
    image: TempFile,
    mem: GuestMemoryMmap,
    block: Arc<Mutex<Block>>,
    transport: MmioTransport,
    queue: QueueDriver,
    alloc: GuestAlloc,
}

/// A request the harness published: where its status byte is, and its head.
struct Sent {
    head: u16,
    status: u64,
}

impl Harness {
    /// A device on a patterned image of [`SECTORS`] sectors.
    fn new(read_only: bool) -> Self {
        Self::with_image(patterned_image((SECTORS * SECTOR_SIZE) as usize), read_only, None)
    }

    fn with_image(image: TempFile, read_only: bool, id: Option<&str>) -> Self {
        let config = BlockConfig {
            path: image.as_path().to_path_buf(),
            read_only,
            id: id.map(String::from),
        };
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let block = Arc::new(Mutex::new(Block::new(config, interrupt).unwrap()));
        let mem = guest_memory(MEM_SIZE as usize);
        let transport = MmioTransport::new(mem.clone(), block.clone());
        let queue = QueueDriver::new(&mem, FIRST_QUEUE_BASE, DRIVER_QUEUE_SIZE);
        let alloc = GuestAlloc::new(BUFFERS_START, MEM_SIZE);
        Harness { image, mem, block, transport, queue, alloc }
    }

    /// The features the tests' driver accepts: all offered but EVENT_IDX.
    fn default_features(&self) -> u64 {
        self.block.lock().unwrap().avail_features() & !(1 << VIRTIO_RING_F_EVENT_IDX)
    }

    /// Walk the device to DRIVER_OK with `features` and the harness's queue.
    fn activate_with(&mut self, features: u64) {
        let status = activate_through_mmio(&mut self.transport, features, &[&self.queue]);
        assert_eq!(status & status::DRIVER_OK, status::DRIVER_OK, "status {status:#x}");
        assert!(self.block.lock().unwrap().is_activated());
    }

    fn activate(&mut self) -> &mut Self {
        self.activate_with(self.default_features());
        self
    }

    /// A buffer of `len` bytes filled with `fill`.
    fn buffer(&mut self, len: u32, fill: u8) -> u64 {
        let addr = self.alloc.alloc(u64::from(len));
        self.mem.write_slice(&vec![fill; len as usize], GuestAddress(addr)).unwrap();
        addr
    }

    /// A request header.
    fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let addr = self.alloc.alloc(16);
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        addr
    }

    /// Publish header, `data` and a 1-byte status, as Linux lays out a request.
    fn send(&mut self, kind: u32, sector: u64, data: &[Desc]) -> Sent {
        let header = self.header(kind, sector);
        let status = self.buffer(1, UNWRITTEN);
        let mut chain = vec![Desc::readable(header, 16)];
        chain.extend_from_slice(data);
        chain.push(Desc::writable(status, 1));
        let head = self.queue.add_chain(&chain);
        Sent { head, status }
    }

    /// Serve the queue as the event loop does on a notification.
    fn process(&self) {
        self.block.lock().unwrap().process_queue();
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    /// The next used element; the test fails if there is none.
    fn used(&mut self) -> (u32, u32) {
        self.queue.pop_used().expect("a used element")
    }

    /// Check that `sent` came back with `status` and used length `len`.
    fn expect_completion(&mut self, sent: &Sent, status: u8, len: u32) {
        assert_eq!(self.used(), (u32::from(sent.head), len));
        assert_eq!(self.byte(sent.status), status);
    }

    /// How many interrupts were raised since the last call.
    fn interrupts(&self) -> u64 {
        self.block.lock().unwrap().interrupt().irq_evt().read().unwrap_or(0)
    }

    fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(self.image.as_path()).unwrap()
    }
}

fn fresh_image_bytes() -> Vec<u8> {
    (0..SECTORS * SECTOR_SIZE).map(pattern).collect()
}

#[test]
fn identifies_as_a_block_device_with_its_capacity() {
    let mut h = Harness::new(false);
    assert_eq!(read_reg(&mut h.transport, 0x08), device_type::BLOCK);
    assert_eq!(read_reg(&mut h.transport, 0x34), u32::from(QUEUE_SIZE));
    write_reg(&mut h.transport, 0x14, 1);
    assert_eq!(read_reg(&mut h.transport, 0x10), 1, "VIRTIO_F_VERSION_1");
    write_reg(&mut h.transport, 0x14, 0);
    // EVENT_IDX (29), FLUSH (9), BLK_SIZE (6), SEG_MAX (2); no RO (5).
    assert_eq!(read_reg(&mut h.transport, 0x10), (1 << 29) | (1 << 9) | (1 << 6) | (1 << 2));
    let mut capacity = [0u8; 8];
    h.transport.read(0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS);
    assert_eq!(h.block.lock().unwrap().capacity(), SECTORS);
}

#[test]
fn reads_sectors_into_guest_buffers() {
    let mut h = Harness::new(false);
    h.activate();
    let (a, b) = (h.buffer(512, 0), h.buffer(1024, 0));
    let sent = h.send(VIRTIO_BLK_T_IN, 5, &[Desc::writable(a, 512), Desc::writable(b, 1024)]);
    h.process();
    h.expect_completion(&sent, OK, 1536 + 1);
    let expected: Vec<u8> = (5 * 512..8 * 512).map(pattern).collect();
    assert_eq!(h.bytes(a, 512), expected[..512]);
    assert_eq!(h.bytes(b, 1024), expected[512..]);
    assert_eq!(h.interrupts(), 1);
}

#[test]
fn writes_guest_buffers_into_the_file() {
    let mut h = Harness::new(false);
    h.activate();
    let (a, b) = (h.buffer(512, 0xa1), h.buffer(512, 0xb2));
    let sent = h.send(VIRTIO_BLK_T_OUT, 3, &[Desc::readable(a, 512), Desc::readable(b, 512)]);
    h.process();
    h.expect_completion(&sent, OK, 1);
    let mut expected = fresh_image_bytes();
    expected[3 * 512..4 * 512].fill(0xa1);
    expected[4 * 512..5 * 512].fill(0xb2);
    assert_eq!(h.image_bytes(), expected);
}

#[test]
fn data_and_status_may_share_a_descriptor() {
    let mut h = Harness::new(false);
    h.activate();
    let header = h.header(VIRTIO_BLK_T_IN, 1);
    let data_and_status = h.buffer(513, UNWRITTEN);
    let head =
        h.queue.add_chain(&[Desc::readable(header, 16), Desc::writable(data_and_status, 513)]);
    h.process();
    assert_eq!(h.used(), (u32::from(head), 513));
    let expected: Vec<u8> = (512..1024).map(pattern).collect();
    assert_eq!(h.bytes(data_and_status, 512), expected);
    assert_eq!(h.byte(data_and_status + 512), OK);
}

#[test]
fn read_only_disk_refuses_writes_and_stays_untouched() {
    let image = patterned_image((SECTORS * SECTOR_SIZE) as usize);
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options().write(true).open(image.as_path()).unwrap().set_modified(old).unwrap();
    let mut h = Harness::with_image(image, true, None);
    let features = h.default_features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0, "VIRTIO_BLK_F_RO offered");
    h.activate_with(features);

    let data = h.buffer(512, 0x55);
    let write = h.send(VIRTIO_BLK_T_OUT, 0, &[Desc::readable(data, 512)]);
    let flush = h.send(VIRTIO_BLK_T_FLUSH, 0, &[]);
    let target = h.buffer(512, 0);
    let read = h.send(VIRTIO_BLK_T_IN, 0, &[Desc::writable(target, 512)]);
    h.process();
    h.expect_completion(&write, IOERR, 1);
    h.expect_completion(&flush, OK, 1);
    h.expect_completion(&read, OK, 513);
    assert_eq!(h.bytes(target, 512), fresh_image_bytes()[..512]);
    assert_eq!(h.image_bytes(), fresh_image_bytes());
    assert_eq!(std::fs::metadata(h.image.as_path()).unwrap().modified().unwrap(), old);
}

#[test]
fn flush_succeeds() {
    let mut h = Harness::new(false);
    h.activate();
    let sent = h.send(VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.process();
    h.expect_completion(&sent, OK, 1);
}

#[test]
fn get_id_returns_the_configured_id() {
    let image = patterned_image(512);
    let mut h = Harness::with_image(image, false, Some("root-disk"));
    h.activate();
    let id = h.buffer(20, 0xff);
    let sent = h.send(VIRTIO_BLK_T_GET_ID, 0, &[Desc::writable(id, 20)]);
    let short = h.buffer(4, 0xff);
    let short_sent = h.send(VIRTIO_BLK_T_GET_ID, 0, &[Desc::writable(short, 4)]);
    h.process();
    h.expect_completion(&sent, OK, 21);
    assert_eq!(h.bytes(id, 20), b"root-disk\0\0\0\0\0\0\0\0\0\0\0");
    h.expect_completion(&short_sent, OK, 5);
    assert_eq!(h.bytes(short, 4), b"root");
}

#[test]
fn get_id_defaults_to_the_file_name() {
    let mut h = Harness::new(false);
    h.activate();
    let id = h.buffer(20, 0xff);
    let sent = h.send(VIRTIO_BLK_T_GET_ID, 0, &[Desc::writable(id, 20)]);
    h.process();
    h.expect_completion(&sent, OK, 21);
    let name = h.image.as_path().file_name().unwrap().to_str().unwrap().as_bytes();
    let n = name.len().min(20);
    assert_eq!(h.bytes(id, n), name[..n]);
}

#[test]
fn requests_beyond_the_disk_fail() {
    let mut h = Harness::new(false);
    h.activate();
    let last = h.buffer(512, 0x77);
    let in_range = h.send(VIRTIO_BLK_T_OUT, SECTORS - 1, &[Desc::readable(last, 512)]);
    let cases = [
        (SECTORS, 512),
        (SECTORS - 1, 1024),
        (u64::MAX / 512 + 1, 512),
        (u64::MAX / 512, 512),
        (u64::MAX, 512),
    ];
    let sent: Vec<Sent> = cases
        .iter()
        .map(|&(sector, len)| {
            let data = h.buffer(len, 0x99);
            h.send(VIRTIO_BLK_T_OUT, sector, &[Desc::readable(data, len)])
        })
        .collect();
    let target = h.buffer(512, 0);
    let read_past = h.send(VIRTIO_BLK_T_IN, SECTORS, &[Desc::writable(target, 512)]);
    h.process();
    h.expect_completion(&in_range, OK, 1);
    for s in &sent {
        h.expect_completion(s, IOERR, 1);
    }
    h.expect_completion(&read_past, IOERR, 1);
    let mut expected = fresh_image_bytes();
    expected[((SECTORS - 1) * 512) as usize..].fill(0x77);
    assert_eq!(h.image_bytes(), expected, "only the in-range write landed; the file did not grow");
}

#[test]
fn partial_sectors_fail() {
    let mut h = Harness::new(false);
    h.activate();
    let target = h.buffer(100, 0);
    let read = h.send(VIRTIO_BLK_T_IN, 0, &[Desc::writable(target, 100)]);
    let source = h.buffer(513, 0x42);
    let write = h.send(VIRTIO_BLK_T_OUT, 0, &[Desc::readable(source, 513)]);
    h.process();
    h.expect_completion(&read, IOERR, 1);
    h.expect_completion(&write, IOERR, 1);
    assert_eq!(h.bytes(target, 100), vec![0; 100]);
    assert_eq!(h.image_bytes(), fresh_image_bytes());
}

#[test]
fn unknown_types_are_unsupported() {
    let mut h = Harness::new(false);
    h.activate();
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 0xdead_beef] {
        let data = h.buffer(16, 0);
        let sent = h.send(kind, 0, &[Desc::readable(data, 16)]);
        h.process();
        h.expect_completion(&sent, UNSUPP, 1);
    }
    assert_eq!(h.image_bytes(), fresh_image_bytes());
}

#[test]
fn batch_is_served_in_order_with_one_interrupt() {
    let mut h = Harness::new(false);
    h.activate();
    let source = h.buffer(1024, 0x3c);
    let write = h.send(VIRTIO_BLK_T_OUT, 10, &[Desc::readable(source, 1024)]);
    let target = h.buffer(1024, 0);
    let read = h.send(VIRTIO_BLK_T_IN, 10, &[Desc::writable(target, 1024)]);
    let flush = h.send(VIRTIO_BLK_T_FLUSH, 0, &[]);
    let id = h.buffer(20, 0);
    let get_id = h.send(VIRTIO_BLK_T_GET_ID, 0, &[Desc::writable(id, 20)]);
    h.process();
    h.expect_completion(&write, OK, 1);
    h.expect_completion(&read, OK, 1025);
    h.expect_completion(&flush, OK, 1);
    h.expect_completion(&get_id, OK, 21);
    assert_eq!(h.queue.pop_used(), None);
    assert_eq!(h.bytes(target, 1024), vec![0x3c; 1024], "the read saw the earlier write");
    assert_eq!(h.interrupts(), 1);
    let used_flags: u16 = h.mem.read_obj(GuestAddress(h.queue.used_ring())).unwrap();
    assert_eq!(used_flags, 0, "notifications are enabled again after serving");
}

#[test]
fn event_idx_interrupts_only_past_used_event() {
    let mut h = Harness::new(false);
    let features = h.block.lock().unwrap().avail_features();
    h.activate_with(features);
    let size = u64::from(DRIVER_QUEUE_SIZE);
    let used_event = GuestAddress(h.queue.avail_ring() + 4 + 2 * size);
    h.mem.write_obj(1u16, used_event).unwrap();

    let first = h.send(VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.process();
    h.expect_completion(&first, OK, 1);
    assert_eq!(h.interrupts(), 0, "used index 1 does not pass used_event 1");

    let second = h.send(VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.process();
    h.expect_completion(&second, OK, 1);
    assert_eq!(h.interrupts(), 1, "used index 2 passes used_event 1");

    let avail_event: u16 =
        h.mem.read_obj(GuestAddress(h.queue.used_ring() + 4 + 8 * size)).unwrap();
    assert_eq!(avail_event, 2, "the device asks to be notified for the next request");
}

#[test]
fn chains_without_status_byte_come_back_with_length_zero() {
    let mut h = Harness::new(false);
    h.activate();
    let header = h.header(VIRTIO_BLK_T_OUT, 0);
    let data = h.buffer(512, 0x11);
    let no_writable = h.queue.add_chain(&[Desc::readable(header, 16), Desc::readable(data, 512)]);
    let status = h.buffer(1, UNWRITTEN);
    let empty_status = h.queue.add_chain(&[Desc::readable(header, 16), Desc::writable(status, 0)]);
    let outside = h.queue.add_chain(&[Desc::readable(header, 16), Desc::writable(MEM_SIZE, 1)]);
    let wrapping = h.queue.add_chain(&[Desc::readable(header, 16), Desc::writable(u64::MAX, 2)]);
    let ok = h.send(VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.process();
    for head in [no_writable, empty_status, outside, wrapping] {
        assert_eq!(h.used(), (u32::from(head), 0));
    }
    h.expect_completion(&ok, OK, 1);
    assert_eq!(h.byte(status), UNWRITTEN);
    assert_eq!(h.image_bytes(), fresh_image_bytes(), "no request without a status is executed");
}

#[test]
fn zero_length_and_overlapping_descriptors_are_served() {
    let mut h = Harness::new(false);
    h.activate();
    let (a, b) = (h.buffer(512, 0), h.buffer(512, 0));
    let zero_length = h.send(
        VIRTIO_BLK_T_IN,
        2,
        &[Desc::writable(a, 512), Desc::writable(0, 0), Desc::writable(b, 512)],
    );
    // The data overwrites its own header: the header was read before.
    let read_header = h.header(VIRTIO_BLK_T_IN, 4);
    h.alloc.alloc(512);
    let status = h.buffer(1, UNWRITTEN);
    let over_header = h.queue.add_chain(&[
        Desc::readable(read_header, 16),
        Desc::writable(read_header, 512),
        Desc::writable(status, 1),
    ]);
    // The data of a write is also its status byte.
    let source = h.buffer(512, 0x66);
    let header = h.header(VIRTIO_BLK_T_OUT, 6);
    let over_status = h.queue.add_chain(&[
        Desc::readable(header, 16),
        Desc::readable(source, 512),
        Desc::writable(source, 1),
    ]);
    h.process();
    h.expect_completion(&zero_length, OK, 1025);
    let expected: Vec<u8> = (2 * 512..4 * 512).map(pattern).collect();
    assert_eq!([h.bytes(a, 512), h.bytes(b, 512)].concat(), expected);
    assert_eq!(h.used(), (u32::from(over_header), 513));
    assert_eq!(h.bytes(read_header, 512), fresh_image_bytes()[4 * 512..5 * 512]);
    assert_eq!(h.byte(status), OK);
    assert_eq!(h.used(), (u32::from(over_status), 1));
    assert_eq!(h.byte(source), OK);
    assert_eq!(h.image_bytes()[6 * 512..7 * 512], [0x66; 512]);
}

#[test]
fn buffers_outside_guest_memory_fail() {
    let mut h = Harness::new(false);
    h.activate();
    let outside_data = h.send(VIRTIO_BLK_T_OUT, 0, &[Desc::readable(MEM_SIZE - 256, 512)]);
    let far_data = h.send(VIRTIO_BLK_T_IN, 0, &[Desc::writable(1 << 40, 512)]);
    let wrapping_data = h.send(VIRTIO_BLK_T_IN, 0, &[Desc::writable(u64::MAX - 100, 512)]);
    let status = h.buffer(1, UNWRITTEN);
    let outside_header =
        h.queue.add_chain(&[Desc::readable(MEM_SIZE - 8, 16), Desc::writable(status, 1)]);
    h.process();
    h.expect_completion(&outside_data, IOERR, 1);
    h.expect_completion(&far_data, IOERR, 1);
    h.expect_completion(&wrapping_data, IOERR, 1);
    assert_eq!(h.used(), (u32::from(outside_header), 1));
    assert_eq!(h.byte(status), IOERR);
    assert_eq!(h.image_bytes(), fresh_image_bytes());
}

#[test]
fn missing_or_short_headers_fail() {
    let mut h = Harness::new(false);
    h.activate();
    let status = h.buffer(1, UNWRITTEN);
    let no_header = h.queue.add_chain(&[Desc::writable(status, 1)]);
    let header = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let short_status = h.buffer(1, UNWRITTEN);
    let short = h.queue.add_chain(&[Desc::readable(header, 8), Desc::writable(short_status, 1)]);
    // A header split over two descriptors is fine.
    let header = h.header(VIRTIO_BLK_T_IN, 1);
    let target = h.buffer(512, 0);
    let split_status = h.buffer(1, UNWRITTEN);
    let split = h.queue.add_chain(&[
        Desc::readable(header, 8),
        Desc::readable(header + 8, 8),
        Desc::writable(target, 512),
        Desc::writable(split_status, 1),
    ]);
    h.process();
    assert_eq!(h.used(), (u32::from(no_header), 1));
    assert_eq!(h.byte(status), IOERR);
    assert_eq!(h.used(), (u32::from(short), 1));
    assert_eq!(h.byte(short_status), IOERR);
    assert_eq!(h.used(), (u32::from(split), 513));
    assert_eq!(h.byte(split_status), OK);
    assert_eq!(h.bytes(target, 512), fresh_image_bytes()[512..1024]);
}

#[test]
fn buffers_going_the_wrong_way_fail() {
    let mut h = Harness::new(false);
    h.activate();
    let target = h.buffer(512, 0x12);
    let read_into_readable = h.send(VIRTIO_BLK_T_IN, 0, &[Desc::readable(target, 512)]);
    let source = h.buffer(512, 0x34);
    let write_from_writable = h.send(VIRTIO_BLK_T_OUT, 0, &[Desc::writable(source, 512)]);
    let header = h.header(VIRTIO_BLK_T_FLUSH, 0);
    let status = h.buffer(1, UNWRITTEN);
    let writable_header =
        h.queue.add_chain(&[Desc::writable(header, 16), Desc::writable(status, 1)]);
    let header = h.header(VIRTIO_BLK_T_OUT, 0);
    let misordered_status = h.buffer(1, UNWRITTEN);
    let misordered = h.queue.add_chain(&[
        Desc::writable(source, 512),
        Desc::readable(header, 16),
        Desc::writable(misordered_status, 1),
    ]);
    h.process();
    h.expect_completion(&read_into_readable, IOERR, 1);
    assert_eq!(h.bytes(target, 512), vec![0x12; 512]);
    h.expect_completion(&write_from_writable, IOERR, 1);
    assert_eq!(h.used(), (u32::from(writable_header), 1));
    assert_eq!(h.byte(status), IOERR);
    assert_eq!(h.used(), (u32::from(misordered), 1));
    assert_eq!(h.byte(misordered_status), IOERR);
    assert_eq!(h.image_bytes(), fresh_image_bytes());
}

#[test]
fn broken_chains_come_back_with_length_zero() {
    let mut h = Harness::new(false);
    h.activate();
    let header = h.header(VIRTIO_BLK_T_OUT, 0);
    let data = h.buffer(512, 0x21);
    let status = h.buffer(1, UNWRITTEN);
    let (next, write) = (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE);
    // 0 -> 1 -> 2 -> 1 -> ...: a loop.
    h.queue.write_descriptor(0, header, 16, next, 1);
    h.queue.write_descriptor(1, data, 512, next, 2);
    h.queue.write_descriptor(2, status, 1, write, 1);
    h.queue.publish(0);
    // 3 -> 200: next out of range.
    h.queue.write_descriptor(3, header, 16, next, 200);
    h.queue.publish(3);
    // A head out of range cannot even be returned.
    h.queue.publish(300);
    // 4 -> an indirect table one descriptor longer than the queue.
    let table_len = u32::from(DRIVER_QUEUE_SIZE) + 1;
    let table = h.alloc.alloc(u64::from(table_len) * 16);
    let entries: Vec<(u64, u32, u16)> = std::iter::once((header, 16, next))
        .chain((2..table_len).map(|_| (data, 512, next)))
        .chain([(status, 1, VIRTQ_DESC_F_WRITE)])
        .collect();
    for (i, &(addr, len, flags)) in entries.iter().enumerate() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
        h.mem.write_slice(&raw, GuestAddress(table + 16 * i as u64)).unwrap();
    }
    h.queue.write_descriptor(4, table, table_len * 16, VIRTQ_DESC_F_INDIRECT, 0);
    h.queue.publish(4);
    h.process();
    assert_eq!(h.used(), (0, 0));
    assert_eq!(h.used(), (3, 0));
    assert_eq!(h.used(), (4, 0));
    assert_eq!(h.queue.pop_used(), None);
    assert_eq!(h.byte(status), UNWRITTEN);
    assert_eq!(h.image_bytes(), fresh_image_bytes());

    // The queue still works.
    h.queue.write_descriptor(5, header, 16, next, 6);
    h.queue.write_descriptor(6, data, 512, next, 7);
    h.queue.write_descriptor(7, status, 1, VIRTQ_DESC_F_WRITE, 0);
    h.queue.publish(5);
    h.process();
    assert_eq!(h.used(), (5, 1));
    assert_eq!(h.byte(status), OK);
}

#[test]
fn available_index_far_ahead_is_left_alone() {
    let mut h = Harness::new(false);
    h.activate();
    h.queue.set_avail_idx(1000);
    h.process();
    assert_eq!(h.queue.used_idx(), 0);
    assert_eq!(h.interrupts(), 0);
}

#[test]
fn unreadable_available_ring_does_not_hang() {
    let h = Harness::new(false);
    let mut block = h.block.lock().unwrap();
    // Programmed by hand: the transport would refuse a ring that leaves guest memory.
    let avail_ring = MEM_SIZE - 4;
    let queue = &mut block.queues_mut()[0];
    queue.set_size(DRIVER_QUEUE_SIZE);
    queue.set_desc_table_address(Some(h.queue.desc_table() as u32), Some(0));
    queue.set_avail_ring_address(Some(avail_ring as u32), Some(0));
    queue.set_used_ring_address(Some(h.queue.used_ring() as u32), Some(0));
    queue.set_ready(true);
    h.mem.write_obj(1u16, GuestAddress(avail_ring + 2)).unwrap();
    block.activate(h.mem.clone()).unwrap();
    block.process_queue();
    assert_eq!(h.queue.used_idx(), 0);
}

/// An event manager with the harness's device subscribed.
fn event_manager(h: &Harness) -> EventManager<Arc<Mutex<Block>>> {
    let mut manager = EventManager::new().unwrap();
    manager.add_subscriber(h.block.clone());
    manager
}

#[test]
fn serves_requests_from_the_event_loop() {
    let mut h = Harness::new(false);
    let mut manager = event_manager(&h);
    // A notification before activation is dropped.
    write_reg(&mut h.transport, 0x50, 0);
    h.activate();
    assert_eq!(manager.run_with_timeout(100).unwrap(), 1, "the activation event");

    let target = h.buffer(512, 0);
    let sent = h.send(VIRTIO_BLK_T_IN, 7, &[Desc::writable(target, 512)]);
    write_reg(&mut h.transport, 0x50, 0);
    assert_eq!(manager.run_with_timeout(100).unwrap(), 1, "the queue event");
    h.expect_completion(&sent, OK, 513);
    assert_eq!(h.bytes(target, 512), fresh_image_bytes()[7 * 512..8 * 512]);
    assert_eq!(h.interrupts(), 1);
    assert_eq!(read_reg(&mut h.transport, 0x60), 1, "used-buffer interrupt pending");
}

#[test]
fn works_again_after_reset_and_reactivation() {
    let mut h = Harness::new(false);
    let mut manager = event_manager(&h);
    h.activate();
    manager.run_with_timeout(100).unwrap();
    let first = h.send(VIRTIO_BLK_T_FLUSH, 0, &[]);
    write_reg(&mut h.transport, 0x50, 0);
    manager.run_with_timeout(100).unwrap();
    h.expect_completion(&first, OK, 1);
    assert_eq!(h.interrupts(), 1);

    write_reg(&mut h.transport, 0x70, 0);
    {
        let block = h.block.lock().unwrap();
        assert!(!block.is_activated());
        assert_eq!(block.acked_features(), 0);
        assert!(!block.queues()[0].ready());
    }
    // Requests and notifications while reset are ignored.
    let ignored = h.send(VIRTIO_BLK_T_FLUSH, 0, &[]);
    write_reg(&mut h.transport, 0x50, 0);
    manager.run_with_timeout(100).unwrap();
    assert_eq!(h.queue.pop_used(), None);
    assert_eq!(h.byte(ignored.status), UNWRITTEN);

    h.queue = QueueDriver::new(&h.mem, SECOND_QUEUE_BASE, DRIVER_QUEUE_SIZE);
    h.activate();
    assert_eq!(manager.run_with_timeout(100).unwrap(), 1, "the second activation event");
    let source = h.buffer(512, 0x5a);
    let second = h.send(VIRTIO_BLK_T_OUT, 9, &[Desc::readable(source, 512)]);
    write_reg(&mut h.transport, 0x50, 0);
    manager.run_with_timeout(100).unwrap();
    h.expect_completion(&second, OK, 1);
    assert_eq!(h.interrupts(), 1);
    assert_eq!(h.image_bytes()[9 * 512..10 * 512], [0x5a; 512]);
}

#[test]
fn disks_are_independent() {
    let mut a = Harness::new(false);
    let mut b = Harness::new(false);
    a.activate();
    b.activate();
    let source = a.buffer(512, 0xaa);
    let sent = a.send(VIRTIO_BLK_T_OUT, 0, &[Desc::readable(source, 512)]);
    a.process();
    b.process();
    a.expect_completion(&sent, OK, 1);
    assert_eq!(b.queue.pop_used(), None);
    assert_eq!(b.interrupts(), 0);
    assert_eq!(a.image_bytes()[..512], [0xaa; 512]);
    assert_eq!(b.image_bytes(), fresh_image_bytes());
}

/// A disk saved empty and restored with an image of its own (as a VM template's rootfs disk
/// is): activated again, it tells the driver its configuration changed (a new generation and
/// the config interrupt), and the capacity the driver reads then is the new image's; a device
/// of another type does not take the saved state.
#[test]
fn a_restored_disk_has_the_driver_read_its_capacity_again() {
    let empty = TempFile::new().unwrap();
    let mut h = Harness::with_image(empty, true, None);
    h.activate();
    let generation = read_reg(&mut h.transport, 0xfc);
    let saved = h.transport.snapshot();

    let mut restored = Harness::new(true);
    restored.transport.restore(&saved).expect("the saved state fits");
    assert!(restored.block.lock().unwrap().is_activated());
    assert_eq!(read_reg(&mut restored.transport, 0xfc), generation.wrapping_add(1));
    assert_eq!(read_reg(&mut restored.transport, 0x60) & 2, 2, "the config interrupt");
    let kicked = restored.block.lock().unwrap().queue_events()[0].read().unwrap();
    assert_eq!(kicked, 1, "the queue is looked at once, for a notification the save missed");
    let mut capacity = [0u8; 8];
    restored.transport.read(0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS);
    // The restored queue is the saved one: a request the driver makes now is served.
    let data = restored.buffer(512, 0);
    let sent = restored.send(VIRTIO_BLK_T_IN, 0, &[Desc::writable(data, 512)]);
    restored.queue.publish(sent.head);
    restored.process();
    assert_eq!(restored.byte(sent.status), OK);
    assert_eq!(restored.byte(data + 7), pattern(7));

    let dir = husk_tests::tiny_guest::TempDir::new("restore-mismatch");
    let vsock = crate::devices::virtio::vsock::VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("v.sock"),
    };
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let other = crate::devices::virtio::vsock::Vsock::new(vsock, interrupt).unwrap();
    let mut other = MmioTransport::new(h.mem.clone(), Arc::new(Mutex::new(other)));
    let err = other.restore(&saved).unwrap_err();
    assert!(err.to_string().contains("device type"), "{err}");
}
