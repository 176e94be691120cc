//! The guest kernel as container VMs map it: a read-only copy in husk's cache that nothing ever
//! writes.
//!
//! The VMM maps the kernel's pages into guest memory (`VmConfig::share_kernel`), so that every
//! VM booting it shares the page cache pages of its text. A mapped file that is rewritten in
//! place (`cp new-vmlinux vmlinux`) would change the kernel of running guests under them, so
//! VMs map a copy instead, named after the identity of the file it was made from (device,
//! inode, size, modification and change times): a kernel replaced or rewritten gets a new copy.
//! Older copies are removed once they are old enough that no VM process can still be about to
//! open them; the VMs that map one keep it (an unlinked file stays mapped).

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The cache's directory of kernel copies.
const KERNELS: &str = "kernels";
/// How old a copy that is not the current one must be to be removed.
const STALE_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum KernelCopyError {
    #[error("cannot read the guest kernel {path}")]
    Source {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot copy the guest kernel to {path}")]
    Copy {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The copy of `kernel` in `cache_dir` that VMs map, made if there is none yet.
pub fn pinned(kernel: &Path, cache_dir: &Path) -> Result<PathBuf, KernelCopyError> {
    let source_err = |source| KernelCopyError::Source { path: kernel.to_owned(), source };
    let meta = fs::metadata(kernel).map_err(source_err)?;
    if !meta.is_file() {
        return Err(source_err(io::Error::other("not a regular file")));
    }
    let dir = cache_dir.join(KERNELS);
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
    let copy_err = |source| KernelCopyError::Copy { path: copy.clone(), source };
    fs::create_dir_all(&dir).map_err(copy_err)?;
    // Copied under a name of its own, then renamed: a VM never sees a partial copy, and
    // concurrent creates each make a whole one, the last rename winning.
    let partial = dir.join(format!(".{name}.{}", std::process::id()));
    let made = fs::copy(kernel, &partial)
        .and_then(|_| fs::set_permissions(&partial, fs::Permissions::from_mode(0o444)))
        .and_then(|()| fs::rename(&partial, &copy));
    if let Err(e) = made {
        let _ = fs::remove_file(&partial);
        return Err(copy_err(e));
    }
    remove_stale(&dir, &name);
    Ok(copy)
}

/// Remove the copies in `dir` other than `current` that were made long enough ago.
fn remove_stale(dir: &Path, current: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        if entry.file_name() == current {
            continue;
        }
        let made = entry.metadata().and_then(|m| m.modified());
        let stale = made.is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > STALE_AFTER));
        if stale {
            if let Err(e) = fs::remove_file(entry.path()) {
                log::debug!("removing the old kernel copy {}: {e}", entry.path().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_tests::tiny_guest::TempDir;

    fn set_modified(path: &Path, when: SystemTime) {
        fs::File::options().write(true).open(path).unwrap().set_modified(when).unwrap();
    }

    #[test]
    fn a_kernel_is_copied_once_and_again_when_it_changes() {
        let dir = TempDir::new("kernel-copy");
        let kernel = dir.write("vmlinux", b"kernel one");
        let cache = dir.path().join("cache");
        let first = pinned(&kernel, &cache).unwrap();
        assert_eq!(fs::read(&first).unwrap(), b"kernel one");
        assert_eq!(fs::metadata(&first).unwrap().permissions().mode() & 0o777, 0o444);
        assert_eq!(pinned(&kernel, &cache).unwrap(), first, "the same file: the same copy");

        // Rewritten in place (as cp does): a new copy; the first one is left for the VMs that
        // may still be opening it, until it is old.
        fs::write(&kernel, b"kernel two, longer").unwrap();
        let second = pinned(&kernel, &cache).unwrap();
        assert_ne!(second, first);
        assert_eq!(fs::read(&second).unwrap(), b"kernel two, longer");
        assert_eq!(fs::read(&first).unwrap(), b"kernel one", "a copy never changes");

        set_modified(&first, SystemTime::now() - 2 * STALE_AFTER);
        fs::write(&kernel, b"kernel three").unwrap();
        let third = pinned(&kernel, &cache).unwrap();
        assert!(!first.exists(), "an old copy goes");
        assert!(second.exists() && third.exists(), "recent ones stay");
        let names: Vec<_> = fs::read_dir(cache.join(KERNELS)).unwrap().flatten().collect();
        assert_eq!(names.len(), 2, "no partial copies left: {names:?}");
    }

    #[test]
    fn a_missing_kernel_is_a_clear_error() {
        let dir = TempDir::new("kernel-copy-missing");
        let err = pinned(&dir.path().join("nope"), &dir.path().join("cache")).unwrap_err();
        assert!(err.to_string().contains("cannot read the guest kernel"), "{err}");
        let err = pinned(dir.path(), &dir.path().join("cache")).unwrap_err();
        assert!(matches!(err, KernelCopyError::Source { .. }), "{err}");
    }
}
