//! Guest memory: anonymous, lazily faulted mappings laid out around the MMIO gap, served to the
//! rest of the VMM as vm-memory's `GuestMemoryMmap`.
//!
//! The mappings are `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE` and not pre-faulted, so an
//! idle guest costs the host only what it touched. Each starts on a 2 MiB boundary and is
//! advised for transparent huge pages, as QEMU and Cloud Hypervisor do: the host then backs
//! the guest with 2 MiB pages where it can, and KVM maps those with 2 MiB nested page table
//! entries, so a booting guest takes one fault per 2 MiB instead of one per 4 KiB (a fiftieth
//! of the faults in a kernel boot, which is what the guest waits on under nested KVM).
//!
//! Or all but the first [`SMALL_BOOT_PAGES`] bytes, for VMs that idle side by side (containers,
//! [`VmConfig::small_boot_pages`](crate::config::VmConfig::small_boot_pages)): there lie the
//! boot structures, the kernel and what the kernel allocates as it boots (its page allocator
//! hands out the lowest free pages first), scattered: an idle guest uses about half of the
//! 2 MiB pages it touches there, so small pages make an idle VM cost the host what its guest
//! uses (measured in the nested test host: 18.7 instead of 23.4 MiB of anonymous memory, and
//! no slower a boot when the kernel's pages are mapped from its file, which are small pages
//! anyway). A workload's memory lands above, in huge pages.
//!
//! Boot may then replace pages of it with private mappings of a file ([`map_file_private`]):
//! the kernel's and the initramfs's, whose page cache pages all VMs booting them then share.
//!
//! vm-memory cannot place a mapping on a boundary, so [`GuestRam`] makes and owns the mappings
//! and hands vm-memory unowned regions over them; it unmaps them only once no copy of the
//! guest memory is left.

use std::io;
use std::ops::Deref;
use std::ptr::null_mut;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestRegionMmap as Region};

/// One mapped region of guest memory.
pub type GuestRegionMmap = Region<()>;

/// Guest memory as the whole VMM sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// The alignment of each mapping: the x86 huge page size.
pub(crate) const HUGE_PAGE: usize = 2 << 20;
/// How much of guest memory, from address 0, small boot pages cover (see the module's doc).
pub const SMALL_BOOT_PAGES: usize = 64 << 20;

const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host refused the mapping.
    #[error("cannot map {mib} MiB of guest memory at {addr:#x}")]
    Map {
        mib: u64,
        addr: u64,
        #[source]
        source: io::Error,
    },
    /// The regions overlap or wrap around the guest address space.
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
}

/// One mapping made by [`GuestRam`].
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: a Mapping is an address range, not access to it; it is only used to unmap the range
// once, from whichever thread drops the GuestRam.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared references to a Mapping never touch the memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes on a [`HUGE_PAGE`] boundary and advise them for huge pages, all but the
    /// first `small_head` bytes (a multiple of the page size), which are kept to 4 KiB pages.
    fn new(len: usize, small_head: usize) -> io::Result<Self> {
        let reserve =
            len.checked_add(HUGE_PAGE).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; it cannot
        // overlap anything that exists.
        let base = unsafe { libc::mmap(null_mut(), reserve, PROT, FLAGS, -1, 0) };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let head = (base as usize).next_multiple_of(HUGE_PAGE) - base as usize;
        let tail = reserve - head - len;
        // SAFETY: `head` and `tail` bytes at either end of the mapping just made, which nothing
        // else knows of; page-aligned since `base`, `HUGE_PAGE` and `len` are (the caller
        // passes whole pages).
        let addr = unsafe {
            let addr = base.cast::<u8>().add(head).cast::<libc::c_void>();
            if head > 0 {
                libc::munmap(base, head);
            }
            if tail > 0 {
                libc::munmap(addr.cast::<u8>().add(len).cast(), tail);
            }
            addr
        };
        let small_head = small_head.min(len);
        // SAFETY: advice on the mapping just made (`small_head` <= `len`); it changes how the
        // kernel backs it, not its contents.
        let advised = unsafe {
            (small_head == 0 || libc::madvise(addr, small_head, libc::MADV_NOHUGEPAGE) == 0)
                && (small_head == len
                    || libc::madvise(
                        addr.cast::<u8>().add(small_head).cast(),
                        len - small_head,
                        libc::MADV_HUGEPAGE,
                    ) == 0)
        };
        if !advised {
            // Transparent huge pages are off on this host: 4 KiB pages it is.
            log::debug!("guest memory: no huge pages: {}", io::Error::last_os_error());
        }
        Ok(Mapping { addr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by Mapping::new and is unmapped once, here; GuestRam
        // drops a Mapping only when no region over it is left.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Guest memory and the mappings under it.
///
/// Derefs to the [`GuestMemoryMmap`] that devices and boot code use. Copies of that may be
/// handed out freely; dropping the `GuestRam` unmaps the memory only if none of them is left
/// (otherwise it stays mapped, logged as a leak, never freed under a user).
pub struct GuestRam {
    mem: GuestMemoryMmap,
    /// The regions of `mem`, to see whether copies of them are still around.
    regions: Vec<Arc<GuestRegionMmap>>,
    /// Declared last: unmapped after the regions over it are gone.
    mappings: Vec<Mapping>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam").field("regions", &self.regions.len()).finish()
    }
}

impl Deref for GuestRam {
    type Target = GuestMemoryMmap;

    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        drop(std::mem::take(&mut self.mem));
        if self.regions.iter().any(|r| Arc::strong_count(r) > 1) {
            log::warn!("guest memory is still in use at the end of its VM; leaving it mapped");
            std::mem::forget(std::mem::take(&mut self.mappings));
        }
    }
}

/// Back `len` bytes of guest memory at `addr` with a private mapping of `file` from `offset`:
/// the guest then reads the file's bytes there, from page cache pages shared with every other
/// mapping of the file, until it writes a page (which gets a copy of its own). `addr`,
/// `offset` and `len` must be page-aligned, the range must lie in one region, and the file
/// must hold `len` bytes from `offset`. Meant for boot, before any vCPU runs: what was in the
/// range before is gone.
pub fn map_file_private(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    file: &std::fs::File,
    offset: u64,
) -> io::Result<()> {
    let page = 4096u64;
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let aligned = [addr.0, offset, len as u64].iter().all(|n| n.is_multiple_of(page));
    if !aligned || len == 0 {
        return Err(invalid("unaligned file mapping"));
    }
    let end = offset.checked_add(len as u64).ok_or_else(|| invalid("offset overflows"))?;
    if file.metadata()?.len() < end {
        return Err(invalid("the file is shorter than the mapping"));
    }
    let host = mem
        .get_slice(addr, len)
        .map_err(|e| invalid(&format!("not one guest memory range: {e}")))?
        .ptr_guard_mut()
        .as_ptr();
    let offset = libc::off_t::try_from(offset).map_err(|_| invalid("offset too large"))?;
    let flags = libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE;
    // SAFETY: `host..host + len` is guest memory of one region (get_slice checked), inside a
    // mapping GuestRam owns and unmaps as a whole; MAP_FIXED replaces exactly those pages, so
    // no other mapping of this process is touched and the region's pointer stays valid.
    let mapped = unsafe {
        libc::mmap(host.cast(), len, PROT, flags, std::os::fd::AsRawFd::as_raw_fd(file), offset)
    };
    if mapped == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Map `regions` (guest address, size in bytes, whole pages) as guest memory.
pub fn create_guest_memory(regions: &[(GuestAddress, usize)]) -> Result<GuestRam, MemoryError> {
    create_guest_memory_with_small_pages_below(regions, 0)
}

/// Map `regions` as guest memory, with small pages for the guest addresses below
/// `small_below` (a multiple of the page size; [`SMALL_BOOT_PAGES`] for small boot pages) and
/// huge pages above.
pub fn create_guest_memory_with_small_pages_below(
    regions: &[(GuestAddress, usize)],
    small_below: usize,
) -> Result<GuestRam, MemoryError> {
    let mut mappings = Vec::with_capacity(regions.len());
    let mut arcs = Vec::with_capacity(regions.len());
    for &(addr, size) in regions {
        let map_err = |source| MemoryError::Map { mib: (size as u64) >> 20, addr: addr.0, source };
        let small_head = usize::try_from(addr.0).map_or(0, |a| small_below.saturating_sub(a));
        let mapping = Mapping::new(size, small_head).map_err(map_err)?;
        // SAFETY: `mapping` covers `size` bytes at its address and outlives every region over
        // it: GuestRam unmaps it only when it holds the last reference to this region.
        let region =
            unsafe { MmapRegionBuilder::new(size).with_raw_mmap_pointer(mapping.addr.cast()) }
                .with_mmap_prot(PROT)
                .with_mmap_flags(FLAGS)
                .build()
                .map_err(|e| map_err(io::Error::other(e)))?;
        mappings.push(mapping);
        let region = GuestRegionMmap::new(region, addr)
            .ok_or_else(|| MemoryError::Layout(format!("region at {:#x} wraps around", addr.0)))?;
        arcs.push(Arc::new(region));
    }
    let mem = GuestMemoryMmap::from_arc_regions(arcs.clone())
        .map_err(|e| MemoryError::Layout(e.to_string()))?;
    Ok(GuestRam { mem, regions: arcs, mappings })
}

/// The address range a `/proc/self/maps` (or `smaps` header) line describes.
pub(crate) fn maps_range(line: &str) -> Option<std::ops::Range<usize>> {
    let (lo, hi) = line.split_once(' ')?.0.split_once('-')?;
    Some(usize::from_str_radix(lo, 16).ok()?..usize::from_str_radix(hi, 16).ok()?)
}

/// The file mapped at `addr` in this process (empty for anonymous memory), or None where
/// nothing is mapped.
#[cfg(test)]
pub(crate) fn mapping_at(addr: usize) -> Option<String> {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().find_map(|l| {
        let path = l.split_whitespace().nth(5).unwrap_or("");
        maps_range(l)?.contains(&addr).then(|| path.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

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
    fn mappings_start_on_huge_page_boundaries() {
        let mem =
            create_guest_memory(&[(GuestAddress(0), 6 << 20), (GuestAddress(1 << 32), 3 << 20)])
                .unwrap();
        for addr in [GuestAddress(0), GuestAddress(1 << 32)] {
            let host = mem.get_host_address(addr).unwrap() as usize;
            assert_eq!(host % HUGE_PAGE, 0, "{addr:?} at host {host:#x}");
        }
    }

    /// Whether `addr` lies in a mapping of this process.
    fn is_mapped(addr: usize) -> bool {
        mapping_at(addr).is_some()
    }

    #[test]
    fn memory_is_unmapped_with_its_last_user() {
        let ram = create_guest_memory(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let host = ram.get_host_address(GuestAddress(0)).unwrap() as usize;
        let copy = ram.deref().clone();
        drop(ram);
        // A copy is still around: the memory stays, and is still usable.
        copy.write_obj(5u64, GuestAddress(8)).unwrap();
        assert_eq!(copy.read_obj::<u64>(GuestAddress(8)).unwrap(), 5);
        assert!(is_mapped(host));

        let ram = create_guest_memory(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let host = ram.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert!(is_mapped(host));
        drop(ram);
        assert!(!is_mapped(host), "no user left: unmapped");
    }

    /// The value of field `name` (as "Pss:") in `/proc/self/smaps` for the mapping that holds
    /// `addr`.
    fn smaps_field(addr: usize, name: &str) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(l) = lines.next() {
            if maps_range(l).is_some_and(|range| range.contains(&addr)) {
                // The entry's fields, up to the next entry's header.
                let value = lines
                    .take_while(|l| maps_range(l).is_none())
                    .find_map(|l| l.strip_prefix(name));
                return value.unwrap_or_else(|| panic!("no {name} for {addr:#x}")).trim().into();
            }
        }
        panic!("{addr:#x} is not mapped");
    }

    /// The `Pss` and `Private_Dirty` KiB of this process's mapping that holds `addr`.
    fn sharing_of(addr: usize) -> (u64, u64) {
        let kib = |name| smaps_field(addr, name).split(' ').next().unwrap().parse().unwrap();
        (kib("Pss:"), kib("Private_Dirty:"))
    }

    /// Whether the mapping at guest address `addr` asks for huge pages ("hg") or refuses them
    /// ("nh").
    fn huge_page_advice(mem: &GuestMemoryMmap, addr: u64) -> &'static str {
        let host = mem.get_host_address(GuestAddress(addr)).unwrap() as usize;
        let flags = smaps_field(host, "VmFlags:");
        let flags: Vec<&str> = flags.split_whitespace().collect();
        match (flags.contains(&"hg"), flags.contains(&"nh")) {
            (true, false) => "hg",
            (false, true) => "nh",
            _ => panic!("guest {addr:#x}: {flags:?}"),
        }
    }

    #[test]
    fn huge_pages_are_asked_for_everywhere_or_above_the_small_boot_pages() {
        let head = SMALL_BOOT_PAGES as u64;
        let regions =
            [(GuestAddress(0), SMALL_BOOT_PAGES + (4 << 20)), (GuestAddress(1 << 32), 2 << 20)];
        let mem = create_guest_memory(&regions).unwrap();
        for addr in [0, head - 4096, head, 1 << 32] {
            assert_eq!(huge_page_advice(&mem, addr), "hg", "guest {addr:#x}");
        }
        let mem = create_guest_memory_with_small_pages_below(&regions, SMALL_BOOT_PAGES).unwrap();
        for (addr, advice) in [(0, "nh"), (head - 4096, "nh"), (head, "hg"), (1 << 32, "hg")] {
            assert_eq!(huge_page_advice(&mem, addr), advice, "guest {addr:#x}");
        }
    }

    #[test]
    fn a_file_mapping_shows_the_file_and_keeps_the_guests_writes_private() {
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        let bytes: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&bytes).unwrap();
        let ram = create_guest_memory(&[(GuestAddress(0), 4 << 20)]).unwrap();
        ram.write_slice(&[0xaa; 8192], GuestAddress(1 << 20)).unwrap();
        map_file_private(&ram, GuestAddress(1 << 20), 8192, &file, 4096).unwrap();
        let mut got = [0u8; 8192];
        ram.read_slice(&mut got, GuestAddress(1 << 20)).unwrap();
        assert!(got[..] == bytes[4096..], "the guest reads the file's pages");
        // A second mapping of the same file (another VM): the pages are the same page cache
        // pages, shared.
        let other = create_guest_memory(&[(GuestAddress(0), 4 << 20)]).unwrap();
        map_file_private(&other, GuestAddress(0), 8192, &file, 4096).unwrap();
        other.read_slice(&mut got, GuestAddress(0)).unwrap();
        let host = ram.get_host_address(GuestAddress(1 << 20)).unwrap() as usize;
        assert_eq!(sharing_of(host), (4, 0), "two pages, each half this mapping's: shared");

        ram.write_obj(7u8, GuestAddress(1 << 20)).unwrap();
        assert_eq!(sharing_of(host), (6, 4), "a written page becomes the guest's own");
        let mut first = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut first, 4096).unwrap();
        assert_eq!(first[0], bytes[4096], "the file is untouched");
        assert_eq!(other.read_obj::<u8>(GuestAddress(0)).unwrap(), bytes[4096]);
    }

    #[test]
    fn file_mappings_that_do_not_fit_are_refused() {
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(&[1u8; 8192]).unwrap();
        let ram =
            create_guest_memory(&[(GuestAddress(0), 2 << 20), (GuestAddress(2 << 20), 2 << 20)])
                .unwrap();
        let map = |addr: u64, len: usize, offset: u64| {
            map_file_private(&ram, GuestAddress(addr), len, &file, offset)
        };
        assert!(map(100, 4096, 0).is_err(), "unaligned guest address");
        assert!(map(0, 4096, 100).is_err(), "unaligned offset");
        assert!(map(0, 100, 0).is_err(), "partial page");
        assert!(map(0, 3 * 4096, 0).is_err(), "beyond the end of the file");
        assert!(map((2 << 20) - 4096, 8192, 0).is_err(), "across two regions");
        assert!(map(8 << 20, 4096, 0).is_err(), "outside guest memory");
        assert!(map(0, 8192, 0).is_ok());
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
