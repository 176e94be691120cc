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
use linux_loader::loader::elf::{Elf, Error as ElfError};
use linux_loader::loader::{self, bzimage::BzImage, KernelLoader};
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
/// `share`, an ELF kernel's whole file pages are mapped rather than copied
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
    let elf = if share {
        map_elf_kernel(mem, &file)
    } else {
        Elf::load(mem, None, &mut file, himem).map(|result| LoadedKernel {
            entry: result.kernel_load,
            end: result.kernel_end,
            setup_header: None,
        })
    };
    let elf_err = match elf {
        Ok(kernel) => return Ok(kernel),
        Err(e @ loader::Error::Elf(ElfError::InvalidElfMagicNumber)) => e,
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

/// Load an ELF vmlinux as linux-loader's `Elf` does (the same checks, each `PT_LOAD` segment's
/// file bytes at its physical address), but with the segments' whole pages mapped from the file
/// ([`place_file_bytes`]) rather than written: the guest memory under them is never touched,
/// and the pages are the page cache pages every VM booting this kernel shares until its guest
/// writes one.
fn map_elf_kernel(mem: &GuestMemoryMmap, file: &File) -> Result<LoadedKernel, loader::Error> {
    let mut ehdr = elf::Elf64_Ehdr::default();
    file.read_exact_at(ehdr.as_mut_slice(), 0).map_err(|_| ElfError::ReadElfHeader)?;
    if ehdr.e_ident[..4] != [elf::ELFMAG0, elf::ELFMAG1, elf::ELFMAG2, elf::ELFMAG3] {
        return Err(ElfError::InvalidElfMagicNumber.into());
    }
    if ehdr.e_ident[elf::EI_DATA] != elf::ELFDATA2LSB {
        return Err(ElfError::BigEndianElfOnLittle.into());
    }
    if usize::from(ehdr.e_phentsize) != std::mem::size_of::<elf::Elf64_Phdr>() {
        return Err(ElfError::InvalidProgramHeaderSize.into());
    }
    if ehdr.e_phoff < std::mem::size_of::<elf::Elf64_Ehdr>() as u64 {
        return Err(ElfError::InvalidProgramHeaderOffset.into());
    }
    if ehdr.e_entry < HIMEM_START {
        return Err(ElfError::InvalidEntryAddress.into());
    }
    let (mut end, mut mapped) = (0, 0);
    for i in 0..u64::from(ehdr.e_phnum) {
        let mut phdr = elf::Elf64_Phdr::default();
        let at = i
            .checked_mul(std::mem::size_of::<elf::Elf64_Phdr>() as u64)
            .and_then(|off| ehdr.e_phoff.checked_add(off))
            .ok_or(ElfError::ReadProgramHeader)?;
        file.read_exact_at(phdr.as_mut_slice(), at).map_err(|_| ElfError::ReadProgramHeader)?;
        if phdr.p_type != elf::PT_LOAD || phdr.p_filesz == 0 {
            continue;
        }
        mapped += place_file_bytes(mem, file, phdr.p_paddr, phdr.p_offset, phdr.p_filesz, true)
            .map_err(|_| ElfError::ReadKernelImage)?;
        let segment_end =
            phdr.p_paddr.checked_add(phdr.p_memsz).ok_or(loader::Error::MemoryOverflow)?;
        end = end.max(segment_end);
    }
    log::debug!("kernel: {} KiB mapped from its file", mapped >> 10);
    Ok(LoadedKernel { entry: GuestAddress(ehdr.e_entry), end, setup_header: None })
}

/// Put the `len` bytes of `file` from `offset` at guest address `addr`. With `share`, the whole
/// pages where guest and file pages line up are mapped from the file ([`map_file_private`])
/// and only the partial pages at either end are copied; otherwise, or where mapping fails,
/// everything is copied. Returns the bytes mapped.
fn place_file_bytes(
    mem: &GuestMemoryMmap,
    mut file: &File,
    addr: u64,
    offset: u64,
    len: u64,
    share: bool,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let overflow = || vm_memory::GuestMemoryError::GuestAddressOverflow;
    let end = addr.checked_add(len).ok_or_else(overflow)?;
    offset.checked_add(len).ok_or_else(overflow)?;
    // The whole guest pages of the range, and the file offset of the first.
    let first = addr.checked_next_multiple_of(PAGE_SIZE).ok_or_else(overflow)?.min(end);
    let last = (end & !(PAGE_SIZE - 1)).max(first);
    let first_offset = offset + (first - addr);
    let mut mapped = first..first;
    if share && last > first && first_offset.is_multiple_of(PAGE_SIZE) {
        let whole = (last - first) as usize;
        match map_file_private(mem, GuestAddress(first), whole, file, first_offset) {
            Ok(()) => mapped = first..last,
            Err(e) => log::debug!("guest pages at {first:#x}: copied, not mapped: {e}"),
        }
    }
    for (from, to) in [(addr, mapped.start), (mapped.end, end)] {
        if to > from {
            file.seek(SeekFrom::Start(offset + (from - addr)))
                .map_err(vm_memory::GuestMemoryError::IOError)?;
            mem.read_exact_volatile_from(GuestAddress(from), &mut file, (to - from) as usize)?;
        }
    }
    Ok(mapped.end - mapped.start)
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
    let file = File::open(path).map_err(read_err)?;
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
    let mapped = place_file_bytes(mem, &file, addr, 0, size, share)
        .map_err(|source| BootError::InitrdLoad { path: path.to_owned(), source })?;
    log::debug!("initramfs {}: {} KiB mapped from its file", path.display(), mapped >> 10);
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
    use vm_memory::GuestMemoryBackend;

    fn mem(size: usize) -> crate::memory::GuestRam {
        crate::memory::create_guest_memory(&[(GuestAddress(0), size)]).unwrap()
    }

    /// A file holding `bytes`, in a directory removed when the returned guard drops (also when
    /// the test fails).
    fn temp_file(name: &str, bytes: &[u8]) -> (husk_tests::tiny_guest::TempDir, PathBuf) {
        let dir = husk_tests::tiny_guest::TempDir::new("boot");
        let path = dir.write(name, bytes);
        (dir, path)
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let (_dir, path) = temp_file("garbage", &[0x42; 8192]);
        let err = load_kernel(&mem(64 << 20), &path, true).unwrap_err();
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
        let (_dir, path) = temp_file("shared.elf", &husk_tests::tiny_guest::elf_image(&code));
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
    }

    /// `elf_image(code)` with `value` written at byte `at` (a field of its headers).
    fn patched_elf(code: &[u8], at: usize, value: &[u8]) -> Vec<u8> {
        let mut elf = husk_tests::tiny_guest::elf_image(code);
        elf[at..at + value.len()].copy_from_slice(value);
        elf
    }

    #[test]
    fn shared_and_copied_loads_refuse_the_same_bad_kernels() {
        let code = [0x90u8; 8192];
        let load = husk_tests::tiny_guest::LOAD_ADDR;
        let bad = [
            ("big endian", patched_elf(&code, 5, &[2])),
            ("program header size", patched_elf(&code, 54, &55u16.to_le_bytes())),
            ("program headers in the ELF header", patched_elf(&code, 32, &8u64.to_le_bytes())),
            ("entry below 1 MiB", patched_elf(&code, 24, &0x1000u64.to_le_bytes())),
            (
                "segment past the end of the file",
                patched_elf(&code, 96, &(1u64 << 20).to_le_bytes()),
            ),
            ("segment outside guest memory", patched_elf(&code, 88, &(1u64 << 40).to_le_bytes())),
            ("segment wrapping around", patched_elf(&code, 88, &(u64::MAX - 4096).to_le_bytes())),
            ("memory size wrapping around", patched_elf(&code, 104, &u64::MAX.to_le_bytes())),
            ("truncated program headers", husk_tests::tiny_guest::elf_image(&code)[..100].to_vec()),
        ];
        for (what, elf) in bad {
            let (_dir, path) = temp_file("bad.elf", &elf);
            let errors = [false, true].map(|share| {
                match load_kernel(&mem(16 << 20), &path, share).unwrap_err() {
                    BootError::KernelLoad { source, .. } => format!("{source:?}"),
                    e => panic!("{what} (share: {share}): {e}"),
                }
            });
            assert_eq!(errors[0], errors[1], "{what}: the same error from both loaders");
        }
        // And the good one loads both ways at the same place.
        let (_dir, path) = temp_file("good.elf", &husk_tests::tiny_guest::elf_image(&code));
        for share in [false, true] {
            let kernel = load_kernel(&mem(16 << 20), &path, share).unwrap();
            assert_eq!((kernel.entry.0, kernel.end), (load, load + 8192), "share: {share}");
        }
    }

    #[test]
    fn a_segment_whose_pages_do_not_line_up_with_the_files_is_copied() {
        let code: Vec<u8> = (0..10000u32).map(|i| (i % 249) as u8).collect();
        let load = husk_tests::tiny_guest::LOAD_ADDR + 0x10;
        let (_dir, path) =
            temp_file("misaligned.elf", &patched_elf(&code, 88, &load.to_le_bytes()));
        let m = mem(16 << 20);
        load_kernel(&m, &path, true).unwrap();
        let mut got = vec![0u8; code.len()];
        m.read_slice(&mut got, GuestAddress(load)).unwrap();
        assert!(got == code, "the segment's bytes at its address");
        for offset in (0..code.len() as u64).step_by(4096) {
            let host = m.get_host_address(GuestAddress(load + offset)).unwrap() as usize;
            assert_eq!(crate::memory::mapping_at(host).unwrap(), "", "copied at +{offset:#x}");
        }
    }

    /// Minor page faults of this thread so far.
    fn minor_faults() -> i64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage fills the rusage it is given; zeroed is a valid rusage.
        let usage = unsafe {
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()), 0);
            usage.assume_init()
        };
        usage.ru_minflt
    }

    #[test]
    fn a_shared_kernel_leaves_the_guest_memory_under_it_untouched() {
        // 4 MiB of kernel: copied, its 1024 guest pages are written (one fault each, in small
        // boot pages); mapped, none of them is.
        let code: Vec<u8> = (0..4u32 << 20).map(|i| (i % 247) as u8).collect();
        let (_dir, path) = temp_file("big.elf", &husk_tests::tiny_guest::elf_image(&code));
        for share in [false, true] {
            let m = crate::memory::create_guest_memory_with_small_pages_below(
                &[(GuestAddress(0), 16 << 20)],
                crate::memory::SMALL_BOOT_PAGES,
            )
            .unwrap();
            let before = minor_faults();
            load_kernel(&m, &path, share).unwrap();
            let faults = minor_faults() - before;
            let expected = if share { 0..64 } else { 1024..1100 };
            assert!(expected.contains(&faults), "{faults} faults loading (share: {share})");
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let m = mem(16 << 20);
        let (_dir, path) = temp_file("initrd", &[7u8; 5000]);
        let initrd = load_initrd(&m, 16 << 20, 2 << 20, &path, false).unwrap();
        assert_eq!(initrd.size, 5000);
        assert_eq!(initrd.addr.0 % PAGE_SIZE, 0);
        assert!(initrd.addr.0 + 5000 <= 16 << 20);
        let byte: u8 = m.read_obj(GuestAddress(initrd.addr.0 + 4999)).unwrap();
        assert_eq!(byte, 7);
        let err = load_initrd(&m, 16 << 20, (16 << 20) - 4096, &path, false).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        let err = load_initrd(&m, 16 << 20, 0, Path::new("/nonexistent"), false).unwrap_err();
        assert!(matches!(err, BootError::InitrdRead { .. }), "{err}");
    }

    #[test]
    fn a_shared_initrd_is_mapped_from_its_file_in_whole_pages() {
        // Two and a half pages: two whole pages are mapped, the half page is copied.
        let bytes: Vec<u8> = (0..10240u32).map(|i| (i % 251) as u8).collect();
        let (_dir, path) = temp_file("shared-initrd", &bytes);
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
