//! The cache key of a root file system tree: SHA-256 over a walk that only stats (no file is
//! read), in name order, so that it costs a few milliseconds for thousands of files.
//!
//! Docker gives the runtime a fresh overlay mount per container (`.../overlay2/<id>/merged`) of
//! the same image layers, under a new path, with a per-container "init" layer on top (empty
//! `/.dockerenv`, `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`, `/dev/console`, the
//! `/etc/mtab` symlink and the directories above them, all created anew for each container).
//! What is stable across such mounts, checked with real overlay mounts of the same lower layers:
//! a lower-layer file's inode number, size, mtime and ctime (overlayfs reports the real ones);
//! what is not: the mount's device number, the root directory's inode, times and link count
//! (they come from the container's upper directory), merged directories' link counts, and the
//! times of directories, empty files and symlinks in the init layer. So each entry contributes:
//!
//! - always: its path relative to the root, its mode (type and permission bits), uid and gid;
//! - a non-empty regular file: size, mtime and ctime (nanoseconds) and inode number. The ctime
//!   catches what the mtime misses: xattr and capability changes (`setcap`), and a write whose
//!   mtime was put back; the inode number catches a file replaced by a copy, and hard links;
//! - an empty regular file: its size (0) only; it has no content to change;
//! - a symlink: its target; a device node: its device number;
//! - a directory: nothing more (its entries are walked; its times change with them anyway).
//!
//! Not in the key, so not noticed by it: xattrs of directories, empty files and symlinks that
//! change without anything else changing, and those entries' timestamps (an image built from
//! an earlier tree with the same content carries the earlier timestamps).

use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::{Error, Result};

/// Changes when what goes into the key, or how images are built from a tree, changes.
const KEY_VERSION: &[u8] = b"husk rootfs image key 1\0";

/// erofs-utils 1.5 (Debian 12) fails on a name of 255 bytes, which Linux allows.
const EROFS_MAX_NAME: usize = 254;

/// What a walk of a tree found.
#[derive(Debug)]
pub(super) struct Scan {
    /// The cache key: 64 hex digits.
    pub key: String,
    /// Entries, the root included.
    pub entries: u64,
    /// Space the tree takes on its file system (`du`), for sizing an ext4 image.
    pub disk_bytes: u64,
    /// The root directory's metadata.
    pub root: Metadata,
    /// Why mkfs.erofs cannot build this tree, if something in it is known to defeat it.
    pub erofs_blocker: Option<String>,
}

/// Walk `root` (an existing directory) and compute its key.
pub(super) fn scan(root: &Path) -> Result<Scan> {
    let meta = fs::metadata(root).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::RootfsMissing(root.to_path_buf()),
        _ => Error::Walk { path: root.to_path_buf(), source: e },
    })?;
    if !meta.is_dir() {
        return Err(Error::RootfsNotDirectory(root.to_path_buf()));
    }
    let mut walk = Walk {
        hasher: Sha256::new(),
        record: Vec::with_capacity(256),
        entries: 0,
        disk_bytes: 0,
        erofs_blocker: None,
    };
    walk.hasher.update(KEY_VERSION);
    walk.entry(b"", &meta, root)?;
    walk.directory(root, &mut Vec::new())?;
    let digest = walk.hasher.finalize();
    let key = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Scan {
        key,
        entries: walk.entries,
        disk_bytes: walk.disk_bytes,
        root: meta,
        erofs_blocker: walk.erofs_blocker,
    })
}

struct Walk {
    hasher: Sha256,
    /// One entry's record, hashed as a whole.
    record: Vec<u8>,
    entries: u64,
    disk_bytes: u64,
    erofs_blocker: Option<String>,
}

fn walk_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Walk { path: path.to_path_buf(), source }
}

impl Walk {
    /// Hash the entries of `dir` (`rel` is its path relative to the root) in name order, and
    /// the subdirectories' after each.
    fn directory(&mut self, dir: &Path, rel: &mut Vec<u8>) -> Result<()> {
        let mut children: Vec<(OsString, Metadata)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(walk_error(dir))? {
            let entry = entry.map_err(walk_error(dir))?;
            let meta = entry.metadata().map_err(|e| walk_error(&entry.path())(e))?;
            children.push((entry.file_name(), meta));
        }
        children.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        for (name, meta) in children {
            let len = rel.len();
            rel.push(b'/');
            rel.extend_from_slice(name.as_bytes());
            let path = dir.join(&name);
            if name.len() > EROFS_MAX_NAME && self.erofs_blocker.is_none() {
                self.erofs_blocker = Some(format!(
                    "{} has a {}-byte name; mkfs.erofs (erofs-utils 1.5) takes at most {}",
                    path.display(),
                    name.len(),
                    EROFS_MAX_NAME
                ));
            }
            self.entry(rel, &meta, &path)?;
            if meta.is_dir() {
                self.directory(&path, rel)?;
            }
            rel.truncate(len);
        }
        Ok(())
    }

    /// Hash one entry's record (see the module's documentation for what is in it).
    fn entry(&mut self, rel: &[u8], meta: &Metadata, path: &Path) -> Result<()> {
        self.entries += 1;
        self.disk_bytes += meta.blocks() * 512;
        let r = &mut self.record;
        r.clear();
        r.extend_from_slice(&(rel.len() as u64).to_le_bytes());
        r.extend_from_slice(rel);
        r.extend_from_slice(&meta.mode().to_le_bytes());
        r.extend_from_slice(&meta.uid().to_le_bytes());
        r.extend_from_slice(&meta.gid().to_le_bytes());
        let ft = meta.file_type();
        if ft.is_file() {
            r.extend_from_slice(&meta.size().to_le_bytes());
            if meta.size() > 0 {
                for v in [meta.mtime(), meta.mtime_nsec(), meta.ctime(), meta.ctime_nsec()] {
                    r.extend_from_slice(&v.to_le_bytes());
                }
                r.extend_from_slice(&meta.ino().to_le_bytes());
            }
        } else if ft.is_symlink() {
            let target: PathBuf = fs::read_link(path).map_err(walk_error(path))?;
            let target = target.as_os_str().as_bytes();
            r.extend_from_slice(&(target.len() as u64).to_le_bytes());
            r.extend_from_slice(target);
        } else if ft.is_block_device() || ft.is_char_device() {
            r.extend_from_slice(&meta.rdev().to_le_bytes());
        }
        self.hasher.update(&self.record);
        Ok(())
    }
}
