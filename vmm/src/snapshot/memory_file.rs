//! Guest memory to and from a snapshot's memory file: regions one after the other, each page
//! at its offset, and only the pages that are resident and not all zeros written, so that the
//! file is sparse where the guest never wrote. A restored VM maps the file privately over its
//! guest memory: it reads the file's pages from the page cache every VM restored from it
//! shares, and writes into copies of its own.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::SnapshotError;
use crate::memory::{map_file_private, GuestMemoryMmap};
use crate::vcpu::Paused;
use crate::zero_pages::{holds_only_zeros, resident_pages, PAGE};

/// Write the guest memory of `mem` to a new file at `path`; `_paused` proves that no vCPU
/// writes it meanwhile (devices run on the caller's thread).
pub fn write_memory_file(
    mem: &GuestMemoryMmap,
    path: &Path,
    _paused: &Paused<'_>,
) -> Result<(), SnapshotError> {
    let file_err = |source| SnapshotError::File { path: path.to_path_buf(), source };
    let file = File::create(path).map_err(file_err)?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(file_err)?;
    let mut offset = 0;
    for region in mem.iter() {
        let len = usize::try_from(region.len())
            .map_err(|_| file_err(io::Error::other("region too large")))?;
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| file_err(io::Error::other(e.to_string())))? as usize;
        let resident = resident_pages(&(host..host + len)).map_err(file_err)?;
        let mut run: Option<usize> = None;
        for (index, &resident) in resident.iter().chain([&false]).enumerate() {
            let keep = resident && !holds_only_zeros(host + index * PAGE);
            match (keep, run) {
                (true, None) => run = Some(index),
                (false, Some(start)) => {
                    // SAFETY: pages `start..index` of the region, all resident and mapped.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(
                            (host + start * PAGE) as *const u8,
                            (index - start) * PAGE,
                        )
                    };
                    file.write_all_at(bytes, offset + (start * PAGE) as u64).map_err(file_err)?;
                    run = None;
                }
                _ => {}
            }
        }
        offset += region.len();
    }
    file.sync_data().map_err(file_err)
}

/// The (guest address, bytes) of each region of `mem`, in order: the layout of a memory file.
pub fn region_layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Map the memory file `file` of a snapshot with `regions` privately over `mem`, whose
/// regions must be the same.
pub fn map_memory_file(
    mem: &GuestMemoryMmap,
    regions: &[(u64, u64)],
    file: &File,
) -> Result<(), SnapshotError> {
    let ours = region_layout(mem);
    if ours != regions {
        return Err(SnapshotError::Mismatch(format!(
            "guest memory regions {ours:x?}, saved {regions:x?}"
        )));
    }
    let mut offset = 0;
    for &(addr, len) in regions {
        let len_usize =
            usize::try_from(len).map_err(|_| SnapshotError::Mismatch("region too large".into()))?;
        map_file_private(mem, GuestAddress(addr), len_usize, file, offset)
            .map_err(|source| SnapshotError::File { path: "guest memory".into(), source })?;
        offset += len;
    }
    Ok(())
}
