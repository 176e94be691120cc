//! Packets as they sit in guest memory: a transmit chain gathered into one tap packet, and the
//! buffers of a receive chain that a tap packet is scattered into.
//!
//! A packet is a 12-byte `virtio_net_hdr_v1` followed by one Ethernet frame, the same layout
//! the tap reads and writes. Every descriptor is checked before use: its direction, that it
//! lies in guest memory, the total length, and that the chain ends (a chain that loops, runs
//! past the queue or points outside the descriptor table is refused as a whole).

use std::mem::size_of;

use virtio_bindings::virtio_net::virtio_net_hdr_v1;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::memory::GuestMemoryMmap;

/// Length of the `virtio_net_hdr_v1` in front of every frame (VIRTIO_F_VERSION_1).
pub const VNET_HDR_LEN: usize = size_of::<virtio_net_hdr_v1>();
/// Length of an Ethernet header: the shortest frame worth sending.
pub const ETH_HLEN: usize = 14;
/// The longest frame a tap carries without offloads: the largest MTU (65535) plus the Ethernet
/// and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65535 + ETH_HLEN + 4;
/// The longest packet: header and frame.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// A descriptor chain of one of the device's queues.
pub type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// Why a chain cannot carry a packet.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain has no descriptor, loops, is longer than the queue, or leads out of the
    /// descriptor table.
    #[error("the chain is broken: it is empty, loops, or leads out of the descriptor table")]
    Broken,
    /// A descriptor the device should read is writable, or the other way round.
    #[error("a descriptor of the chain has the wrong direction")]
    WrongDirection,
    /// A buffer lies (partly) outside guest memory.
    #[error("a buffer of {len} bytes at {addr:#x} is not in guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    /// A transmit chain longer than the longest packet.
    #[error("the chain holds more than {MAX_PACKET_LEN} bytes")]
    TooLong,
    /// A transmit chain shorter than a header and an Ethernet header.
    #[error("the chain holds {0} bytes, less than a header and an Ethernet header")]
    TooShort(usize),
    /// A receive chain too small for the packet.
    #[error("the chain has room for {capacity} bytes, the packet needs {needed}")]
    TooSmall { needed: usize, capacity: usize },
}

/// Call `visit` on each descriptor of `chain`, which must all be device-writable if
/// `device_writes`, else all device-readable; the chain must end with a descriptor without
/// the NEXT flag.
fn walk(
    chain: Chain<'_>,
    device_writes: bool,
    mut visit: impl FnMut(&Descriptor) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    // The iterator stops silently when the chain loops (it gives up after as many descriptors
    // as the queue has) or leads out of the table: the last descriptor still says NEXT then.
    let mut ended = false;
    for desc in chain {
        if desc.is_write_only() != device_writes {
            return Err(ChainError::WrongDirection);
        }
        visit(&desc)?;
        ended = !desc.has_next();
    }
    if ended {
        Ok(())
    } else {
        Err(ChainError::Broken)
    }
}

/// Gather a transmit chain (header and frame, in any number of readable descriptors) into
/// `packet`, which is cleared first.
pub fn read_tx_packet(
    chain: Chain<'_>,
    mem: &GuestMemoryMmap,
    packet: &mut Vec<u8>,
) -> Result<(), ChainError> {
    packet.clear();
    walk(chain, false, |desc| {
        let len = desc.len() as usize;
        if len > MAX_PACKET_LEN - packet.len() {
            return Err(ChainError::TooLong);
        }
        if len == 0 {
            return Ok(());
        }
        let start = packet.len();
        packet.resize(start + len, 0);
        let out_of_memory = ChainError::OutOfMemory { addr: desc.addr().0, len: desc.len() };
        let dst = packet.get_mut(start..).ok_or(ChainError::TooLong)?;
        mem.read_slice(dst, desc.addr()).map_err(|_| out_of_memory)
    })?;
    if packet.len() < VNET_HDR_LEN + ETH_HLEN {
        return Err(ChainError::TooShort(packet.len()));
    }
    Ok(())
}

/// Clear the header of a transmit packet: no checksum or segmentation offload was negotiated,
/// so whatever the guest put there means nothing and must not reach the host.
pub fn clear_tx_header(packet: &mut [u8]) {
    if let Some(header) = packet.get_mut(..VNET_HDR_LEN) {
        header.fill(0);
    }
}

/// Write the header the guest gets in front of a received frame: no offload flags (the tap
/// hands us complete, checksummed frames) and one buffer.
pub fn set_rx_header(packet: &mut [u8]) {
    if let Some(header) = packet.get_mut(..VNET_HDR_LEN) {
        header.fill(0);
        header[NUM_BUFFERS_OFFSET..].copy_from_slice(&1u16.to_le_bytes());
    }
}

/// The device-writable buffers of a receive chain, checked to lie in guest memory.
#[derive(Debug)]
pub struct RxBuffers {
    buffers: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

impl RxBuffers {
    /// Check the buffers of a receive chain.
    pub fn new(chain: Chain<'_>, mem: &GuestMemoryMmap) -> Result<RxBuffers, ChainError> {
        let mut rx = RxBuffers { buffers: Vec::new(), capacity: 0 };
        walk(chain, true, |desc| {
            let len = desc.len() as usize;
            if len == 0 {
                return Ok(());
            }
            if !GuestMemory::check_range(mem, desc.addr(), len, Permissions::Write) {
                return Err(ChainError::OutOfMemory { addr: desc.addr().0, len: desc.len() });
            }
            rx.buffers.push((desc.addr(), len));
            rx.capacity = rx.capacity.saturating_add(len);
            Ok(())
        })?;
        Ok(rx)
    }

    /// Write `packet` from the start of the buffers, only if all of it fits.
    pub fn write_packet(&self, mem: &GuestMemoryMmap, packet: &[u8]) -> Result<(), ChainError> {
        if packet.len() > self.capacity {
            return Err(ChainError::TooSmall { needed: packet.len(), capacity: self.capacity });
        }
        let mut rest = packet;
        for &(addr, len) in &self.buffers {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at(len.min(rest.len()));
            let out_of_memory = ChainError::OutOfMemory { addr: addr.0, len: len as u32 };
            mem.write_slice(now, addr).map_err(|_| out_of_memory)?;
            rest = later;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::{Queue, QueueT};

    use super::*;
    use crate::devices::virtio::test_utils::*;

    const MEM_SIZE: u64 = 1 << 20;
    const QUEUE_SIZE: u16 = 16;

    struct Setup {
        mem: GuestMemoryMmap,
        driver: QueueDriver,
        queue: Queue,
        alloc: GuestAlloc,
    }

    fn setup() -> Setup {
        let mem = guest_memory(MEM_SIZE as usize);
        let driver = QueueDriver::new(&mem, 0x1000, QUEUE_SIZE);
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_desc_table_address(Some(driver.desc_table() as u32), Some(0));
        queue.set_avail_ring_address(Some(driver.avail_ring() as u32), Some(0));
        queue.set_used_ring_address(Some(driver.used_ring() as u32), Some(0));
        queue.set_ready(true);
        let alloc = GuestAlloc::new(0x10000, MEM_SIZE);
        Setup { mem, driver, queue, alloc }
    }

    impl Setup {
        /// Guest memory holding `bytes`.
        fn buffer(&mut self, bytes: &[u8]) -> u64 {
            let addr = self.alloc.alloc(bytes.len() as u64);
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            addr
        }

        fn tx(&mut self) -> Result<Vec<u8>, ChainError> {
            let chain = self.queue.pop_descriptor_chain(&self.mem).expect("a published chain");
            let mut packet = Vec::new();
            read_tx_packet(chain, &self.mem, &mut packet).map(|()| packet)
        }

        fn rx(&mut self) -> Result<RxBuffers, ChainError> {
            let chain = self.queue.pop_descriptor_chain(&self.mem).expect("a published chain");
            RxBuffers::new(chain, &self.mem)
        }
    }

    fn packet(frame_len: usize) -> Vec<u8> {
        (0..VNET_HDR_LEN + frame_len).map(|i| i as u8).collect()
    }

    #[test]
    fn a_tx_packet_is_gathered_from_several_descriptors() {
        let mut s = setup();
        let bytes = packet(60);
        let (a, b, c) = (s.buffer(&bytes[..5]), s.buffer(&bytes[5..12]), s.buffer(&bytes[12..]));
        s.driver.add_chain(&[Desc::readable(a, 5), Desc::readable(b, 7), Desc::readable(c, 60)]);
        assert_eq!(s.tx().unwrap(), bytes);
    }

    #[test]
    fn zero_length_descriptors_add_nothing() {
        let mut s = setup();
        let bytes = packet(20);
        let addr = s.buffer(&bytes);
        let len = bytes.len() as u32;
        s.driver.add_chain(&[Desc::readable(0, 0), Desc::readable(addr, len)]);
        assert_eq!(s.tx().unwrap(), bytes);
        s.driver.add_chain(&[Desc::readable(addr, 0)]);
        assert_eq!(s.tx(), Err(ChainError::TooShort(0)));
    }

    #[test]
    fn overlapping_descriptors_are_read_as_they_are() {
        let mut s = setup();
        let bytes = packet(20);
        let addr = s.buffer(&bytes);
        let len = bytes.len() as u32;
        s.driver.add_chain(&[Desc::readable(addr, len), Desc::readable(addr + 4, 8)]);
        let mut expected = bytes.clone();
        expected.extend_from_slice(&bytes[4..12]);
        assert_eq!(s.tx().unwrap(), expected);
    }

    #[test]
    fn short_tx_chains_are_refused() {
        let mut s = setup();
        let addr = s.buffer(&packet(20));
        s.driver.add_chain(&[Desc::readable(addr, 8)]);
        assert_eq!(s.tx(), Err(ChainError::TooShort(8)));
        s.driver.add_chain(&[Desc::readable(addr, (VNET_HDR_LEN + ETH_HLEN - 1) as u32)]);
        assert_eq!(s.tx(), Err(ChainError::TooShort(VNET_HDR_LEN + ETH_HLEN - 1)));
    }

    #[test]
    fn tx_chains_longer_than_a_packet_are_refused() {
        let mut s = setup();
        let addr = s.alloc.alloc(MAX_PACKET_LEN as u64 + 1);
        s.driver.add_chain(&[Desc::readable(addr, MAX_PACKET_LEN as u32)]);
        assert_eq!(s.tx().unwrap().len(), MAX_PACKET_LEN);
        s.driver
            .add_chain(&[Desc::readable(addr, 12), Desc::readable(addr, MAX_FRAME_LEN as u32 + 1)]);
        assert_eq!(s.tx(), Err(ChainError::TooLong));
        s.driver.add_chain(&[Desc::readable(addr, u32::MAX)]);
        assert_eq!(s.tx(), Err(ChainError::TooLong));
    }

    #[test]
    fn buffers_outside_guest_memory_are_refused() {
        let mut s = setup();
        let addr = s.buffer(&packet(20));
        for (bad, len) in [(MEM_SIZE, 40), (MEM_SIZE - 8, 40), (u64::MAX - 8, 40)] {
            s.driver.add_chain(&[Desc::readable(addr, 12), Desc::readable(bad, len)]);
            assert_eq!(s.tx(), Err(ChainError::OutOfMemory { addr: bad, len }));
            s.driver.add_chain(&[Desc::writable(bad, len)]);
            assert_eq!(s.rx().unwrap_err(), ChainError::OutOfMemory { addr: bad, len });
        }
    }

    #[test]
    fn descriptors_in_the_wrong_direction_are_refused() {
        let mut s = setup();
        let addr = s.buffer(&packet(60));
        s.driver.add_chain(&[Desc::readable(addr, 12), Desc::writable(addr + 12, 60)]);
        assert_eq!(s.tx(), Err(ChainError::WrongDirection));
        s.driver.add_chain(&[Desc::writable(addr, 12), Desc::readable(addr + 12, 60)]);
        assert_eq!(s.rx().unwrap_err(), ChainError::WrongDirection);
    }

    #[test]
    fn looping_chains_are_refused() {
        let mut s = setup();
        let addr = s.buffer(&packet(20));
        s.driver.write_descriptor(3, addr, 4, VIRTQ_DESC_F_NEXT, 3);
        s.driver.publish(3);
        assert_eq!(s.tx(), Err(ChainError::Broken));
        s.driver.write_descriptor(4, addr, 4, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 5);
        s.driver.write_descriptor(5, addr, 4, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 4);
        s.driver.publish(4);
        assert_eq!(s.rx().unwrap_err(), ChainError::Broken);
    }

    #[test]
    fn chains_leading_out_of_the_table_are_refused() {
        let mut s = setup();
        let addr = s.buffer(&packet(20));
        s.driver.write_descriptor(3, addr, 32, VIRTQ_DESC_F_NEXT, QUEUE_SIZE);
        s.driver.publish(3);
        assert_eq!(s.tx(), Err(ChainError::Broken));
        s.driver.publish(QUEUE_SIZE + 1);
        assert_eq!(s.tx(), Err(ChainError::Broken), "a head outside the table is an empty chain");
    }

    #[test]
    fn a_bad_indirect_table_is_refused() {
        let mut s = setup();
        let table = s.alloc.alloc(64);
        s.driver.write_descriptor(3, table, 17, VIRTQ_DESC_F_INDIRECT, 0);
        s.driver.publish(3);
        assert_eq!(s.tx(), Err(ChainError::Broken));
    }

    #[test]
    fn an_rx_packet_is_scattered_over_the_buffers() {
        let mut s = setup();
        let (a, b) = (s.alloc.alloc(10), s.alloc.alloc(100));
        s.driver.add_chain(&[Desc::writable(a, 10), Desc::writable(0, 0), Desc::writable(b, 100)]);
        let buffers = s.rx().unwrap();
        let bytes = packet(40);
        buffers.write_packet(&s.mem, &bytes).unwrap();
        let mut back = vec![0u8; bytes.len()];
        s.mem.read_slice(&mut back[..10], GuestAddress(a)).unwrap();
        s.mem.read_slice(&mut back[10..], GuestAddress(b)).unwrap();
        assert_eq!(back, bytes);
    }

    #[test]
    fn an_rx_packet_that_does_not_fit_is_not_written_at_all() {
        let mut s = setup();
        let addr = s.buffer(&[0xaa; 30]);
        s.driver.add_chain(&[Desc::writable(addr, 30)]);
        let buffers = s.rx().unwrap();
        let err = buffers.write_packet(&s.mem, &packet(20)).unwrap_err();
        assert_eq!(err, ChainError::TooSmall { needed: 32, capacity: 30 });
        let mut back = [0u8; 30];
        s.mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, [0xaa; 30]);
    }

    #[test]
    fn headers_are_rewritten() {
        let mut bytes = packet(20);
        clear_tx_header(&mut bytes);
        assert_eq!(bytes[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        assert_eq!(bytes[VNET_HDR_LEN], VNET_HDR_LEN as u8);
        let mut bytes = packet(20);
        set_rx_header(&mut bytes);
        assert_eq!(bytes[..VNET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        let mut short = [7u8; 4];
        set_rx_header(&mut short);
        clear_tx_header(&mut short);
        assert_eq!(short, [7; 4], "a buffer shorter than a header is left alone");
    }
}
