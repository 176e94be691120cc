//! The virtio-vsock packet format (virtio 1.2 section 5.10.6): the 44-byte `virtio_vsock_hdr`,
//! its operations and flags, and the two ways a packet crosses guest memory — read from a tx
//! descriptor chain (header then payload, possibly spread over several readable descriptors)
//! and written into an rx descriptor chain.
//!
//! A tx packet is guest input: its header must be complete and its `len` must be at most
//! [`MAX_PKT_PAYLOAD`] and equal to the readable bytes that follow the header. What the header
//! *says* (cids, type, op) is judged by the muxer, not here.

use std::io::{Read, Write};

use virtio_queue::DescriptorChain;

use crate::memory::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The largest payload one packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// Stream socket type; the only one this device offers.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection refused or torn down.
    pub const RST: u16 = 3;
    /// The sender will no longer send and/or receive (see the shutdown flags).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Unsolicited or requested credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Ask the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// OP_SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// OP_SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`, decoded from its little-endian wire form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (shutdown flags for OP_SHUTDOWN).
    pub flags: u32,
    /// Receive buffer space the sender allocated to this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from that buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Decode the wire form.
    pub fn from_bytes(raw: &[u8; HDR_LEN]) -> Self {
        let u64_at = |at: usize| u64::from_le_bytes(field(raw, at));
        let u32_at = |at: usize| u32::from_le_bytes(field(raw, at));
        let u16_at = |at: usize| u16::from_le_bytes(field(raw, at));
        VsockHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encode the wire form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut raw = [0u8; HDR_LEN];
        raw[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        raw[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        raw[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        raw[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        raw[24..28].copy_from_slice(&self.len.to_le_bytes());
        raw[28..30].copy_from_slice(&self.type_.to_le_bytes());
        raw[30..32].copy_from_slice(&self.op.to_le_bytes());
        raw[32..36].copy_from_slice(&self.flags.to_le_bytes());
        raw[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        raw[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        raw
    }
}

/// The `N` bytes of `raw` at `at`; callers only use offsets inside the fixed header.
fn field<const N: usize>(raw: &[u8; HDR_LEN], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&raw[at..at + N]);
    out
}

/// Why a descriptor chain does not hold a usable packet or packet buffer.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain's descriptors do not describe guest memory.
    #[error("invalid descriptor chain")]
    Chain(#[source] virtio_queue::Error),
    /// Fewer readable bytes than a header.
    #[error("tx chain holds {0} readable bytes, less than a header")]
    ShortHeader(usize),
    /// The header announces a payload larger than a packet may carry.
    #[error("payload length {0} exceeds the {MAX_PKT_PAYLOAD}-byte maximum")]
    PayloadTooLong(u32),
    /// The header announces a payload that is not what the chain holds.
    #[error("header announces {declared} payload bytes, chain holds {present}")]
    LengthMismatch {
        /// `len` in the header.
        declared: u32,
        /// Readable bytes after the header.
        present: usize,
    },
    /// An rx chain with no room for a payload byte after the header.
    #[error("rx chain holds {0} writable bytes, no room for a payload after a header")]
    RxBufferTooSmall(usize),
    /// Copying to or from guest memory failed.
    #[error("guest memory access failed")]
    Memory(#[source] std::io::Error),
}

/// A tx packet whose header is readable but whose length field is unusable; the muxer resets
/// the connection it names rather than let its stream silently lose bytes.
#[derive(Debug)]
pub struct MalformedPacket {
    /// The header as the guest wrote it.
    pub hdr: VsockHeader,
    /// What is wrong with it.
    pub error: PacketError,
}

/// What a tx chain held.
#[derive(Debug)]
pub enum TxPacket {
    /// A header and `payload_len` bytes of payload, copied to the front of the caller's buffer.
    Valid {
        /// The header.
        hdr: VsockHeader,
        /// Payload bytes copied.
        payload_len: usize,
    },
    /// A header with an unusable length.
    Malformed(MalformedPacket),
}

/// Read the packet in `chain`: its header and its payload, copied into `payload` (which must
/// hold [`MAX_PKT_PAYLOAD`] bytes). Writable descriptors are not part of a tx packet.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    payload: &mut [u8],
) -> Result<TxPacket, PacketError> {
    let mut reader = chain.reader(mem).map_err(PacketError::Chain)?;
    let total = reader.available_bytes();
    if total < HDR_LEN {
        return Err(PacketError::ShortHeader(total));
    }
    let mut raw = [0u8; HDR_LEN];
    reader.read_exact(&mut raw).map_err(PacketError::Memory)?;
    let hdr = VsockHeader::from_bytes(&raw);
    let present = reader.available_bytes();
    let malformed = |error| Ok(TxPacket::Malformed(MalformedPacket { hdr, error }));
    let declared = hdr.len;
    let buf = match usize::try_from(declared) {
        Ok(len) if len <= MAX_PKT_PAYLOAD => payload.get_mut(..len),
        _ => None,
    };
    let Some(buf) = buf else {
        return malformed(PacketError::PayloadTooLong(declared));
    };
    if buf.len() != present {
        return malformed(PacketError::LengthMismatch { declared, present });
    }
    reader.read_exact(buf).map_err(PacketError::Memory)?;
    Ok(TxPacket::Valid { hdr, payload_len: present })
}

/// The writable part of an rx chain, checked to hold a header and at least one payload byte
/// (a header-only buffer could carry control packets but would wedge data behind it).
pub struct RxBuffer<'a> {
    writer: virtio_queue::Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    /// Take the writable descriptors of `chain`.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let writer = chain.writer(mem).map_err(PacketError::Chain)?;
        let capacity = writer.available_bytes();
        if capacity <= HDR_LEN {
            return Err(PacketError::RxBufferTooSmall(capacity));
        }
        Ok(RxBuffer { writer })
    }

    /// How many payload bytes fit after the header (at most [`MAX_PKT_PAYLOAD`]).
    pub fn payload_capacity(&self) -> usize {
        (self.writer.available_bytes() - HDR_LEN).min(MAX_PKT_PAYLOAD)
    }

    /// Write `hdr` and `payload` (which must fit) and return the bytes written.
    pub fn write_packet(mut self, hdr: &VsockHeader, payload: &[u8]) -> Result<u32, PacketError> {
        self.writer.write_all(&hdr.to_bytes()).map_err(PacketError::Memory)?;
        self.writer.write_all(payload).map_err(PacketError::Memory)?;
        u32::try_from(self.writer.bytes_written())
            .map_err(|e| PacketError::Memory(std::io::Error::other(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_little_endian() {
        let hdr = VsockHeader {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 1234,
            len: 7,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 65536,
            fwd_cnt: 0xffff_fffe,
        };
        let raw = hdr.to_bytes();
        assert_eq!(raw[0], 0x08, "src_cid is little endian");
        assert_eq!(&raw[8..16], &2u64.to_le_bytes());
        assert_eq!(&raw[28..30], &[1, 0]);
        assert_eq!(&raw[30..32], &[5, 0]);
        assert_eq!(VsockHeader::from_bytes(&raw), hdr);
    }
}
