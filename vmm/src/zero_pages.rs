//! Giving the host back the guest pages that hold only zeros.
//!
//! A booting Linux writes zeros over much memory the host had never handed it (its bss, the
//! tables it clears, the free parts of what it allocates): each such page costs the host a
//! page of its own, although it reads exactly as a page the guest never touched (about 4 MiB
//! of an idle container's guest, measured in the nested test host). Asked once the guest has
//! booted ([`ZeroPageReclaim::request`]), the VMM pauses the vCPUs, drops the resident guest
//! pages that hold only zeros (`MADV_DONTNEED`) and lets the vCPUs go on: the guest reads zeros
//! there as before, and the host gives it a page again only where it writes.
//!
//! The vCPUs must wait meanwhile: a page the guest writes between the check and the drop
//! would lose the write. Device emulation writes guest memory only on the event loop's thread,
//! which is the one doing this. Only anonymous mappings are scanned: in a private mapping of a
//! file (the kernel's, the initramfs's) a dropped page would read the file's bytes again.
//!
//! Above the small boot pages guest memory is backed by 2 MiB huge pages, where dropping 4 KiB
//! only splits the huge page's mapping: Linux frees its parts later under memory pressure, if
//! at all. A huge page at least a quarter zeros (the guest kernel's early allocations at the
//! top of its memory leave one) is rebuilt from small pages instead: its other pages copied
//! aside, the whole 2 MiB dropped and advised against huge pages, the copies written back.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{maps_range, GuestMemoryMmap, HUGE_PAGE};
use crate::vcpu::{PauseGate, Paused};

/// The host's page size, and the unit guest memory is dropped in.
pub(crate) const PAGE: usize = 4096;
/// The zero pages that make a huge page worth rebuilding from small pages: a quarter of it.
const SPARSE_HUGE_PAGE_ZEROS: usize = HUGE_PAGE / PAGE / 4;
/// How long the vCPUs may take to stop before the reclaim is given up.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The host's side of a VM's zero-page reclaim: asks for one and tells what it gave back.
pub struct ZeroPageReclaim {
    trigger: EventFd,
    reclaimed: Arc<AtomicU64>,
}

impl ZeroPageReclaim {
    /// Ask the VMM to give back the guest's zero pages now (it does so on its event loop, a
    /// few milliseconds of pause for the guest).
    pub fn request(&self) -> io::Result<()> {
        self.trigger.write(1)
    }

    /// How many bytes of guest memory the reclaims done so far gave back.
    pub fn reclaimed_bytes(&self) -> u64 {
        self.reclaimed.load(Ordering::Relaxed)
    }
}

/// The VMM's side: an event loop subscriber that reclaims when asked.
pub(crate) struct ZeroPageReclaimer {
    trigger: EventFd,
    reclaimed: Arc<AtomicU64>,
    mem: GuestMemoryMmap,
    /// The guest addresses below this have small pages, those above huge pages.
    small_below: u64,
    gate: Arc<PauseGate>,
    /// The vCPU threads to pause, unjoined while the event loop runs.
    vcpus: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ZeroPageReclaimer {
    /// A reclaimer of `mem`'s zero pages, small pages below guest address `small_below`,
    /// asked through `trigger` (a non-blocking eventfd), pausing `vcpus` at `gate` while it
    /// works.
    pub(crate) fn new(
        trigger: EventFd,
        mem: GuestMemoryMmap,
        small_below: u64,
        gate: Arc<PauseGate>,
        vcpus: Arc<Mutex<Vec<JoinHandle<()>>>>,
    ) -> Self {
        ZeroPageReclaimer { trigger, reclaimed: Arc::default(), mem, small_below, gate, vcpus }
    }

    /// The handle the host asks through.
    pub(crate) fn handle(&self) -> io::Result<ZeroPageReclaim> {
        Ok(ZeroPageReclaim {
            trigger: self.trigger.try_clone()?,
            reclaimed: self.reclaimed.clone(),
        })
    }

    fn reclaim(&self) {
        let start = Instant::now();
        let vcpus = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        let Some(paused) = self.gate.pause(&vcpus, PAUSE_TIMEOUT) else {
            log::warn!("zero-page reclaim skipped: the vCPUs did not pause");
            return;
        };
        let result = reclaim_zero_pages(&self.mem, self.small_below, &paused);
        drop(paused);
        match result {
            Ok(bytes) => {
                self.reclaimed.fetch_add(bytes, Ordering::Relaxed);
                log::debug!("gave back {} KiB of zero pages in {:?}", bytes >> 10, start.elapsed());
            }
            Err(e) => log::warn!("zero-page reclaim failed: {e}"),
        }
    }
}

impl MutEventSubscriber for ZeroPageReclaimer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.trigger, EventSet::IN)) {
            log::error!("cannot watch the zero-page reclaim event: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Requests that came together make one reclaim.
        let _ = self.trigger.read();
        self.reclaim();
    }
}

/// Give back the resident pages of `mem` that lie in anonymous mappings and hold only zeros:
/// below guest address `small_below` each such page, above it the huge pages that are sparse
/// enough; returns how many bytes. `_paused` proves that no vCPU runs; the caller is the only
/// other writer of guest memory.
pub(crate) fn reclaim_zero_pages(
    mem: &GuestMemoryMmap,
    small_below: u64,
    _paused: &Paused<'_>,
) -> io::Result<u64> {
    let anonymous = anonymous_mappings(&std::fs::read_to_string("/proc/self/maps")?);
    let mut freed = 0;
    for region in mem.iter() {
        let start = region.start_addr().0;
        let host = mem
            .get_host_address(GuestAddress(start))
            .map_err(|e| io::Error::other(e.to_string()))? as usize;
        let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
        let small = usize::try_from(small_below.saturating_sub(start)).unwrap_or(usize::MAX);
        let split = host + small.min(len);
        for mapping in &anonymous {
            let range = mapping.start.max(host)..mapping.end.min(host + len);
            if range.start >= range.end {
                continue;
            }
            if range.start < split {
                let small = range.start..range.end.min(split);
                let resident = resident_pages(&small)?;
                freed += drop_zero_pages(small, &resident)?;
            }
            if range.end > split {
                freed += rebuild_sparse_huge_pages(range.start.max(split)..range.end)?;
            }
        }
    }
    Ok(freed)
}

/// The address ranges of this process's anonymous mappings, from `/proc/self/maps`.
fn anonymous_mappings(maps: &str) -> Vec<Range<usize>> {
    maps.lines()
        .filter(|line| {
            let mut fields = line.split_whitespace().skip(4);
            fields.next() == Some("0") && fields.next().is_none()
        })
        .filter_map(maps_range)
        .collect()
}

/// Which pages of `range` (page-aligned, within one mapping) are resident.
pub(crate) fn resident_pages(range: &Range<usize>) -> io::Result<Vec<bool>> {
    let mut flags = vec![0u8; range.len() / PAGE];
    // SAFETY: mincore reads the page tables of `range`, which is mapped (an anonymous mapping
    // found in /proc/self/maps, guest memory that stays mapped while `mem` lives), and writes
    // one byte per page into `flags`, which has one per page.
    if unsafe { libc::mincore(range.start as *mut libc::c_void, range.len(), flags.as_mut_ptr()) }
        != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(flags.iter().map(|f| f & 1 != 0).collect())
}

/// Drop the pages of `range` (page-aligned, within one anonymous mapping of guest memory with
/// small pages) that are `resident` (one flag per page) and hold only zeros; returns how many
/// bytes.
fn drop_zero_pages(range: Range<usize>, resident: &[bool]) -> io::Result<u64> {
    let mut freed = 0;
    let mut run: Option<usize> = None;
    for (index, &resident) in resident.iter().enumerate() {
        let page = range.start + index * PAGE;
        if resident && holds_only_zeros(page) {
            run.get_or_insert(page);
            continue;
        }
        if let Some(start) = run.take() {
            freed += discard(start..page)?;
        }
    }
    if let Some(start) = run {
        freed += discard(start..range.end)?;
    }
    Ok(freed)
}

/// Rebuild from small pages the huge pages of `range` (within one anonymous mapping of guest
/// memory with huge pages) that are at least [`SPARSE_HUGE_PAGE_ZEROS`] zeros, and drop the
/// zero pages of what is not a whole resident huge page; returns how many bytes that gave
/// back.
fn rebuild_sparse_huge_pages(range: Range<usize>) -> io::Result<u64> {
    let mut freed = 0;
    let mut start = range.start;
    while start < range.end {
        let chunk = start..(start / HUGE_PAGE * HUGE_PAGE + HUGE_PAGE).min(range.end);
        start = chunk.end;
        let resident = resident_pages(&chunk)?;
        if chunk.len() < HUGE_PAGE || resident.contains(&false) {
            // Not a whole huge page of the mapping, or not all of it resident: small pages
            // (a huge page is resident whole). Some may be in swap: only the resident ones
            // may go.
            freed += drop_zero_pages(chunk, &resident)?;
            continue;
        }
        let (zeros, kept): (Vec<usize>, Vec<usize>) =
            (chunk.start..chunk.end).step_by(PAGE).partition(|&page| holds_only_zeros(page));
        if zeros.len() < SPARSE_HUGE_PAGE_ZEROS {
            continue;
        }
        let kept: Vec<(usize, Vec<u8>)> = kept
            .into_iter()
            .map(|page| {
                // SAFETY: a resident page of guest memory, readable; nothing writes it now
                // (the vCPUs are paused and device emulation runs on this thread).
                (page, unsafe { std::slice::from_raw_parts(page as *const u8, PAGE) }.to_vec())
            })
            .collect();
        // SAFETY: advice on guest memory this VMM mapped; it only changes how it is backed.
        unsafe {
            libc::madvise(chunk.start as *mut libc::c_void, chunk.len(), libc::MADV_NOHUGEPAGE)
        };
        discard(chunk.clone())?;
        for (page, bytes) in &kept {
            // SAFETY: the page lies in guest memory, mapped and writable; it reads zeros since
            // the discard, and gets back exactly the bytes it held before.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), *page as *mut u8, PAGE) };
        }
        freed += (zeros.len() * PAGE) as u64;
    }
    Ok(freed)
}

/// Whether the resident page of guest memory at `page` holds only zeros. The callers (the
/// reclaim here, a snapshot's memory file) hold the vCPUs paused and run on the thread that
/// emulates the devices.
pub(crate) fn holds_only_zeros(page: usize) -> bool {
    // SAFETY: `page` is a resident, page-aligned page of guest memory, readable and aligned
    // for u64s; nothing writes it while this reads (the vCPUs are paused and device emulation
    // runs on this thread).
    let words = unsafe { std::slice::from_raw_parts(page as *const u64, PAGE / 8) };
    words.iter().all(|&word| word == 0)
}

/// Give `range` (anonymous guest memory) back to the host: it reads zeros afterwards.
fn discard(range: Range<usize>) -> io::Result<u64> {
    // SAFETY: `range` lies in an anonymous private mapping of guest memory; after
    // MADV_DONTNEED it reads zeros, which the callers have checked it held, or write back
    // what it held.
    if unsafe { libc::madvise(range.start as *mut libc::c_void, range.len(), libc::MADV_DONTNEED) }
        != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(range.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory_with_small_pages_below, map_file_private, GuestRam};
    use std::io::Write;
    use vm_memory::Bytes;

    /// Whether the page at guest address `addr` is resident on the host.
    fn resident(mem: &GuestMemoryMmap, addr: u64) -> bool {
        let host = mem.get_host_address(GuestAddress(addr)).unwrap();
        let mut flags = 0u8;
        // SAFETY: one page of guest memory, mapped; one byte of result.
        assert_eq!(unsafe { libc::mincore(host.cast(), PAGE, &mut flags) }, 0);
        flags & 1 != 0
    }

    /// `size` bytes of guest memory from address 0, small pages below `small_below`.
    fn guest_memory(size: usize, small_below: usize) -> GuestRam {
        create_guest_memory_with_small_pages_below(&[(GuestAddress(0), size)], small_below).unwrap()
    }

    fn reclaim(mem: &GuestMemoryMmap, below: u64) -> u64 {
        let gate = PauseGate::default();
        let paused = gate.pause(&[], PAUSE_TIMEOUT).expect("no vCPU to wait for");
        reclaim_zero_pages(mem, below, &paused).unwrap()
    }

    #[test]
    fn resident_pages_of_zeros_go_and_the_others_stay() {
        let mem = guest_memory(8 << 20, 4 << 20);
        mem.write_obj(0u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(7u64, GuestAddress(0x2000)).unwrap();
        mem.write_slice(&[0; 2 * PAGE], GuestAddress(0x3000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x5fff)).unwrap();
        assert!(resident(&mem, 0x1000) && resident(&mem, 0x3000));

        assert_eq!(reclaim(&mem, 4 << 20), 3 * PAGE as u64, "0x1000, 0x3000 and 0x4000");
        for gone in [0x1000, 0x3000, 0x4000] {
            assert!(!resident(&mem, gone), "{gone:#x} held zeros");
            assert_eq!(mem.read_obj::<u64>(GuestAddress(gone)).unwrap(), 0);
        }
        assert!(resident(&mem, 0x2000) && resident(&mem, 0x5000), "not zeros: kept");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 7);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5fff)).unwrap(), 1);
        assert!(!resident(&mem, 0x8000), "a page never touched is not made resident");
    }

    /// Write every page of the huge page at `chunk`: `values` pages with their index + 1, the
    /// rest zeros.
    fn fill_huge_page(mem: &GuestMemoryMmap, chunk: u64, values: u64) {
        for index in 0..(HUGE_PAGE / PAGE) as u64 {
            let value = if index < values { index + 1 } else { 0 };
            mem.write_obj(value, GuestAddress(chunk + index * PAGE as u64)).unwrap();
        }
    }

    #[test]
    fn huge_pages_of_a_quarter_zeros_or_more_are_rebuilt_from_their_other_pages() {
        let huge = HUGE_PAGE as u64;
        let mem = guest_memory(8 << 20, huge as usize);
        let per_huge_page = (HUGE_PAGE / PAGE) as u64;
        let zeros = SPARSE_HUGE_PAGE_ZEROS as u64;
        fill_huge_page(&mem, huge, per_huge_page - zeros);
        fill_huge_page(&mem, 2 * huge, per_huge_page - zeros + 1);

        assert_eq!(reclaim(&mem, huge), zeros * PAGE as u64, "the first one, sparse enough");
        for index in 0..per_huge_page {
            let (sparse, dense) = (huge + index * PAGE as u64, 2 * huge + index * PAGE as u64);
            let value = if index < per_huge_page - zeros { index + 1 } else { 0 };
            assert_eq!(resident(&mem, sparse), value != 0, "page {index} of the sparse one");
            assert_eq!(mem.read_obj::<u64>(GuestAddress(sparse)).unwrap(), value);
            assert!(resident(&mem, dense), "page {index} of the one not sparse enough");
            let value = if index < per_huge_page - zeros + 1 { index + 1 } else { 0 };
            assert_eq!(mem.read_obj::<u64>(GuestAddress(dense)).unwrap(), value);
        }
        assert!(!resident(&mem, 3 * huge), "untouched");
    }

    #[test]
    fn in_a_range_only_partly_resident_only_the_resident_zero_pages_go() {
        let huge = HUGE_PAGE as u64;
        let mem = guest_memory(4 << 20, huge as usize);
        let host = mem.get_host_address(GuestAddress(huge)).unwrap();
        // SAFETY: advice on guest memory: small pages, so that a write touches one page only.
        assert_eq!(unsafe { libc::madvise(host.cast(), HUGE_PAGE, libc::MADV_NOHUGEPAGE) }, 0);
        for index in 0..20u64 {
            let value = if index < 5 { index + 1 } else { 0 };
            mem.write_obj(value, GuestAddress(huge + index * PAGE as u64)).unwrap();
        }

        assert_eq!(reclaim(&mem, huge), 15 * PAGE as u64, "fewer than a quarter, but small pages");
        for index in 0..20u64 {
            assert_eq!(resident(&mem, huge + index * PAGE as u64), index < 5, "page {index}");
        }
        assert_eq!(mem.read_obj::<u64>(GuestAddress(huge + 4 * PAGE as u64)).unwrap(), 5);
    }

    #[test]
    fn a_guests_copy_of_a_file_page_is_kept_even_when_zero() {
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(&[0xaa; 2 * PAGE]).unwrap();
        let mem = guest_memory(4 << 20, 4 << 20);
        map_file_private(&mem, GuestAddress(1 << 20), 2 * PAGE, &file, 0).unwrap();
        mem.write_slice(&[0; PAGE], GuestAddress(1 << 20)).unwrap();

        assert_eq!(reclaim(&mem, 4 << 20), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(1 << 20)).unwrap(), 0, "still the guest's");
        assert_eq!(mem.read_obj::<u8>(GuestAddress((1 << 20) + PAGE as u64)).unwrap(), 0xaa);
    }

    #[test]
    fn only_nameless_mappings_without_a_file_are_anonymous() {
        let maps = "\
            7f0000000000-7f0000200000 rw-p 00000000 00:00 0 \n\
            7f0000200000-7f0000400000 rw-p 00200000 00:1a 13      /tmp/kernel\n\
            7f0000400000-7f0000401000 rw-p 00000000 00:00 0       [stack]\n\
            7f0000401000-7f0000402000 rw-p 00000000 00:00 0";
        assert_eq!(
            anonymous_mappings(maps),
            vec![0x7f00_0000_0000..0x7f00_0020_0000, 0x7f00_0040_1000..0x7f00_0040_2000]
        );
    }
}
