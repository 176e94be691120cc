//! Tests with real trees, the real mkfs tools, and the images mounted read-only on a loop
//! device in a private mount namespace (a child process's, seen from here through
//! /proc/PID/root, so nothing is mounted on the host). Root only, like the rest of the suite.

use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use husk_tests::rootfs::busybox_rootfs;
use husk_tests::tiny_guest::TempDir;
use sha2::{Digest, Sha256};

use super::*;

/// A cache in a temporary directory, which also holds the containers' links.
struct Cache {
    dir: TempDir,
    images: RootfsImages,
}

impl Cache {
    fn new() -> Self {
        Cache::with_limits(CacheLimits::default())
    }

    fn with_limits(limits: CacheLimits) -> Self {
        let dir = TempDir::new("rootfs-cache");
        let images = RootfsImages::new(dir.path().join("cache")).unwrap().with_limits(limits);
        Cache { dir, images }
    }

    /// Prepare `tree` for a container whose link is named `container`.
    fn prepare(&self, tree: &Path, container: &str) -> PreparedImage {
        self.images.prepare(tree, &self.dir.path().join(container)).unwrap()
    }

    fn files(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir.path().join("cache").join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn sh(script: &str, args: &[&Path]) {
    let out = Command::new("sh").arg("-c").arg(script).arg("sh").args(args).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated and `value` is valid for its length.
    let rc =
        unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setxattr {name} on {}: {}", path.display(), io::Error::last_os_error());
}

/// An entry's extended attributes, sorted, as `name=value` with the value in hex.
fn xattrs(path: &Path) -> Vec<String> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: `p` is NUL-terminated and `names` is valid for its length.
    let len = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(len >= 0, "listxattr {}: {}", path.display(), io::Error::last_os_error());
    let mut out = Vec::new();
    for name in names[..len as usize].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let n = CString::new(name).unwrap();
        let mut value = vec![0u8; 4096];
        // SAFETY: both strings are NUL-terminated and `value` is valid for its length.
        let vlen = unsafe {
            libc::lgetxattr(p.as_ptr(), n.as_ptr(), value.as_mut_ptr().cast(), value.len())
        };
        assert!(vlen >= 0, "getxattr {}: {}", path.display(), io::Error::last_os_error());
        let hex: String = value[..vlen as usize].iter().map(|b| format!("{b:02x}")).collect();
        out.push(format!("{}={hex}", String::from_utf8_lossy(name)));
    }
    out.sort();
    out
}

/// One line per entry of the tree at `root`, in name order: what an image must keep.
/// Directories' sizes and link counts and the root's times are file-system specific; the
/// rest must match, timestamps to the nanosecond if `ns`, else to the second.
fn manifest(root: &Path, ns: bool) -> Vec<String> {
    let mut out = Vec::new();
    manifest_entry(root, Path::new(""), ns, &mut out);
    out
}

fn manifest_entry(root: &Path, rel: &Path, ns: bool, out: &mut Vec<String>) {
    let path = root.join(rel);
    let m = fs::symlink_metadata(&path).unwrap();
    let ft = m.file_type();
    let mut line = format!("/{} mode={:o} owner={}:{}", rel.display(), m.mode(), m.uid(), m.gid());
    if !rel.as_os_str().is_empty() {
        line += &format!(" mtime={}", m.mtime());
        if ns {
            line += &format!(".{:09}", m.mtime_nsec());
        }
    }
    if ft.is_file() {
        let digest = Sha256::digest(fs::read(&path).unwrap());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        line += &format!(" size={} links={} sha256={hex}..", m.size(), m.nlink());
    } else if ft.is_symlink() {
        line += &format!(" -> {}", fs::read_link(&path).unwrap().display());
    } else if ft.is_block_device() || ft.is_char_device() {
        line += &format!(" rdev={:x}", m.rdev());
    }
    for x in xattrs(&path) {
        line += &format!(" {x}");
    }
    out.push(line);
    if ft.is_dir() {
        let mut names: Vec<_> =
            fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        for name in names {
            manifest_entry(root, &rel.join(name), ns, out);
        }
    }
}

fn assert_same_tree(tree: &Path, image_root: &Path, ns: bool) {
    let want = manifest(tree, ns);
    let got = manifest(image_root, ns);
    let missing: Vec<_> = want.iter().filter(|l| !got.contains(l)).collect();
    let extra: Vec<_> = got.iter().filter(|l| !want.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "image differs from the tree\nonly in the tree:\n{missing:#?}\nonly in the image:\n{extra:#?}"
    );
}

/// A shell in a private mount namespace that runs `script` (with `args` as $1...), which
/// mounts things; its mounts are visible through [`Namespace::path`] until it is dropped, when
/// the shell exits and its namespace, mounts and loop devices go with it.
struct Namespace {
    child: Child,
}

impl Namespace {
    fn new(script: &str, args: &[&Path]) -> Self {
        let script = format!("set -e; {script}; echo ready; read _ || true");
        let mut child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "mounting in a private namespace failed: {script}");
        Namespace { child }
    }

    /// Mount `image` (read-only, on a loop device) at `mnt`.
    fn mount_image(image: &Path, fstype: FsType, mnt: &Path) -> Self {
        let script = format!("mount -t {} -o ro,loop \"$1\" \"$2\"", fstype.as_str());
        Namespace::new(&script, &[image, mnt])
    }

    /// `path` as this namespace sees it.
    fn path(&self, path: &Path) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.child.id())).join(path.strip_prefix("/").unwrap())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Wait until no loop device is attached to `image` (the kernel frees it after the unmount).
fn assert_no_loop_device(image: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("losetup").arg("-j").arg(image).output().unwrap();
        if out.stdout.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "loop device left: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Add what a root file system can hold beyond busybox's files and symlinks.
fn add_odd_entries(root: &Path) {
    sh(
        "cd \"$1\" && mknod dev/null c 1 3 && mknod dev/loop0 b 7 0 && mkfifo run/fifo \
         && mkdir -p var/empty 'home/user/dir with spaces' && echo spaced > \
         'home/user/dir with spaces/file with spaces' && ln etc/passwd etc/passwd.hardlink \
         && ln -s /proc/mounts etc/mtab && printf 'x' > bin/caps && chmod 4750 bin/caps \
         && setcap cap_net_raw+ep bin/caps && echo secret > root/secret && chmod 600 root/secret \
         && chown 1234:5678 root/secret && echo far > home/user/far && chown 100000:100001 \
         home/user/far && : > etc/empty",
        &[root],
    );
    std::os::unix::net::UnixListener::bind(root.join("run/socket")).unwrap();
    set_xattr(&root.join("etc/group"), "user.husk", b"test");
    set_xattr(&root.join("var/empty"), "trusted.husk", b"dir");
    fs::write(root.join("tmp").join("n".repeat(254)), "long name").unwrap();
    let old = UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    File::options().write(true).open(root.join("etc/group")).unwrap().set_modified(old).unwrap();
}

#[test]
fn busybox_rootfs_becomes_an_erofs_image_with_everything_in_it() {
    let tree = busybox_rootfs();
    add_odd_entries(tree.path());
    let cache = Cache::new();
    let img = cache.prepare(tree.path(), "c1");
    assert_eq!(img.fstype, FsType::Erofs);
    assert!(!img.from_cache);
    assert_eq!(img.ext4_reason, None);
    assert_eq!(img.key.len(), 64);
    assert_eq!(cache.files("images"), [format!("{}.erofs", img.key)]);
    assert!(cache.files("tmp").is_empty());

    let mnt = TempDir::new("mnt");
    {
        let ns = Namespace::mount_image(&img.path, img.fstype, mnt.path());
        let root = ns.path(mnt.path());
        assert_same_tree(tree.path(), &root, true);
        let (a, b) = (root.join("etc/passwd"), root.join("etc/passwd.hardlink"));
        assert_eq!(fs::metadata(a).unwrap().ino(), fs::metadata(b).unwrap().ino());
        let caps = Command::new("getcap").arg(root.join("bin/caps")).output().unwrap();
        assert!(String::from_utf8_lossy(&caps.stdout).contains("cap_net_raw=ep"));
    }
    assert_no_loop_device(&img.path);
    let fsck = Command::new("fsck.erofs").arg(&img.path).output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stderr));
}

#[test]
fn a_name_erofs_utils_cannot_take_falls_back_to_ext4() {
    let tree = busybox_rootfs();
    add_odd_entries(tree.path());
    fs::write(tree.path().join("tmp").join("m".repeat(255)), "longest name").unwrap();
    fs::set_permissions(tree.path(), fs::Permissions::from_mode(0o750)).unwrap();
    let cache = Cache::new();
    let img = cache.prepare(tree.path(), "c1");
    assert_eq!(img.fstype, FsType::Ext4);
    let reason = img.ext4_reason.as_deref().unwrap();
    assert!(reason.contains("255-byte name"), "{reason}");

    let mnt = TempDir::new("mnt");
    {
        let ns = Namespace::mount_image(&img.path, img.fstype, mnt.path());
        // mke2fs -d keeps whole seconds only.
        assert_same_tree(tree.path(), &ns.path(mnt.path()), false);
    }
    assert_no_loop_device(&img.path);

    let again = cache.prepare(tree.path(), "c2");
    assert!(again.from_cache);
    assert_eq!((again.fstype, again.ext4_reason.as_deref()), (FsType::Ext4, Some(reason)));
}

#[test]
fn the_cache_is_hit_until_the_tree_changes() {
    let tree = busybox_rootfs();
    let root = tree.path();
    let cache = Cache::new();
    let first = cache.prepare(root, "c1");
    assert!(!first.from_cache);
    let second = cache.prepare(root, "c2");
    assert!(second.from_cache);
    assert_eq!(second.key, first.key);
    assert_eq!(fs::metadata(&first.path).unwrap().ino(), fs::metadata(&second.path).unwrap().ino());

    let mut keys = vec![first.key];
    let mut expect_miss = |what: &str, container: &str| {
        let img = cache.prepare(root, container);
        assert!(!img.from_cache, "{what}: cache hit");
        assert!(!keys.contains(&img.key), "{what}: key seen before");
        keys.push(img.key);
    };
    // Same size, mtime put back: only the ctime tells.
    let passwd = root.join("etc/passwd");
    let mtime = fs::metadata(&passwd).unwrap().modified().unwrap();
    let mut text = fs::read(&passwd).unwrap();
    text[0] = b'R';
    fs::write(&passwd, &text).unwrap();
    File::options().write(true).open(&passwd).unwrap().set_modified(mtime).unwrap();
    expect_miss("content changed, mtime put back", "c3");
    let later = mtime + Duration::from_secs(60);
    File::options().write(true).open(root.join("etc/group")).unwrap().set_modified(later).unwrap();
    expect_miss("mtime changed", "c4");
    fs::write(root.join("etc/motd"), "hello\n").unwrap();
    expect_miss("file added", "c5");
    fs::set_permissions(root.join("etc/motd"), fs::Permissions::from_mode(0o600)).unwrap();
    expect_miss("mode changed", "c6");
    sh("setcap cap_net_raw+ep \"$1\"", &[&root.join("etc/motd")]);
    expect_miss("capability added", "c7");
    fs::remove_file(root.join("bin/ls")).unwrap();
    expect_miss("symlink removed", "c8");
    symlink("busybox", root.join("bin/ls")).unwrap();
    let back = cache.prepare(root, "c9");
    assert!(back.from_cache, "symlink back as it was: same content");
}

#[test]
fn overlay_mounts_of_the_same_layers_share_one_image() {
    let lower = busybox_rootfs();
    let t = TempDir::new("overlays");
    let dirs = |n| ["u", "w", "m"].map(|d| t.path().join(format!("{d}{n}")));
    for n in 1..=4 {
        for d in dirs(n) {
            fs::create_dir(d).unwrap();
        }
    }
    // Docker's per-container init layer: empty files and a symlink made anew each time.
    for n in 1..=2 {
        let init = t.path().join(format!("init{n}"));
        sh(
            "mkdir -p \"$1\"/etc \"$1\"/dev/pts \"$1\"/proc && cd \"$1\" && : > .dockerenv && \
             : > etc/hosts && : > etc/resolv.conf && : > dev/console && ln -s /proc/mounts etc/mtab",
            &[&init],
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let script = "cd \"$1\"; L=\"$2\"; \
        mount -t overlay overlay -o lowerdir=$L,upperdir=u1,workdir=w1 m1; \
        mount -t overlay overlay -o lowerdir=$L,upperdir=u2,workdir=w2 m2; \
        mount -t overlay overlay -o lowerdir=init1:$L,upperdir=u3,workdir=w3 m3; \
        mount -t overlay overlay -o lowerdir=init2:$L,upperdir=u4,workdir=w4 m4";
    let ns = Namespace::new(script, &[t.path(), lower.path()]);
    let merged = |n| ns.path(&t.path().join(format!("m{n}")));
    let m1 = fs::metadata(merged(1).join("bin/busybox")).unwrap();
    let m2 = fs::metadata(merged(2).join("bin/busybox")).unwrap();
    assert_ne!(m1.dev(), m2.dev(), "two overlay mounts");
    assert_eq!(m1.ino(), m2.ino(), "a lower file's real inode number");

    let cache = Cache::new();
    let a = cache.prepare(&merged(1), "c1");
    let b = cache.prepare(&merged(2), "c2");
    assert!(!a.from_cache);
    assert!(b.from_cache, "second mount of the same lower layer");
    assert_eq!(a.key, b.key);
    let c = cache.prepare(&merged(3), "c3");
    let d = cache.prepare(&merged(4), "c4");
    assert!(!c.from_cache);
    assert!(d.from_cache, "same layers under another container's init layer");
    assert_eq!(c.key, d.key);
    assert_ne!(a.key, c.key);
    drop(ns);
    assert_eq!(cache.files("images").len(), 2);
}

#[test]
fn concurrent_prepares_build_one_image() {
    let tree = busybox_rootfs();
    let cache = Cache::new();
    let results: Vec<PreparedImage> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (cache, tree) = (&cache, tree.path());
                s.spawn(move || cache.prepare(tree, &format!("c{i}")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|r| !r.from_cache).count(), 1, "{results:#?}");
    let inodes: Vec<u64> = results.iter().map(|r| fs::metadata(&r.path).unwrap().ino()).collect();
    assert!(inodes.iter().all(|i| *i == inodes[0]), "one image");
    assert_eq!(cache.files("images").len(), 1);
    assert!(cache.files("tmp").is_empty());
    let fsck = Command::new("fsck.erofs").arg(&results[0].path).output().unwrap();
    assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stderr));
}

#[test]
fn eviction_keeps_the_cache_bounded_and_linked_images() {
    let cache = Cache::with_limits(CacheLimits { max_bytes: 1 << 30, max_images: 2 });
    let trees: Vec<TempDir> = (0..4)
        .map(|i| {
            let t = TempDir::new("small-tree");
            fs::write(t.path().join("file"), format!("tree {i}\n")).unwrap();
            t
        })
        .collect();
    let a = cache.prepare(trees[0].path(), "a");
    let b = cache.prepare(trees[1].path(), "b");
    RootfsImages::release(&a.path).unwrap();
    RootfsImages::release(&a.path).unwrap();
    let c = cache.prepare(trees[2].path(), "c");
    let images = cache.files("images");
    assert_eq!(images, {
        let mut want = vec![format!("{}.erofs", b.key), format!("{}.erofs", c.key)];
        want.sort();
        want
    });

    // Everything in use: over the limit rather than take a container's image.
    let d = cache.prepare(trees[3].path(), "d");
    assert_eq!(cache.files("images").len(), 3);
    for img in [&b, &c, &d] {
        assert_eq!(fs::metadata(&img.path).unwrap().nlink(), 2, "{img:?}");
    }

    // Released, then the least recently used goes first: b, built before c, was used since.
    for img in [&b, &c, &d] {
        RootfsImages::release(&img.path).unwrap();
    }
    std::thread::sleep(Duration::from_millis(10));
    let b2 = cache.prepare(trees[1].path(), "b2");
    assert!(b2.from_cache);
    RootfsImages::release(&b2.path).unwrap();
    assert_eq!(cache.images.evict().unwrap(), 1);
    let left = cache.files("images");
    assert!(left.contains(&format!("{}.erofs", b.key)), "{left:?}");
    assert!(left.contains(&format!("{}.erofs", d.key)), "{left:?}");
}

#[test]
fn eviction_removes_temporary_files_of_dead_builds_only() {
    let cache = Cache::new();
    let tmp = cache.dir.path().join("cache/tmp");
    let dead = format!("{}.1.0.tmp", "a".repeat(64));
    let live = format!("{}.1.0.tmp", "b".repeat(64));
    fs::write(tmp.join(&dead), "").unwrap();
    fs::write(tmp.join(&live), "").unwrap();
    let building = lock(&cache.dir.path().join("cache/locks").join("b".repeat(64)), true).unwrap();
    cache.images.evict().unwrap();
    assert_eq!(cache.files("tmp"), [live]);
    drop(building);
}

#[test]
fn errors_say_what_is_wrong() {
    let cache = Cache::new();
    let link = cache.dir.path().join("c1");
    let missing = cache.dir.path().join("no-such-rootfs");
    let err = cache.images.prepare(&missing, &link).unwrap_err();
    assert!(matches!(err, Error::RootfsMissing(_)), "{err}");
    assert!(err.to_string().contains("does not exist"));

    let file = cache.dir.path().join("a-file");
    fs::write(&file, "").unwrap();
    let err = cache.images.prepare(&file, &link).unwrap_err();
    assert!(matches!(err, Error::RootfsNotDirectory(_)), "{err}");

    let err = RootfsImages::new(file.join("cache")).unwrap_err();
    assert!(matches!(err, Error::CacheNotWritable { .. }), "{err}");
    assert!(err.to_string().contains("not writable"), "{err}");

    let tree = TempDir::new("tree");
    let err = cache.images.prepare(tree.path(), &missing.join("link")).unwrap_err();
    assert!(matches!(err, Error::Link { .. }), "{err}");

    let err = mkfs::erofs(tree.path(), &missing.join("image")).unwrap_err();
    let Error::MkfsFailed { tool: "mkfs.erofs", stderr, .. } = &err else { panic!("{err}") };
    assert!(!stderr.is_empty(), "{err}");

    let cmd = Command::new("mkfs.husk-test-absent");
    let err = mkfs::run(cmd, "mkfs.husk-test-absent", "erofs-utils", tree.path(), None);
    let err = err.unwrap_err();
    assert!(matches!(err, Error::MkfsMissing { .. }), "{err}");
    assert!(err.to_string().contains("Debian package erofs-utils"), "{err}");
}

/// Timings for the rootfs section of docs/benchmarks.md (bench/run runs this): busybox, and
/// the Debian tree at HUSK_DEBIAN_ROOTFS (default /tmp/husk-debian-rootfs) if there is one.
/// By hand: `cargo test --release -p husk --bin husk rootfs_image::tests::timings -- --ignored
/// --nocapture`.
#[test]
#[ignore = "a measurement, not a test"]
fn timings() {
    let busybox = busybox_rootfs();
    let debian = std::env::var_os("HUSK_DEBIAN_ROOTFS")
        .map_or_else(|| PathBuf::from("/tmp/husk-debian-rootfs"), PathBuf::from);
    let mut trees = vec![("busybox", busybox.path().to_path_buf())];
    if debian.is_dir() {
        trees.push(("debian", debian));
    }
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    for (name, tree) in trees {
        let scan = key::scan(&tree).unwrap();
        let mut walks = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            key::scan(&tree).unwrap();
            walks.push(t.elapsed());
        }
        walks.sort();
        let cache = Cache::new();
        let t = Instant::now();
        let cold = cache.prepare(&tree, "cold");
        let cold_t = t.elapsed();
        let t = Instant::now();
        let hot = cache.prepare(&tree, "hot");
        let hot_t = t.elapsed();
        assert!(!cold.from_cache && hot.from_cache);
        let size = fs::metadata(&cold.path).unwrap().len();
        let ext4 = cache.dir.path().join("ext4");
        let t = Instant::now();
        mkfs::ext4(&tree, &ext4, &scan).unwrap();
        let ext4_t = t.elapsed();
        let ext4_used = fs::metadata(&ext4).unwrap().blocks() * 512;
        println!(
            "{name}: {} entries, {} MB; walk {} (median of 5); prepare cold {} ({}, {} MB), \
             cached {}; mkfs.ext4 -d alone {} ({} MB used)",
            scan.entries,
            scan.disk_bytes / 1_000_000,
            ms(walks[2]),
            ms(cold_t),
            cold.fstype.as_str(),
            size / 1_000_000,
            ms(hot_t),
            ms(ext4_t),
            ext4_used / 1_000_000
        );
    }
}
