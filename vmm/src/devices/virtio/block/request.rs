//! One block request (virtio 1.2 section 5.2.6): framing a descriptor chain into the
//! device-readable header and data, the device-writable data and the final status byte;
//! parsing and checking the request against the disk; executing it and writing its status.
//!
//! Everything here comes from the guest: a chain that cannot carry a status byte is returned
//! used with length 0, any other bad request gets VIRTIO_BLK_S_IOERR (or VIRTIO_BLK_S_UNSUPP
//! for an unknown type), and nothing is trusted before it is checked.

use std::io;
use std::mem::size_of;

use virtio_bindings::virtio_blk::{
    virtio_blk_outhdr, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::disk::DiskImage;
use super::SECTOR_SIZE;
use crate::memory::GuestMemoryMmap;

/// Bytes of the request header (type, reserved, sector).
const HEADER_SIZE: usize = size_of::<virtio_blk_outhdr>();

/// A guest buffer: `len` bytes at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    addr: GuestAddress,
    len: u32,
}

impl Segment {
    fn of(descriptor: &Descriptor) -> Self {
        Segment { addr: descriptor.addr(), len: descriptor.len() }
    }
}

/// Total bytes of `segments`.
fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// A chain's buffers as virtio-blk frames them, whatever the descriptor layout
/// (VIRTIO_F_VERSION_1 implies VIRTIO_F_ANY_LAYOUT): the status is the last byte of the
/// trailing device-writable buffers, the header the first 16 device-readable bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Frame {
    /// The device-readable buffers: header, then the data of a write.
    readable: Vec<Segment>,
    /// The device-writable buffers before the status byte: the data of a read or GET_ID.
    writable: Vec<Segment>,
    /// Where the status byte goes.
    status: GuestAddress,
    /// Whether every device-readable buffer comes before every device-writable one.
    in_order: bool,
}

/// Why a chain cannot be completed with a status byte.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum FrameError {
    /// The chain is empty or cut short: a next index out of range, a loop, an unreadable
    /// descriptor, or lengths summing past 4 GiB.
    #[error("the descriptor chain is cut short")]
    Truncated,
    /// More descriptors than the queue has (through an indirect table).
    #[error("the descriptor chain is longer than {0} descriptors")]
    TooLong(usize),
    /// No device-writable byte ends the chain.
    #[error("the descriptor chain ends without a device-writable status byte")]
    NoStatus,
}

impl Frame {
    /// Frame the descriptors of a chain, reading at most `max_descriptors + 1` of them.
    pub(super) fn new(
        chain: impl Iterator<Item = Descriptor>,
        max_descriptors: usize,
    ) -> Result<Self, FrameError> {
        let descriptors: Vec<Descriptor> = chain.take(max_descriptors.saturating_add(1)).collect();
        if descriptors.len() > max_descriptors {
            return Err(FrameError::TooLong(max_descriptors));
        }
        // The chain iterator stops silently on a bad next index, a loop or a length overflow;
        // the last descriptor it gave then still says that more follow.
        match descriptors.last() {
            Some(last) if !last.has_next() => {}
            _ => return Err(FrameError::Truncated),
        }
        let trailing_writable =
            descriptors.iter().rposition(|d| !d.is_write_only()).map_or(0, |i| i + 1);
        let (front, trailing) = descriptors.split_at(trailing_writable);
        let status_at = trailing.iter().rposition(|d| d.len() > 0).ok_or(FrameError::NoStatus)?;
        let (before_status, status_and_after) = trailing.split_at(status_at);
        let status_descriptor = status_and_after.first().ok_or(FrameError::NoStatus)?;
        let data_len = status_descriptor.len() - 1;
        let status = status_descriptor
            .addr()
            .checked_add(u64::from(data_len))
            .ok_or(FrameError::NoStatus)?;
        let in_order = front.iter().all(|d| !d.is_write_only());
        let writable_data = front
            .iter()
            .chain(before_status)
            .filter(|d| d.is_write_only())
            .map(Segment::of)
            .chain([Segment { addr: status_descriptor.addr(), len: data_len }]);
        Ok(Frame {
            readable: non_empty(descriptors.iter().filter(|d| !d.is_write_only()).map(Segment::of)),
            writable: non_empty(writable_data),
            status,
            in_order,
        })
    }
}

/// The segments of `segments` that hold at least one byte.
fn non_empty(segments: impl Iterator<Item = Segment>) -> Vec<Segment> {
    segments.filter(|s| s.len > 0).collect()
}

/// Split `segments` after their first `at` bytes.
fn split_segments(segments: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut remaining = at;
    for segment in segments {
        let taken = u64::from(segment.len).min(remaining);
        remaining -= taken;
        // `taken <= segment.len`, so both fit in u32.
        let taken_len = taken as u32;
        if taken_len > 0 {
            head.push(Segment { addr: segment.addr, len: taken_len });
        }
        if taken_len < segment.len {
            // Only a segment that wraps around the address space can overflow here; its first
            // bytes then fail to read as a header, so this tail is never used.
            let addr = GuestAddress(segment.addr.0.wrapping_add(taken));
            tail.push(Segment { addr, len: segment.len - taken_len });
        }
    }
    (head, tail)
}

/// The request types the device serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RequestType {
    /// Read sectors into the guest.
    In,
    /// Write sectors from the guest.
    Out,
    /// Make written sectors durable.
    Flush,
    /// Return the device id string.
    GetId,
}

impl RequestType {
    fn parse(value: u32) -> Result<Self, RequestError> {
        match value {
            VIRTIO_BLK_T_IN => Ok(RequestType::In),
            VIRTIO_BLK_T_OUT => Ok(RequestType::Out),
            VIRTIO_BLK_T_FLUSH => Ok(RequestType::Flush),
            VIRTIO_BLK_T_GET_ID => Ok(RequestType::GetId),
            other => Err(RequestError::Unsupported(other)),
        }
    }
}

/// Why a request failed: each is answered with an error status.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    /// Device-readable buffers follow device-writable ones.
    #[error("device-readable buffers follow device-writable ones")]
    Misordered,
    /// Fewer than 16 device-readable bytes.
    #[error("the request header is {0} bytes long, not {HEADER_SIZE}")]
    ShortHeader(u64),
    /// The header is not in guest memory.
    #[error("the request header lies outside guest memory")]
    HeaderOutsideMemory,
    /// A type the device does not serve.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// Data buffers the device should write are device-readable or the other way round.
    #[error("the data buffers of a {0:?} request go the wrong way")]
    WrongDirection(RequestType),
    /// The data is not made of whole sectors.
    #[error("{0} bytes of data are not a whole number of sectors")]
    PartialSector(u64),
    /// The data runs past the end of the disk.
    #[error("{len} bytes at sector {sector} run past the disk's {capacity} sectors")]
    BeyondCapacity {
        /// The first sector.
        sector: u64,
        /// The data length in bytes.
        len: u64,
        /// The disk's capacity in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A data buffer is not in guest memory.
    #[error("a data buffer of {len} bytes at {:#x} lies outside guest memory", .addr.0)]
    DataOutsideMemory {
        /// Its guest address.
        addr: GuestAddress,
        /// Its length.
        len: u32,
    },
    /// The host failed the I/O.
    #[error("disk I/O failed")]
    Io(#[source] io::Error),
}

impl RequestError {
    /// The status byte that reports this error.
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A parsed request: its type, first sector and data buffers.
#[derive(Debug)]
pub(super) struct Request {
    kind: RequestType,
    sector: u64,
    data: Vec<Segment>,
}

impl Request {
    /// Read the header of `frame` and pick the data buffers its type calls for.
    pub(super) fn parse(frame: &Frame, mem: &GuestMemoryMmap) -> Result<Self, RequestError> {
        if !frame.in_order {
            return Err(RequestError::Misordered);
        }
        let (header, readable_data) = split_segments(&frame.readable, HEADER_SIZE as u64);
        let (kind, sector) = read_header(&header, mem)?;
        let data = match kind {
            RequestType::In | RequestType::GetId if readable_data.is_empty() => {
                frame.writable.clone()
            }
            RequestType::Out if frame.writable.is_empty() => readable_data,
            // FLUSH carries no data: buffers besides header and status are ignored.
            RequestType::Flush => Vec::new(),
            _ => return Err(RequestError::WrongDirection(kind)),
        };
        Ok(Request { kind, sector, data })
    }

    /// Carry the request out; returns the number of data bytes written into guest memory.
    pub(super) fn execute(
        &self,
        disk: &DiskImage,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, RequestError> {
        match self.kind {
            RequestType::In => {
                let offset = self.disk_offset(disk)?;
                let slices = guest_slices(&self.data, mem)?;
                disk.read_into(offset, &slices).map_err(RequestError::Io)?;
                Ok(u32::try_from(total_len(&self.data)).unwrap_or(u32::MAX))
            }
            RequestType::Out => {
                if disk.is_read_only() {
                    return Err(RequestError::ReadOnly);
                }
                let offset = self.disk_offset(disk)?;
                let slices = guest_slices(&self.data, mem)?;
                disk.write_from(offset, &slices).map_err(RequestError::Io)?;
                Ok(0)
            }
            RequestType::Flush => disk.flush().map(|()| 0).map_err(RequestError::Io),
            RequestType::GetId => {
                let slices = guest_slices(&self.data, mem)?;
                Ok(copy_to_slices(disk.id(), &slices))
            }
        }
    }

    /// The byte offset in the disk of a read or write, once its data is checked to be whole
    /// sectors inside the disk.
    fn disk_offset(&self, disk: &DiskImage) -> Result<u64, RequestError> {
        let len = total_len(&self.data);
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::PartialSector(len));
        }
        let capacity = disk.capacity();
        let range = self
            .sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| Some((start, start.checked_add(len)?)));
        // The capacity counts the image's whole sectors: it cannot overflow in bytes.
        match range {
            Some((start, end)) if end <= capacity * SECTOR_SIZE => Ok(start),
            _ => Err(RequestError::BeyondCapacity { sector: self.sector, len, capacity }),
        }
    }
}

/// Read the header from its segments (16 bytes in all at most): the type and the sector.
fn read_header(
    segments: &[Segment],
    mem: &GuestMemoryMmap,
) -> Result<(RequestType, u64), RequestError> {
    let len = total_len(segments);
    if len < HEADER_SIZE as u64 {
        return Err(RequestError::ShortHeader(len));
    }
    let mut bytes = [0u8; HEADER_SIZE];
    let mut filled = 0;
    for segment in segments {
        let end = filled + segment.len as usize;
        let target = bytes.get_mut(filled..end).ok_or(RequestError::HeaderOutsideMemory)?;
        mem.read_slice(target, segment.addr).map_err(|_| RequestError::HeaderOutsideMemory)?;
        filled = end;
    }
    let [t0, t1, t2, t3, _, _, _, _, sector @ ..] = bytes;
    let kind = RequestType::parse(u32::from_le_bytes([t0, t1, t2, t3]))?;
    Ok((kind, u64::from_le_bytes(sector)))
}

/// The host slices behind `segments`, checking that all of them lie in guest memory before
/// any I/O happens.
fn guest_slices<'m>(
    segments: &[Segment],
    mem: &'m GuestMemoryMmap,
) -> Result<Vec<VolatileSlice<'m, ()>>, RequestError> {
    let mut slices = Vec::with_capacity(segments.len());
    for segment in segments {
        let outside = |_| RequestError::DataOutsideMemory { addr: segment.addr, len: segment.len };
        for slice in mem.get_slices(segment.addr, segment.len as usize) {
            slices.push(slice.map_err(outside)?);
        }
    }
    Ok(slices)
}

/// Copy `bytes` into `slices`, in order, as far as they reach; returns the bytes copied.
fn copy_to_slices(bytes: &[u8], slices: &[VolatileSlice<()>]) -> u32 {
    let mut copied = 0;
    for slice in slices {
        let Some(rest) = bytes.get(copied..).filter(|rest| !rest.is_empty()) else {
            break;
        };
        slice.copy_from(rest);
        copied += rest.len().min(slice.len());
    }
    // At most ID_BYTES.
    copied as u32
}

/// Serve one chain against `disk`: frame it, parse and execute its request, write the status.
/// Returns the used length: the bytes written into the chain, status included, or 0 when the
/// chain cannot take a status byte.
pub(super) fn serve_chain(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
    max_descriptors: usize,
) -> u32 {
    let frame = match Frame::new(chain, max_descriptors) {
        Ok(frame) => frame,
        Err(e) => {
            log::debug!("block {}: chain returned unanswered: {e}", disk.path().display());
            return 0;
        }
    };
    if !mem.address_in_range(frame.status) {
        log::debug!("block {}: the status byte lies outside guest memory", disk.path().display());
        return 0;
    }
    let (status, written) = match Request::parse(&frame, mem).and_then(|r| r.execute(disk, mem)) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(e) => {
            match &e {
                RequestError::Io(_) => log::warn!("block {}: {e}", disk.path().display()),
                _ => log::debug!("block {}: bad request: {e}", disk.path().display()),
            }
            (e.status(), 0)
        }
    };
    if let Err(e) = mem.write_obj(status, frame.status) {
        log::debug!("block {}: cannot write the status byte: {e}", disk.path().display());
        return 0;
    }
    written.saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// A chain of descriptors linked in order; `(addr, len, writable)`.
    fn chain(descriptors: &[(u64, u32, bool)]) -> Vec<Descriptor> {
        descriptors
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable { WRITE } else { 0 };
                if i + 1 < descriptors.len() {
                    flags |= NEXT;
                }
                Descriptor::new(addr, len, flags, i as u16 + 1)
            })
            .collect()
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr: GuestAddress(addr), len }
    }

    #[test]
    fn frames_header_data_and_status() {
        let frame = Frame::new(
            chain(&[
                (0x1000, 16, false),
                (0x2000, 512, true),
                (0x3000, 1024, true),
                (0x4000, 1, true),
            ])
            .into_iter(),
            8,
        )
        .unwrap();
        assert_eq!(
            frame,
            Frame {
                readable: vec![seg(0x1000, 16)],
                writable: vec![seg(0x2000, 512), seg(0x3000, 1024)],
                status: GuestAddress(0x4000),
                in_order: true,
            }
        );
    }

    #[test]
    fn status_may_share_the_last_descriptor_with_data() {
        let frame =
            Frame::new(chain(&[(0x1000, 16, false), (0x2000, 513, true)]).into_iter(), 8).unwrap();
        assert_eq!(frame.writable, vec![seg(0x2000, 512)]);
        assert_eq!(frame.status, GuestAddress(0x2200));
    }

    #[test]
    fn zero_length_descriptors_are_skipped() {
        let frame = Frame::new(
            chain(&[
                (0x1000, 0, false),
                (0x1000, 16, false),
                (0x2000, 0, true),
                (0x3000, 1, true),
                (0, 0, true),
            ])
            .into_iter(),
            8,
        )
        .unwrap();
        assert_eq!(frame.readable, vec![seg(0x1000, 16)]);
        assert_eq!(frame.writable, vec![]);
        assert_eq!(frame.status, GuestAddress(0x3000));
    }

    #[test]
    fn chains_without_a_status_byte_are_refused() {
        let no_writable = chain(&[(0x1000, 16, false), (0x2000, 512, false)]);
        assert_eq!(Frame::new(no_writable.into_iter(), 8), Err(FrameError::NoStatus));
        let ends_readable = chain(&[(0x1000, 16, false), (0x3000, 1, true), (0x2000, 512, false)]);
        assert_eq!(Frame::new(ends_readable.into_iter(), 8), Err(FrameError::NoStatus));
        let empty_status = chain(&[(0x1000, 16, false), (0x3000, 0, true)]);
        assert_eq!(Frame::new(empty_status.into_iter(), 8), Err(FrameError::NoStatus));
        let wrapping = chain(&[(0x1000, 16, false), (u64::MAX - 1, 4, true)]);
        assert_eq!(Frame::new(wrapping.into_iter(), 8), Err(FrameError::NoStatus));
    }

    #[test]
    fn cut_short_and_overlong_chains_are_refused() {
        assert_eq!(Frame::new(std::iter::empty(), 8), Err(FrameError::Truncated));
        let mut cut = chain(&[(0x1000, 16, false), (0x3000, 1, true)]);
        cut[1] = Descriptor::new(0x3000, 1, WRITE | NEXT, 99);
        assert_eq!(Frame::new(cut.into_iter(), 8), Err(FrameError::Truncated));
        let long = chain(&[(0x1000, 16, false), (0x2000, 512, true), (0x3000, 1, true)]);
        assert_eq!(Frame::new(long.clone().into_iter(), 2), Err(FrameError::TooLong(2)));
        assert!(Frame::new(long.into_iter(), 3).is_ok());
    }

    #[test]
    fn readable_after_writable_is_flagged() {
        let frame = Frame::new(
            chain(&[(0x2000, 512, true), (0x1000, 16, false), (0x3000, 1, true)]).into_iter(),
            8,
        )
        .unwrap();
        assert!(!frame.in_order);
        assert_eq!(frame.status, GuestAddress(0x3000));
    }

    #[test]
    fn segments_split_at_a_byte_offset() {
        let segments = [seg(0x1000, 10), seg(0x2000, 10), seg(0x3000, 4)];
        let (head, tail) = split_segments(&segments, 16);
        assert_eq!(head, vec![seg(0x1000, 10), seg(0x2000, 6)]);
        assert_eq!(tail, vec![seg(0x2006, 4), seg(0x3000, 4)]);
        let (head, tail) = split_segments(&segments, 100);
        assert_eq!((head.as_slice(), tail.as_slice()), (&segments[..], &[][..]));
    }

    #[test]
    fn copies_as_much_of_the_id_as_fits() {
        let mut a = [0xffu8; 3];
        let mut b = [0xffu8; 30];
        let slices = [VolatileSlice::from(&mut a[..]), VolatileSlice::from(&mut b[..])];
        assert_eq!(copy_to_slices(b"0123456789abcdefghij", &slices), 20);
        assert_eq!(&a, b"012");
        assert_eq!(&b[..17], b"3456789abcdefghij");
        assert_eq!(b[17], 0xff);
    }
}
