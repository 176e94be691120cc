//! The disk image behind a block device: a raw file (or host block device) opened once when the
//! VM is built, with its capacity and id, read and written with positional I/O straight between
//! the file and guest memory, without an intermediate copy.
//!
//! A read-only image is opened `O_RDONLY`: nothing the guest does can modify it.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::device::BlockError;
use super::{ID_BYTES, SECTOR_SIZE};

/// The id string of a disk, NUL-padded to [`ID_BYTES`].
pub(super) type DiskId = [u8; ID_BYTES];

/// An open disk image.
#[derive(Debug)]
pub(super) struct DiskImage {
    file: File,
    path: PathBuf,
    read_only: bool,
    capacity: u64,
    id: DiskId,
}

impl DiskImage {
    /// Open the image at `path`, read-only or read-write. `id` is the string GET_ID returns
    /// (at most [`ID_BYTES`]); without it, the file name truncated to [`ID_BYTES`].
    pub(super) fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, BlockError> {
        let id = disk_id(path, id)?;
        check_file_type(path, read_only)?;
        let mut file =
            OpenOptions::new().read(true).write(!read_only).open(path).map_err(|source| {
                BlockError::Open { path: path.to_path_buf(), read_only, source }
            })?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size { path: path.to_path_buf(), source })?;
        let tail = size % SECTOR_SIZE;
        if tail != 0 {
            log::warn!(
                "disk image {}: its size ({size} bytes) is not a multiple of {SECTOR_SIZE}; \
                 the last {tail} bytes are not exposed to the guest",
                path.display()
            );
        }
        Ok(DiskImage {
            file,
            path: path.to_path_buf(),
            read_only,
            capacity: size / SECTOR_SIZE,
            id,
        })
    }

    /// The capacity in sectors.
    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the image was opened read-only.
    pub(super) fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The id string returned by GET_ID.
    pub(super) fn id(&self) -> &DiskId {
        &self.id
    }

    /// The image's path, for messages.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Fill `slices`, in order, with the file's bytes from byte `offset` on.
    pub(super) fn read_into<B: BitmapSlice>(
        &self,
        offset: u64,
        slices: &[VolatileSlice<B>],
    ) -> io::Result<()> {
        let mut position = offset;
        for slice in slices {
            read_exact_at(&self.file, position, slice)?;
            position = advance(position, slice.len())?;
        }
        Ok(())
    }

    /// Write the bytes of `slices`, in order, into the file from byte `offset` on.
    pub(super) fn write_from<B: BitmapSlice>(
        &self,
        offset: u64,
        slices: &[VolatileSlice<B>],
    ) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        let mut position = offset;
        for slice in slices {
            write_all_at(&self.file, position, slice)?;
            position = advance(position, slice.len())?;
        }
        Ok(())
    }

    /// Make the written data durable (fdatasync).
    pub(super) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// The id from the configuration, or else from the file name, NUL-padded.
fn disk_id(path: &Path, id: Option<&str>) -> Result<DiskId, BlockError> {
    let bytes = match id {
        Some(id) if id.len() > ID_BYTES => {
            return Err(BlockError::IdTooLong { id: id.to_string() });
        }
        Some(id) => id.as_bytes(),
        None => path.file_name().map_or(&[][..], |name| name.as_bytes()),
    };
    let mut padded = [0u8; ID_BYTES];
    let n = bytes.len().min(ID_BYTES);
    padded[..n].copy_from_slice(&bytes[..n]);
    Ok(padded)
}

/// Refuse directories, FIFOs, sockets and character devices before opening (opening a FIFO
/// would block the VMM).
fn check_file_type(path: &Path, read_only: bool) -> Result<(), BlockError> {
    let metadata = std::fs::metadata(path).map_err(|source| BlockError::Open {
        path: path.to_path_buf(),
        read_only,
        source,
    })?;
    let file_type = metadata.file_type();
    if file_type.is_file() || file_type.is_block_device() {
        Ok(())
    } else {
        Err(BlockError::NotADisk { path: path.to_path_buf() })
    }
}

/// `position + len`, or an error if that leaves the range of file offsets.
fn advance(position: u64, len: usize) -> io::Result<u64> {
    u64::try_from(len)
        .ok()
        .and_then(|len| position.checked_add(len))
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The file offset `done` bytes after `position`, as the syscalls take it.
fn file_offset(position: u64, done: usize) -> io::Result<libc::off_t> {
    let offset = advance(position, done)?;
    libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Repeat `transfer(done)` (a pread/pwrite of the bytes from `done` on, returning what the
/// syscall returns) until `len` bytes have moved. A transfer of 0 bytes is a `short` error.
fn transfer_all(
    len: usize,
    short: io::ErrorKind,
    mut transfer: impl FnMut(usize) -> io::Result<isize>,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let result = transfer(done)?;
        match usize::try_from(result) {
            Ok(0) => return Err(io::Error::from(short)),
            Ok(n) => done += n,
            Err(_) => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// Fill all of `slice` from the file at `position`.
fn read_exact_at<B: BitmapSlice>(
    file: &File,
    position: u64,
    slice: &VolatileSlice<B>,
) -> io::Result<()> {
    let guard = slice.ptr_guard_mut();
    let len = slice.len();
    transfer_all(len, io::ErrorKind::UnexpectedEof, |done| {
        let offset = file_offset(position, done)?;
        // SAFETY: `guard` keeps the guest memory of `slice` mapped and writable for `len` bytes
        // from its pointer; `done < len`, so the kernel writes only inside the slice. No Rust
        // reference to that memory exists.
        Ok(unsafe {
            libc::pread(file.as_raw_fd(), guard.as_ptr().add(done).cast(), len - done, offset)
        })
    })?;
    slice.bitmap().mark_dirty(0, len);
    Ok(())
}

/// Write all of `slice` into the file at `position`.
fn write_all_at<B: BitmapSlice>(
    file: &File,
    position: u64,
    slice: &VolatileSlice<B>,
) -> io::Result<()> {
    let guard = slice.ptr_guard();
    let len = slice.len();
    transfer_all(len, io::ErrorKind::WriteZero, |done| {
        let offset = file_offset(position, done)?;
        // SAFETY: `guard` keeps the guest memory of `slice` mapped and readable for `len` bytes
        // from its pointer; `done < len`, so the kernel reads only inside the slice.
        Ok(unsafe {
            libc::pwrite(file.as_raw_fd(), guard.as_ptr().add(done).cast(), len - done, offset)
        })
    })
}

#[cfg(test)]
pub(super) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use vm_memory::VolatileMemory;
    use vmm_sys_util::tempdir::TempDir;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    /// A temporary image of `len` bytes, byte i holding `i % 251`.
    pub(in super::super) fn patterned_image(len: usize) -> TempFile {
        let image = TempFile::new_with_prefix("/tmp/husk-blk-test").unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(image.as_path(), bytes).unwrap();
        image
    }

    /// Linux capability header and data (capget(2), version 3).
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

    /// Clear the calling thread's effective capabilities, so that file permission bits apply to
    /// it even when the tests run as root. Capabilities are per thread: nothing else changes.
    fn drop_effective_capabilities() {
        let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
        let mut data = [CapData::default(); 2];
        // SAFETY: version 3 of capget writes two `CapData` (repr(C), three u32) into `data`,
        // which has room for exactly two; `header` is a valid header.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
        assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
        data.iter_mut().for_each(|d| d.effective = 0);
        // SAFETY: capset reads the header and two `CapData` from valid, initialised memory.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
        assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
    }

    /// Run `f` on a thread without effective capabilities.
    fn without_capabilities<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                drop_effective_capabilities();
                f()
            })
            .join()
            .unwrap()
        })
    }

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn capacity_counts_whole_sectors_only() {
        let image = patterned_image(8 * 512 + 100);
        let disk = DiskImage::open(image.as_path(), false, None).unwrap();
        assert_eq!(disk.capacity(), 8);
        assert!(!disk.is_read_only());
    }

    #[test]
    fn missing_file_is_an_error_naming_the_path() {
        let dir = TempDir::new_with_prefix("/tmp/husk-blk-test").unwrap();
        let path = dir.as_path().join("missing.img");
        let err = DiskImage::open(&path, false, None).unwrap_err();
        let BlockError::Open { source, .. } = &err else { panic!("{err:?}") };
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");
    }

    #[test]
    fn directory_is_not_a_disk() {
        let dir = TempDir::new_with_prefix("/tmp/husk-blk-test").unwrap();
        let err = DiskImage::open(dir.as_path(), true, None).unwrap_err();
        assert!(matches!(err, BlockError::NotADisk { .. }), "{err:?}");
        assert!(err.to_string().contains(dir.as_path().to_str().unwrap()), "{err}");
    }

    #[test]
    fn read_write_open_needs_write_permission() {
        let image = patterned_image(4096);
        set_mode(image.as_path(), 0o444);
        let err =
            without_capabilities(|| DiskImage::open(image.as_path(), false, None)).unwrap_err();
        assert!(
            matches!(
                &err,
                BlockError::Open { source, read_only: false, .. }
                    if source.kind() == io::ErrorKind::PermissionDenied
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(image.as_path().to_str().unwrap()), "{err}");
        let disk = without_capabilities(|| DiskImage::open(image.as_path(), true, None)).unwrap();
        assert!(disk.is_read_only());
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let image = patterned_image(4096);
        set_mode(image.as_path(), 0o000);
        let err =
            without_capabilities(|| DiskImage::open(image.as_path(), true, None)).unwrap_err();
        assert!(matches!(err, BlockError::Open { read_only: true, .. }), "{err:?}");
    }

    #[test]
    fn id_defaults_to_the_file_name_truncated() {
        let dir = TempDir::new_with_prefix("/tmp/husk-blk-test").unwrap();
        let path = dir.as_path().join("a-rather-long-disk-image-name.img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let disk = DiskImage::open(&path, true, None).unwrap();
        assert_eq!(disk.id(), b"a-rather-long-disk-i");
        let disk = DiskImage::open(&path, true, Some("rootfs")).unwrap();
        assert_eq!(&disk.id()[..7], b"rootfs\0");
    }

    #[test]
    fn id_longer_than_20_bytes_is_refused() {
        let image = patterned_image(512);
        let err =
            DiskImage::open(image.as_path(), true, Some("123456789012345678901")).unwrap_err();
        assert!(matches!(err, BlockError::IdTooLong { .. }), "{err:?}");
        assert!(DiskImage::open(image.as_path(), true, Some("12345678901234567890")).is_ok());
    }

    #[test]
    fn positional_io_moves_bytes_between_file_and_memory() {
        let image = patterned_image(4 * 512);
        let disk = DiskImage::open(image.as_path(), false, None).unwrap();
        let mut buf = [0u8; 300];
        let memory = VolatileSlice::from(&mut buf[..]);
        let (first, second) = memory.split_at(100).unwrap();
        disk.read_into(1000, &[first, second]).unwrap();
        let expected: Vec<u8> = (1000..1300).map(|i| (i % 251) as u8).collect();
        assert_eq!(&buf[..], &expected[..]);

        let mut ones = [1u8; 512];
        let memory = VolatileSlice::from(&mut ones[..]);
        disk.write_from(512, &[memory.get_slice(0, 512).unwrap()]).unwrap();
        let content = std::fs::read(image.as_path()).unwrap();
        assert!(content[512..1024].iter().all(|&b| b == 1));
        assert_eq!(content[511], (511 % 251) as u8);
        assert_eq!(content[1024], (1024 % 251) as u8);
    }

    #[test]
    fn reading_past_the_end_of_file_is_an_error() {
        let image = patterned_image(512);
        let disk = DiskImage::open(image.as_path(), true, None).unwrap();
        let mut buf = [0u8; 512];
        let err = disk.read_into(256, &[VolatileSlice::from(&mut buf[..])]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn read_only_image_refuses_writes() {
        let image = patterned_image(512);
        let disk = DiskImage::open(image.as_path(), true, None).unwrap();
        let mut buf = [7u8; 512];
        assert!(disk.write_from(0, &[VolatileSlice::from(&mut buf[..])]).is_err());
        assert_eq!(std::fs::read(image.as_path()).unwrap()[0], 0);
        disk.flush().unwrap();
    }
}
