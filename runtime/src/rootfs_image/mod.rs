//! Root file system images: an OCI bundle's rootfs directory becomes a disk image the micro-VM
//! attaches read-only over virtio-blk (the guest agent puts a tmpfs overlay on top for writes).
//!
//! Images are erofs (mkfs.erofs: fast to build, compact, read-only), or ext4 (mkfs.ext4 -d)
//! where erofs-utils cannot build the tree; [`PreparedImage`] says which, and why ext4. They are
//! cached under a directory, keyed by a stat-only walk of the tree (see `key.rs`), so a second
//! container of the same image layers (a fresh overlay mount from Docker, or the same directory)
//! costs the walk and a hard link, not a build.
//!
//! Cache layout, under the directory given to [`RootfsImages::new`]:
//!
//! - `images/<key>.erofs`, `images/<key>.ext4`: finished images, only ever renamed into place;
//! - `tmp/<key>.<pid>.<n>.tmp`: images being built;
//! - `locks/<key>`: flock(2) held while an image of that key is built, so that concurrent
//!   prepares of one tree build it once; `locks/evict`: held while evicting.
//!
//! A container holds its image through a hard link (in its state directory, on the cache's file
//! system), which is the path the VM attaches: removing the container's state removes it, and
//! the cache never evicts an image with more than one link. Should eviction race with a new
//! link, the container's link keeps the image alive all the same; the cache only loses it.
//! Eviction runs after each build: least recently used first (a cache hit sets the image's
//! mtime), until the cache is within [`CacheLimits`].

mod error;
mod key;
mod mkfs;
#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

pub use error::{Error, Result};

/// The file system of an image, as the guest's mount(2) names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    Erofs,
    Ext4,
}

impl FsType {
    /// The file system type name, which is also the image's extension in the cache.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Erofs => "erofs",
            FsType::Ext4 => "ext4",
        }
    }
}

/// A container's image of its rootfs.
#[derive(Debug)]
pub struct PreparedImage {
    /// The container's hard link to the image: the disk to attach.
    pub path: PathBuf,
    pub fstype: FsType,
    /// Whether the image was in the cache already (no build).
    pub from_cache: bool,
    /// The cache key of the tree.
    pub key: String,
    /// Why the image is ext4 rather than erofs.
    pub ext4_reason: Option<String>,
}

/// How large the cache may grow. Images in use by containers count, but are never evicted: a
/// cache whose images are all in use can stay above its limits.
#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    /// Disk space of all images together (allocated blocks).
    pub max_bytes: u64,
    /// Number of images.
    pub max_images: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits { max_bytes: 8 << 30, max_images: 64 }
    }
}

/// The rootfs image cache in one directory.
#[derive(Debug)]
pub struct RootfsImages {
    dir: PathBuf,
    limits: CacheLimits,
}

impl RootfsImages {
    /// Use (and create if needed) the cache in `cache_dir`, with the default limits.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = cache_dir.into();
        for sub in ["images", "tmp", "locks"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path)
                .map_err(|source| Error::CacheNotWritable { dir: path.clone(), source })?;
        }
        // Directories that exist may still not be writable (read-only mount, permissions).
        let probe = dir.join("tmp").join(format!(".probe.{}", std::process::id()));
        File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|source| Error::CacheNotWritable { dir: dir.clone(), source })?;
        Ok(RootfsImages { dir, limits: CacheLimits::default() })
    }

    /// Use these limits instead of the defaults.
    #[cfg(test)]
    pub fn with_limits(mut self, limits: CacheLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The image of the tree at `rootfs`, from the cache or built now, hard-linked at `link`
    /// (replacing what is there). `link` must be on the cache's file system, in an existing
    /// directory: it is the container's reference to the image, and the disk to attach.
    pub fn prepare(&self, rootfs: &Path, link: &Path) -> Result<PreparedImage> {
        let start = Instant::now();
        let scan = key::scan(rootfs)?;
        // The build tools take the tree's root as they find it: a symlink to a directory
        // must be followed.
        let is_link = fs::symlink_metadata(rootfs).is_ok_and(|m| m.file_type().is_symlink());
        let rootfs = if is_link { rootfs.join(".") } else { rootfs.to_path_buf() };
        let walked = start.elapsed();
        let prepared = |fstype, from_cache, ext4_reason| PreparedImage {
            path: link.to_path_buf(),
            fstype,
            from_cache,
            key: scan.key.clone(),
            ext4_reason,
        };
        let cached_reason = |fstype| {
            (fstype == FsType::Ext4).then(|| {
                scan.erofs_blocker.clone().unwrap_or_else(|| {
                    "built as ext4 when this tree was first prepared (mkfs.erofs failed)".into()
                })
            })
        };
        if let Some(fstype) = self.link_cached(&scan.key, link)? {
            log::debug!("rootfs image {}: cached, walk {walked:?}", scan.key);
            return Ok(prepared(fstype, true, cached_reason(fstype)));
        }

        let lock_path = self.dir.join("locks").join(&scan.key);
        let building = lock(&lock_path, true).map_err(|source| Error::Cache {
            what: "locking",
            path: lock_path.clone(),
            source,
        })?;
        // Someone else may have built it while this waited for the lock.
        if let Some(fstype) = self.link_cached(&scan.key, link)? {
            return Ok(prepared(fstype, true, cached_reason(fstype)));
        }
        let (fstype, reason) = self.build(&rootfs, &scan)?;
        let image = self.image_path(&scan.key, fstype);
        make_link(&image, link)?;
        log::info!(
            "rootfs image {} of {}: {} built in {:?} (walk {walked:?}, {} entries)",
            scan.key,
            rootfs.display(),
            fstype.as_str(),
            start.elapsed(),
            scan.entries
        );
        drop(building);
        if let Err(e) = self.evict() {
            log::warn!("rootfs image cache eviction: {e}");
        }
        Ok(prepared(fstype, false, reason))
    }

    /// Drop a container's reference to its image (the link [`RootfsImages::prepare`] made);
    /// nothing to do if it is gone already.
    pub fn release(link: &Path) -> Result<()> {
        match fs::remove_file(link) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(Error::Cache { what: "removing", path: link.to_path_buf(), source: e })
            }
            _ => Ok(()),
        }
    }

    /// Remove images no container links, least recently used first, until the cache is within
    /// its limits, and temporary files no build is writing. Returns how many images it removed;
    /// 0 at once if another process is evicting.
    pub fn evict(&self) -> Result<usize> {
        let lock_path = self.dir.join("locks").join("evict");
        let cache_err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Cache { what, path, source }
        };
        let Some(_evicting) = lock(&lock_path, false).map_err(cache_err("locking", &lock_path))?
        else {
            return Ok(0);
        };

        let tmp = self.dir.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(cache_err("reading", &tmp))? {
            let path = entry.map_err(cache_err("reading", &tmp))?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let Some(key) = name.split('.').next().filter(|k| !k.is_empty()) else { continue };
            // A build holds its key's lock for as long as its temporary file exists.
            let key_lock = self.dir.join("locks").join(key);
            if lock(&key_lock, false).map_err(cache_err("locking", &key_lock))?.is_some() {
                let _ = fs::remove_file(&path);
            }
        }

        let images = self.dir.join("images");
        let mut all = Vec::new();
        for entry in fs::read_dir(&images).map_err(cache_err("reading", &images))? {
            let entry = entry.map_err(cache_err("reading", &images))?;
            match entry.metadata() {
                Ok(m) => all.push((m.mtime(), m.mtime_nsec(), m.blocks() * 512, m.nlink(), entry)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(cache_err("reading", &entry.path())(e)),
            }
        }
        let mut bytes: u64 = all.iter().map(|i| i.2).sum();
        let mut count = all.len();
        all.sort_by_key(|i| (i.0, i.1));
        let mut removed = 0;
        for (_, _, size, nlink, entry) in all {
            if bytes <= self.limits.max_bytes && count <= self.limits.max_images {
                break;
            }
            if nlink > 1 {
                continue;
            }
            let path = entry.path();
            let key = path.file_stem().unwrap_or_default().to_owned();
            let key_lock = self.dir.join("locks").join(&key);
            let Some(_k) = lock(&key_lock, false).map_err(cache_err("locking", &key_lock))? else {
                continue;
            };
            match fs::remove_file(&path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(cache_err("removing", &path)(e));
                }
                _ => {}
            }
            let _ = fs::remove_file(&key_lock);
            log::debug!("rootfs image cache: evicted {}", path.display());
            bytes -= size;
            count -= 1;
            removed += 1;
        }
        Ok(removed)
    }

    fn image_path(&self, key: &str, fstype: FsType) -> PathBuf {
        self.dir.join("images").join(format!("{key}.{}", fstype.as_str()))
    }

    /// Link the cached image of `key` at `link` and mark it used, if there is one.
    fn link_cached(&self, key: &str, link: &Path) -> Result<Option<FsType>> {
        for fstype in [FsType::Erofs, FsType::Ext4] {
            let image = self.image_path(key, fstype);
            if !make_link(&image, link)? {
                continue;
            }
            // Recently used: eviction goes by mtime. Through the link, which is the same inode
            // and cannot be evicted meanwhile.
            let used = File::open(link).and_then(|f| f.set_modified(SystemTime::now()));
            if let Err(e) = used {
                log::warn!("rootfs image cache: marking {} used: {e}", image.display());
            }
            return Ok(Some(fstype));
        }
        Ok(None)
    }

    /// Build the image of `rootfs` into a temporary file and rename it into the cache.
    fn build(&self, rootfs: &Path, scan: &key::Scan) -> Result<(FsType, Option<String>)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join("tmp").join(format!("{}.{}.{n}.tmp", scan.key, std::process::id()));
        let built = self.build_at(rootfs, scan, &tmp);
        let result = built.and_then(|(fstype, reason)| {
            let image = self.image_path(&scan.key, fstype);
            // The image's data on disk before its name: a crash leaves no torn image in the
            // cache.
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .and_then(|()| fs::rename(&tmp, &image))
                .map_err(|source| Error::Cache { what: "storing", path: image, source })?;
            Ok((fstype, reason))
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn build_at(
        &self,
        rootfs: &Path,
        scan: &key::Scan,
        tmp: &Path,
    ) -> Result<(FsType, Option<String>)> {
        if let Some(reason) = &scan.erofs_blocker {
            mkfs::ext4(rootfs, tmp, scan)?;
            return Ok((FsType::Ext4, Some(reason.clone())));
        }
        match mkfs::erofs(rootfs, tmp) {
            Ok(()) => Ok((FsType::Erofs, None)),
            Err(e @ Error::MkfsMissing { .. }) => Err(e),
            Err(e) => {
                log::warn!("{e}; building ext4 instead");
                let _ = fs::remove_file(tmp);
                mkfs::ext4(rootfs, tmp, scan)?;
                Ok((FsType::Ext4, Some(e.to_string())))
            }
        }
    }
}

/// Hard-link `image` at `link`, replacing what is there. Ok(false) if there is no `image`.
fn make_link(image: &Path, link: &Path) -> Result<bool> {
    let err = |source| Error::Link { image: image.to_path_buf(), link: link.to_path_buf(), source };
    match fs::remove_file(link) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    match fs::hard_link(image, link) {
        Ok(()) => Ok(true),
        // Either the image is not there, or the link's directory is not.
        Err(e) if e.kind() == ErrorKind::NotFound && !image.exists() => Ok(false),
        Err(e) => Err(err(e)),
    }
}

/// Take the flock(2) of `path` (created if needed), waiting for it if `wait`, else None if
/// someone else holds it. The lock lasts as long as the returned file is open.
pub(crate) fn lock(path: &Path, wait: bool) -> io::Result<Option<File>> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    let op = if wait { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    loop {
        // SAFETY: flock(2) only acts on the descriptor, which `file` owns and keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(Some(file));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(None),
            _ => return Err(e),
        }
    }
}
