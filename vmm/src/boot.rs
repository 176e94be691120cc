//! Direct Linux boot: load an ELF `vmlinux` or a `bzImage` and an initramfs into guest memory,
//! write the command line, and fill the zero page (boot_params) with the setup header, the
//! initramfs location and the e820 memory map. An ELF kernel's pages and the initramfs's may be
//! mapped from their files rather than copied, to be shared between VMs.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::elf;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::arch::layout::{
    e820_ram_ranges, CMDLINE_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START,
};
use crate::memory::{map_file_private, GuestMemoryMmap};

/// "HdrS": the boot protocol signature.
const HDR_MAGIC: u32 = 0x5372_6448;
/// The boot sector signature.
const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader id: Linux accepts any loader that sets it.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Alignment Linux requires of a relocatable kernel.
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const E820_RAM: u32 = 1;
const PAGE_SIZE: u64 = 4096;

/// Why the guest could not be prepared for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is neither format husk boots.
    #[error("{path} is not a kernel: not an ELF vmlinux ({elf}) and not a bzImage ({bzimage})")]
    NotAKernel { path: PathBuf, elf: loader::Error, bzimage: loader::Error },
    /// The kernel is of a known format but cannot be loaded (too large, bad addresses...).
    #[error("cannot load kernel {path}")]
    KernelLoad {
        path: PathBuf,
        #[source]
        source: loader::Error,
    },
    /// The initramfs file cannot be opened or read.
    #[error("cannot read initramfs {path}")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit in guest memory above the kernel.
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    /// Copying the initramfs into guest memory failed.
    #[error("cannot copy initramfs {path} into guest memory")]
    InitrdLoad {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The command line cannot be written.
    #[error("cannot write the kernel command line")]
    Cmdline(#[source] loader::Error),
    /// The zero page cannot be written.
    #[error("cannot write the zero page")]
    ZeroPage(#[source] vm_memory::GuestMemoryError),
}

/// Where a kernel landed in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// First guest address after the kernel image.
    pub end: u64,
    /// The setup header of a bzImage (none for an ELF vmlinux).
    pub setup_header: Option<setup_header>,
}

/// Where the initramfs landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    /// Guest address of its first byte.
    pub addr: GuestAddress,
    /// Its size in bytes.
    pub size: u64,
}

/// Load the kernel at `path`: an ELF vmlinux (entered at its ELF entry point, which is
/// `startup_64`) or else a bzImage (entered 0x200 bytes into its protected-mode code). With
/// `share`, an ELF kernel's file pages are then mapped rather than copied
/// ([`VmConfig::share_boot_files`](crate::config::VmConfig::share_boot_files)).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    share: bool,
) -> Result<LoadedKernel, BootError> {
    let open_err = |source| BootError::KernelOpen { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(open_err)?;
    if file.metadata().map_err(open_err)?.is_dir() {
        return Err(open_err(std::io::Error::from_raw_os_error(libc::EISDIR)));
    }
    let himem = Some(GuestAddress(HIMEM_START));
    let elf_err = match Elf::load(mem, None, &mut file, himem) {
        Ok(result) => {
            if share {
                let shared = share_kernel_pages(mem, &file);
                log::debug!("kernel {}: {} KiB mapped from the file", path.display(), shared >> 10);
            }
            return Ok(LoadedKernel {
                entry: result.kernel_load,
                end: result.kernel_end,
                setup_header: None,
            });
        }
        Err(e @ loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => e,
        Err(source) => return Err(BootError::KernelLoad { path: path.to_owned(), source }),
    };
    match BzImage::load(mem, None, &mut file, himem) {
        Ok(result) => Ok(LoadedKernel {
            entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
            end: result.kernel_end,
            setup_header: result.setup_header,
        }),
        Err(bz_err @ loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage)) => {
            Err(BootError::NotAKernel { path: path.to_owned(), elf: elf_err, bzimage: bz_err })
        }
        Err(source) => Err(BootError::KernelLoad { path: path.to_owned(), source }),
    }
}

/// Replace the guest pages that hold a loaded ELF kernel's file contents with private mappings
/// of the kernel file ([`map_file_private`]): the same bytes, but page cache pages that every VM
/// booting this kernel shares until its guest writes one. Returns the bytes shared; a segment
/// that cannot be mapped keeps its copy.
fn share_kernel_pages(mem: &GuestMemoryMmap, file: &File) -> u64 {
    let mut ehdr = elf::Elf64_Ehdr::default();
    if file.read_exact_at(ehdr.as_mut_slice(), 0).is_err()
        || usize::from(ehdr.e_phentsize) != std::mem::size_of::<elf::Elf64_Phdr>()
    {
        return 0;
    }
    let mut shared = 0;
    for i in 0..u64::from(ehdr.e_phnum) {
        let mut phdr = elf::Elf64_Phdr::default();
        let at = ehdr.e_phoff.saturating_add(i * std::mem::size_of::<elf::Elf64_Phdr>() as u64);
        if file.read_exact_at(phdr.as_mut_slice(), at).is_err() {
            return shared;
        }
        if phdr.p_type != elf::PT_LOAD {
            continue;
        }
        // The whole pages of the segment's file bytes, where file and guest pages line up.
        let Some(start) = phdr.p_paddr.checked_next_multiple_of(PAGE_SIZE) else { continue };
        let Some(end) = phdr.p_paddr.checked_add(phdr.p_filesz).map(|e| e & !(PAGE_SIZE - 1))
        else {
            continue;
        };
        let offset = phdr.p_offset.wrapping_add(start - phdr.p_paddr);
        if end <= start || !offset.is_multiple_of(PAGE_SIZE) {
            continue;
        }
        let len = end - start;
        match map_file_private(mem, GuestAddress(start), len as usize, file, offset) {
            Ok(()) => shared += len,
            Err(e) => log::debug!("kernel segment at {start:#x}: keeping the copy: {e}"),
        }
    }
    shared
}

/// Put the initramfs at `path` at the highest page-aligned spot of low memory (below the MMIO
/// gap and `mem_size`) that leaves the kernel, which ends at `kernel_end`, untouched. Copied;
/// with `share`, its whole pages are mapped from the file instead (as the kernel's are) and
/// only the partial last page is copied.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_end: u64,
    path: &Path,
    share: bool,
) -> Result<LoadedInitrd, BootError> {
    let read_err = |source| BootError::InitrdRead { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    let size = meta.len();
    let top = mem_size.min(MMIO_GAP_START);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end.max(HIMEM_START))
        .ok_or_else(|| BootError::InitrdTooLarge { path: path.to_owned(), size })?;
    let mut mapped = 0;
    let whole_pages = size & !(PAGE_SIZE - 1);
    if share && whole_pages > 0 {
        match map_file_private(mem, GuestAddress(addr), whole_pages as usize, &file, 0) {
            Ok(()) => mapped = whole_pages,
            Err(e) => log::debug!("initramfs {}: keeping a copy: {e}", path.display()),
        }
    }
    file.seek(SeekFrom::Start(mapped)).map_err(read_err)?;
    mem.read_exact_volatile_from(GuestAddress(addr + mapped), &mut file, (size - mapped) as usize)
        .map_err(|source| BootError::InitrdLoad { path: path.to_owned(), source })?;
    Ok(LoadedInitrd { addr: GuestAddress(addr), size })
}

/// Write `cmdline` at its fixed address; returns its length without the terminating NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<usize, BootError> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::Cmdline)?;
    let len =
        cmdline.as_cstring().map_err(|_| BootError::Cmdline(loader::Error::InvalidCommandLine))?;
    Ok(len.as_bytes().len())
}

/// Fill the zero page for a guest of `mem_size` bytes.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(header) => params.hdr = header,
        None => params.hdr.kernel_alignment = KERNEL_ALIGNMENT,
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let ranges = e820_ram_ranges(mem_size);
    for (slot, (addr, size)) in params.e820_table.iter_mut().zip(&ranges) {
        *slot = boot_e820_entry { addr: *addr, size: *size, r#type: E820_RAM };
    }
    params.e820_entries = ranges.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START)).map_err(BootError::ZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::CMDLINE_MAX_SIZE;
    use std::io::Write;
    use vm_memory::GuestMemoryBackend;

    fn mem(size: usize) -> crate::memory::GuestRam {
        crate::memory::create_guest_memory(&[(GuestAddress(0), size)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("husk-boot-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let path = temp_file("garbage", &[0x42; 8192]);
        let err = load_kernel(&mem(64 << 20), &path, true).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        assert!(err.to_string().contains("is not a kernel"));
    }

    #[test]
    fn missing_kernel_and_directory_are_open_errors() {
        let err = load_kernel(&mem(1 << 20), Path::new("/nonexistent/vmlinux"), false).unwrap_err();
        assert!(matches!(err, BootError::KernelOpen { .. }), "{err}");
        let err = load_kernel(&mem(1 << 20), Path::new("/"), false).unwrap_err();
        assert!(matches!(err, BootError::KernelOpen { .. }), "{err}");
    }

    #[test]
    fn a_shared_elf_kernel_is_mapped_from_its_file_in_whole_pages() {
        // Two and a half pages of code: two whole pages are mapped, the half page is copied.
        let code: Vec<u8> = (0..10240u32).map(|i| (i % 253) as u8).collect();
        let path = temp_file("shared.elf", &husk_tests::tiny_guest::elf_image(&code));
        let load = husk_tests::tiny_guest::LOAD_ADDR;
        for share in [false, true] {
            let m = mem(16 << 20);
            let kernel = load_kernel(&m, &path, share).unwrap();
            assert_eq!(kernel.entry, GuestAddress(load));
            let mut got = vec![0u8; code.len()];
            m.read_slice(&mut got, GuestAddress(load)).unwrap();
            assert!(got == code, "the guest sees the kernel's bytes (share: {share})");
            let name = path.to_str().unwrap();
            for (offset, mapped) in [(0, share), (4096, share), (8192, false)] {
                let host = m.get_host_address(GuestAddress(load + offset)).unwrap() as usize;
                let file = crate::memory::mapping_at(host).unwrap();
                assert_eq!(file == name, mapped, "page at +{offset:#x} (share: {share}): {file:?}");
            }
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let m = mem(16 << 20);
        let path = temp_file("initrd", &[7u8; 5000]);
        let initrd = load_initrd(&m, 16 << 20, 2 << 20, &path, false).unwrap();
        assert_eq!(initrd.size, 5000);
        assert_eq!(initrd.addr.0 % PAGE_SIZE, 0);
        assert!(initrd.addr.0 + 5000 <= 16 << 20);
        let byte: u8 = m.read_obj(GuestAddress(initrd.addr.0 + 4999)).unwrap();
        assert_eq!(byte, 7);
        let err = load_initrd(&m, 16 << 20, (16 << 20) - 4096, &path, false).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        let err = load_initrd(&m, 16 << 20, 0, Path::new("/nonexistent"), false).unwrap_err();
        assert!(matches!(err, BootError::InitrdRead { .. }), "{err}");
    }

    #[test]
    fn a_shared_initrd_is_mapped_from_its_file_in_whole_pages() {
        // Two and a half pages: two whole pages are mapped, the half page is copied.
        let bytes: Vec<u8> = (0..10240u32).map(|i| (i % 251) as u8).collect();
        let path = temp_file("shared-initrd", &bytes);
        let name = path.to_str().unwrap();
        for share in [false, true] {
            let m = mem(16 << 20);
            let initrd = load_initrd(&m, 16 << 20, 2 << 20, &path, share).unwrap();
            let mut got = vec![0u8; bytes.len()];
            m.read_slice(&mut got, initrd.addr).unwrap();
            assert!(got == bytes, "the guest sees the initramfs's bytes (share: {share})");
            for (offset, mapped) in [(0, share), (4096, share), (8192, false)] {
                let host = m.get_host_address(GuestAddress(initrd.addr.0 + offset)).unwrap();
                let file = crate::memory::mapping_at(host as usize).unwrap();
                assert_eq!(file == name, mapped, "page at +{offset:#x} (share: {share}): {file:?}");
            }
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn zero_page_describes_cmdline_initrd_and_memory() {
        let m = mem(64 << 20);
        let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).unwrap();
        cmdline.insert_str("console=ttyS0 panic=1").unwrap();
        let len = write_cmdline(&m, &cmdline).unwrap();
        assert_eq!(len, "console=ttyS0 panic=1".len());
        let kernel =
            LoadedKernel { entry: GuestAddress(0x100_0000), end: 0x200_0000, setup_header: None };
        let initrd = LoadedInitrd { addr: GuestAddress(0x300_0000), size: 1234 };
        write_zero_page(&m, 64 << 20, &kernel, len, Some(initrd)).unwrap();
        let params: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.header }, HDR_MAGIC);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 1234);
        assert_eq!(params.e820_entries, 2);
        assert_eq!({ params.e820_table[1].addr }, HIMEM_START);
        assert_eq!({ params.e820_table[1].size }, (64 << 20) - HIMEM_START);
    }
}
