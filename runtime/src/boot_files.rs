//! The guest kernel and initramfs as container VMs map them: read-only copies in husk's cache
//! that nothing ever writes.
//!
//! The VMM maps the kernel's and the initramfs's pages into guest memory
//! (`VmConfig::share_boot_files`), so that every VM booting them shares their page cache
//! pages. A mapped file that is rewritten in place (`cp new-vmlinux vmlinux`) would change the
//! guest of running VMs under them, so VMs map a copy instead, named after the identity of the
//! file it was made from (device, inode, size, modification and change times): a file replaced
//! or rewritten gets a new copy. Older copies are removed once they are old enough that no VM
//! process can still be about to open them; the VMs that map one keep it (an unlinked file
//! stays mapped).

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How old a copy that is not the current one must be to be removed.
const STALE_AFTER: Duration = Duration::from_secs(600);

/// The files a container VM boots from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFile {
    Kernel,
    Initramfs,
}

impl BootFile {
    /// The cache's directory of this file's copies.
    fn dir(self) -> &'static str {
        match self {
            BootFile::Kernel => "kernels",
            BootFile::Initramfs => "initramfs",
        }
    }
}

impl std::fmt::Display for BootFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootFile::Kernel => "guest kernel",
            BootFile::Initramfs => "guest initramfs",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootFileError {
    #[error("cannot read the {what} {path}")]
    Source {
        what: BootFile,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot copy the {what} to {path}")]
    Copy {
        what: BootFile,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The copy of `file` (a `what`) in `cache_dir` that VMs map, made if there is none yet.
pub fn pinned(what: BootFile, file: &Path, cache_dir: &Path) -> Result<PathBuf, BootFileError> {
    let source_err = |source| BootFileError::Source { what, path: file.to_owned(), source };
    let meta = fs::metadata(file).map_err(source_err)?;
    if !meta.is_file() {
        return Err(source_err(io::Error::other("not a regular file")));
    }
    let dir = cache_dir.join(what.dir());
    let name = format!(
        "{:x}-{:x}-{:x}-{:x}.{:x}-{:x}.{:x}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let copy = dir.join(&name);
    if copy.is_file() {
        return Ok(copy);
    }
    let copy_err = |source| BootFileError::Copy { what, path: copy.clone(), source };
    fs::create_dir_all(&dir).map_err(copy_err)?;
    // Copied under a name of its own, then renamed: a VM never sees a partial copy, and
    // concurrent creates each make a whole one, the last rename winning.
    let partial = dir.join(format!(".{name}.{}", std::process::id()));
    let made = fs::copy(file, &partial)
        .and_then(|_| fs::set_permissions(&partial, fs::Permissions::from_mode(0o444)))
        .and_then(|()| fs::rename(&partial, &copy));
    if let Err(e) = made {
        let _ = fs::remove_file(&partial);
        return Err(copy_err(e));
    }
    crate::stale::remove_older_than(&dir, &[&name], STALE_AFTER);
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_tests::tiny_guest::TempDir;
    use std::time::SystemTime;

    fn set_modified(path: &Path, when: SystemTime) {
        fs::File::options().write(true).open(path).unwrap().set_modified(when).unwrap();
    }

    #[test]
    fn a_kernel_is_copied_once_and_again_when_it_changes() {
        let dir = TempDir::new("kernel-copy");
        let kernel = dir.write("vmlinux", b"kernel one");
        let cache = dir.path().join("cache");
        let first = pinned(BootFile::Kernel, &kernel, &cache).unwrap();
        assert_eq!(fs::read(&first).unwrap(), b"kernel one");
        assert_eq!(fs::metadata(&first).unwrap().permissions().mode() & 0o777, 0o444);
        let again = pinned(BootFile::Kernel, &kernel, &cache).unwrap();
        assert_eq!(again, first, "the same file: the same copy");

        // Rewritten in place (as cp does): a new copy; the first one is left for the VMs that
        // may still be opening it, until it is old.
        fs::write(&kernel, b"kernel two, longer").unwrap();
        let second = pinned(BootFile::Kernel, &kernel, &cache).unwrap();
        assert_ne!(second, first);
        assert_eq!(fs::read(&second).unwrap(), b"kernel two, longer");
        assert_eq!(fs::read(&first).unwrap(), b"kernel one", "a copy never changes");

        set_modified(&first, SystemTime::now() - 2 * STALE_AFTER);
        fs::write(&kernel, b"kernel three").unwrap();
        let third = pinned(BootFile::Kernel, &kernel, &cache).unwrap();
        assert!(!first.exists(), "an old copy goes");
        assert!(second.exists() && third.exists(), "recent ones stay");
        let names: Vec<_> = fs::read_dir(cache.join("kernels")).unwrap().flatten().collect();
        assert_eq!(names.len(), 2, "no partial copies left: {names:?}");
    }

    #[test]
    fn kernel_and_initramfs_copies_live_apart() {
        let dir = TempDir::new("boot-file-kinds");
        let kernel = dir.write("vmlinux", b"kernel");
        let initrd = dir.write("initrd", b"initramfs");
        let cache = dir.path().join("cache");
        let kernel_copy = pinned(BootFile::Kernel, &kernel, &cache).unwrap();
        let old = SystemTime::now() - 2 * STALE_AFTER;
        set_modified(&kernel_copy, old);
        let initrd_copy = pinned(BootFile::Initramfs, &initrd, &cache).unwrap();
        assert_eq!(fs::read(&initrd_copy).unwrap(), b"initramfs");
        assert!(kernel_copy.exists(), "the initramfs's copies never remove the kernel's");
        set_modified(&initrd_copy, old);
        assert_eq!(pinned(BootFile::Kernel, &kernel, &cache).unwrap(), kernel_copy);
        assert!(initrd_copy.exists(), "nor the kernel's the initramfs's");
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let dir = TempDir::new("kernel-copy-missing");
        let cache = dir.path().join("cache");
        let err = pinned(BootFile::Kernel, &dir.path().join("nope"), &cache).unwrap_err();
        assert!(err.to_string().contains("cannot read the guest kernel"), "{err}");
        let err = pinned(BootFile::Initramfs, dir.path(), &cache).unwrap_err();
        assert!(err.to_string().contains("cannot read the guest initramfs"), "{err}");
        assert!(matches!(err, BootFileError::Source { .. }), "{err}");
    }
}
