//! A test-only virtio driver: lays out split queues in guest memory, builds descriptor chains
//! (well-formed or hostile), publishes them, reads the used ring back, and walks a device
//! through the virtio-mmio initialisation sequence as Linux does. Device models are tested with
//! it and no guest at all.

use vm_memory::{Bytes, GuestAddress};

use super::mmio::{status, MmioTransport};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemoryMmap;

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Guest memory of `size` bytes starting at guest address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("test guest memory")
}

/// One buffer of a chain as the driver describes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub write: bool,
}

impl Desc {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Desc { addr, len, write: false }
    }
    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Desc { addr, len, write: true }
    }
}

/// A bump allocator for test buffers in guest memory.
#[derive(Debug)]
pub struct GuestAlloc {
    next: u64,
    end: u64,
}

impl GuestAlloc {
    /// Hand out addresses in `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        GuestAlloc { next: start, end }
    }

    /// `len` bytes aligned to 16.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let addr = (self.next + 15) & !15;
        assert!(addr + len <= self.end, "test guest memory exhausted");
        self.next = addr + len;
        addr
    }
}

/// The driver's side of one split virtqueue.
#[derive(Debug)]
pub struct QueueDriver {
    mem: GuestMemoryMmap,
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl QueueDriver {
    /// A queue of `size` entries laid out from `base` (needs `size * 16 + 8192` bytes).
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc_table = base;
        let avail_ring = desc_table + 16 * u64::from(size);
        let used_ring = (avail_ring + 6 + 2 * u64::from(size) + 4095) & !4095;
        let driver = QueueDriver {
            mem: mem.clone(),
            size,
            desc_table,
            avail_ring,
            used_ring,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        };
        driver.write_u16(avail_ring, 0);
        driver.write_u16(avail_ring + 2, 0);
        driver.write_u16(used_ring, 0);
        driver.write_u16(used_ring + 2, 0);
        driver
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Guest address of the descriptor table.
    pub fn desc_table(&self) -> u64 {
        self.desc_table
    }
    /// Guest address of the available ring.
    pub fn avail_ring(&self) -> u64 {
        self.avail_ring
    }
    /// Guest address of the used ring.
    pub fn used_ring(&self) -> u64 {
        self.used_ring
    }

    fn write_u16(&self, addr: u64, v: u16) {
        self.mem.write_obj(v, GuestAddress(addr)).expect("queue in guest memory");
    }

    fn read_u32(&self, addr: u64) -> u32 {
        self.mem.read_obj(GuestAddress(addr)).expect("queue in guest memory")
    }

    /// Write descriptor `index` verbatim, whatever it says (hostile tests use this).
    pub fn write_descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = GuestAddress(self.desc_table + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, base).expect("descriptor table in guest memory");
    }

    /// Write the descriptors of a chain into free slots, publish its head and return it.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        assert!(!descs.is_empty() && descs.len() <= usize::from(self.size));
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let next = (index + 1) % self.size;
            let mut flags = if d.write { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_descriptor(index, d.addr, d.len, flags, next);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Put `head` in the available ring and advance its index.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail_ring + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.write_u16(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_u16(self.avail_ring + 2, self.avail_idx);
    }

    /// Overwrite the available ring's index (hostile tests use this).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.write_u16(self.avail_ring + 2, idx);
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        let v: u16 = self.mem.read_obj(GuestAddress(self.used_ring + 2)).unwrap();
        v
    }

    /// The next used element (descriptor head, bytes written), if the device added one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.last_used == self.used_idx() {
            return None;
        }
        let elem = self.used_ring + 4 + 8 * u64::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        Some((self.read_u32(elem), self.read_u32(elem + 4)))
    }
}

/// Write a 32-bit virtio-mmio register.
pub fn write_reg(transport: &mut MmioTransport, offset: u64, v: u32) {
    transport.write(offset, &v.to_le_bytes());
}

/// Read a 32-bit virtio-mmio register.
pub fn read_reg(transport: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    transport.read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// Take the device through reset, feature negotiation (accepting `features`), queue set-up for
/// each queue in `queues` (queue i gets `queues[i]`) and DRIVER_OK, as Linux's virtio-mmio
/// driver does. Returns the final status register.
pub fn activate_through_mmio(
    transport: &mut MmioTransport,
    features: u64,
    queues: &[&QueueDriver],
) -> u32 {
    write_reg(transport, 0x70, 0);
    write_reg(transport, 0x70, status::ACKNOWLEDGE);
    write_reg(transport, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    for page in 0..2u32 {
        write_reg(transport, 0x24, page);
        write_reg(transport, 0x20, (features >> (32 * page)) as u32);
    }
    let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write_reg(transport, 0x70, features_ok);
    for (index, q) in queues.iter().enumerate() {
        write_reg(transport, 0x30, index as u32);
        write_reg(transport, 0x38, u32::from(q.size()));
        for (reg, addr) in [(0x80, q.desc_table()), (0x90, q.avail_ring()), (0xa0, q.used_ring())] {
            write_reg(transport, reg, addr as u32);
            write_reg(transport, reg + 4, (addr >> 32) as u32);
        }
        write_reg(transport, 0x44, 1);
    }
    write_reg(transport, 0x70, features_ok | status::DRIVER_OK);
    read_reg(transport, 0x70)
}
