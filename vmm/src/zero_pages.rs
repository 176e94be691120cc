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
//! which is the one doing this. Only anonymous mappings with small pages are scanned (the
//! VMM's small boot pages): in a private mapping of a file (the kernel's, the initramfs's) a
//! dropped page would read the file's bytes again, and dropping 4 KiB of a 2 MiB huge page
//! only splits it, freeing memory later under pressure if at all.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{maps_range, GuestMemoryMmap};
use crate::vcpu::{PauseGate, Paused};

/// The host's page size, and the unit guest memory is dropped in.
const PAGE: usize = 4096;
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
    /// The guest addresses below this have small pages.
    small_below: u64,
    gate: Arc<PauseGate>,
    /// The vCPU threads to pause, unjoined while the event loop runs.
    vcpus: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ZeroPageReclaimer {
    /// A reclaimer of `mem`'s zero pages below guest address `small_below`, pausing `vcpus`
    /// at `gate` while it works.
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        small_below: u64,
        gate: Arc<PauseGate>,
        vcpus: Arc<Mutex<Vec<JoinHandle<()>>>>,
    ) -> io::Result<Self> {
        let trigger = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(ZeroPageReclaimer { trigger, reclaimed: Arc::default(), mem, small_below, gate, vcpus })
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

/// Drop the resident pages of `mem` below guest address `below` that lie in anonymous
/// mappings and hold only zeros; returns how many bytes. `_paused` proves that no vCPU runs;
/// the caller is the only other writer of guest memory.
pub(crate) fn reclaim_zero_pages(
    mem: &GuestMemoryMmap,
    below: u64,
    _paused: &Paused<'_>,
) -> io::Result<u64> {
    let anonymous = anonymous_mappings(&std::fs::read_to_string("/proc/self/maps")?);
    let mut freed = 0;
    for region in mem.iter() {
        let start = region.start_addr().0;
        if start >= below {
            continue;
        }
        let len = usize::try_from((below - start).min(region.len())).unwrap_or(usize::MAX);
        let host = mem
            .get_host_address(GuestAddress(start))
            .map_err(|e| io::Error::other(e.to_string()))? as usize;
        let small = host..host + len;
        for mapping in &anonymous {
            let range = mapping.start.max(small.start)..mapping.end.min(small.end);
            if range.start < range.end {
                freed += drop_zero_pages(range)?;
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

/// Drop the resident pages of `range` (page-aligned, within one anonymous mapping of guest
/// memory) that hold only zeros; returns how many bytes.
fn drop_zero_pages(range: Range<usize>) -> io::Result<u64> {
    let pages = range.len() / PAGE;
    let mut resident = vec![0u8; pages];
    // SAFETY: mincore reads the page tables of `range`, which is mapped (an anonymous mapping
    // found in /proc/self/maps, guest memory that stays mapped while `mem` lives), and writes
    // one byte per page into `resident`, which has one per page.
    if unsafe {
        libc::mincore(range.start as *mut libc::c_void, range.len(), resident.as_mut_ptr())
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut freed = 0;
    let mut run: Option<usize> = None;
    for (index, flags) in resident.iter().enumerate() {
        let page = range.start + index * PAGE;
        if flags & 1 != 0 && holds_only_zeros(page) {
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

/// Whether the resident page of guest memory at `page` holds only zeros.
fn holds_only_zeros(page: usize) -> bool {
    // SAFETY: `page` is a resident, page-aligned page of an anonymous mapping of guest memory,
    // readable and aligned for u64s; nothing writes it while this reads (the vCPUs are paused
    // and device emulation runs on this thread).
    let words = unsafe { std::slice::from_raw_parts(page as *const u64, PAGE / 8) };
    words.iter().all(|&word| word == 0)
}

/// Give `range` (anonymous guest memory holding only zeros) back to the host.
fn discard(range: Range<usize>) -> io::Result<u64> {
    // SAFETY: `range` lies in an anonymous private mapping of guest memory; after
    // MADV_DONTNEED it reads zeros, which it held, so nothing that reads it sees a change.
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
    use crate::memory::{create_guest_memory_with_small_pages_below, map_file_private};
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

    fn reclaim(mem: &GuestMemoryMmap, below: u64) -> u64 {
        let gate = PauseGate::default();
        let paused = gate.pause(&[], PAUSE_TIMEOUT).expect("no vCPU to wait for");
        reclaim_zero_pages(mem, below, &paused).unwrap()
    }

    #[test]
    fn resident_pages_of_zeros_go_and_the_others_stay() {
        let mem =
            create_guest_memory_with_small_pages_below(&[(GuestAddress(0), 8 << 20)], 4 << 20)
                .unwrap();
        mem.write_obj(0u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(7u64, GuestAddress(0x2000)).unwrap();
        mem.write_slice(&[0; 2 * PAGE], GuestAddress(0x3000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x5fff)).unwrap();
        mem.write_obj(0u64, GuestAddress(5 << 20)).unwrap();
        assert!(resident(&mem, 0x1000) && resident(&mem, 0x3000));

        assert_eq!(reclaim(&mem, 4 << 20), 3 * PAGE as u64, "0x1000, 0x3000 and 0x4000");
        for gone in [0x1000, 0x3000, 0x4000] {
            assert!(!resident(&mem, gone), "{gone:#x} held zeros");
            assert_eq!(mem.read_obj::<u64>(GuestAddress(gone)).unwrap(), 0);
        }
        assert!(resident(&mem, 0x2000) && resident(&mem, 0x5000), "not zeros: kept");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 7);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5fff)).unwrap(), 1);
        assert!(resident(&mem, 5 << 20), "above the small pages: not scanned");
        assert!(!resident(&mem, 0x8000), "a page never touched is not made resident");
    }

    #[test]
    fn a_guests_copy_of_a_file_page_is_kept_even_when_zero() {
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(&[0xaa; 2 * PAGE]).unwrap();
        let mem =
            create_guest_memory_with_small_pages_below(&[(GuestAddress(0), 4 << 20)], 4 << 20)
                .unwrap();
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
