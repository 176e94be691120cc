//! Guest memory: anonymous, lazily faulted mappings from vm-memory, laid out around the MMIO gap.
//!
//! The mappings are `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE` and not pre-faulted, so an
//! idle guest costs the host only the pages it touched.

use vm_memory::{GuestAddress, GuestRegionMmap as Region, MmapRegion};

/// One mapped region of guest memory.
pub type GuestRegionMmap = Region<()>;

/// Guest memory as the whole VMM sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot map {mib} MiB of guest memory at {addr:#x}")]
    Map {
        mib: u64,
        addr: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions overlap or wrap around the guest address space.
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
}

/// Map `regions` (guest address, size in bytes) as guest memory.
pub fn create_guest_memory(
    regions: &[(GuestAddress, usize)],
) -> Result<GuestMemoryMmap, MemoryError> {
    let mapped = regions
        .iter()
        .map(|&(addr, size)| {
            let region = MmapRegion::new(size).map_err(|source| MemoryError::Map {
                mib: (size as u64) >> 20,
                addr: addr.0,
                source,
            })?;
            GuestRegionMmap::new(region, addr)
                .ok_or_else(|| MemoryError::Layout(format!("region at {:#x} wraps around", addr.0)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Layout(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn maps_regions_lazily() {
        let mem =
            create_guest_memory(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)])
                .unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(7u32, GuestAddress((1 << 32) + 16)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress((1 << 32) + 16)).unwrap(), 7);
        assert!(mem.read_obj::<u32>(GuestAddress(2 << 20)).is_err());
    }

    #[test]
    fn overlapping_regions_are_an_error() {
        let err =
            create_guest_memory(&[(GuestAddress(0), 2 << 20), (GuestAddress(1 << 20), 1 << 20)])
                .unwrap_err();
        assert!(matches!(err, MemoryError::Layout(_)), "{err}");
    }

    #[test]
    fn unmappable_size_is_an_error() {
        let err = create_guest_memory(&[(GuestAddress(0), usize::MAX & !0xfff)]).unwrap_err();
        assert!(matches!(err, MemoryError::Map { .. }), "{err}");
    }
}
