//! A container's root file system, set up by its helper in the container's new mount namespace
//! (nothing here is visible to the agent, and it all goes away with the namespace): the rootfs
//! (a directory or a disk, read-only, writable or under a tmpfs overlay), the spec's mounts,
//! device nodes, pivot_root, masked and read-only paths.

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{open, OFlag};
use nix::mount::{umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{LinuxDeviceType, Mount};

use super::config::{CreateSetup, RootfsMode, RootfsSource};
use super::mounts::{kept_flags, mount, parse_options, propagation, resolve_in_root};
use crate::container::spec::Ns;

/// Set up the root file system and switch to it. `cgroup` is the container's cgroup directory
/// (for a `cgroup` mount without a cgroup namespace). [`lock_down`] finishes it.
pub fn setup(c: &CreateSetup, cgroup: &Path) -> Result<(), String> {
    // Nothing mounted from here on may propagate back to the agent's namespace.
    mount(None, Path::new("/"), None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)?;
    // Staging: a tmpfs of this namespace only (the overlay's upper layer lives here too).
    mount(
        Some(Path::new("tmpfs")),
        &c.staging,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700"),
    )?;
    let root = c.staging.join("root");
    mkdir(&root)?;
    mount_rootfs(c, &root)?;

    let spec = &c.spec;
    let cgroupns = c.namespaces.has(Ns::Cgroup);
    let mut dev_mounted = false;
    for m in spec.mounts().iter().flatten() {
        mount_one(&root, m, cgroup, cgroupns)?;
        dev_mounted |= m.destination() == Path::new("/dev");
    }
    let linux = spec.linux().as_ref();
    if dev_mounted {
        default_devices(&root)?;
    }
    for d in linux.and_then(|l| l.devices().as_ref()).into_iter().flatten() {
        let path = resolve_in_root(&root, d.path())?;
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            LinuxDeviceType::A => return Err(format!("device {}: type a", d.path().display())),
        };
        let mode = Mode::from_bits_truncate(d.file_mode().unwrap_or(0o666));
        node(&path, kind, mode, d.major() as u64, d.minor() as u64)?;
        if d.uid().is_some() || d.gid().is_some() {
            nix::unistd::chown(
                &path,
                d.uid().map(nix::unistd::Uid::from_raw),
                d.gid().map(nix::unistd::Gid::from_raw),
            )
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
        }
    }

    pivot_root(&root)
}

/// After the hostname and sysctls are set (through /proc/sys, which is usually one of the
/// read-only paths), as runc orders it: mask and make read-only the spec's paths, set the
/// root's propagation, and make the root read-only if asked.
pub fn lock_down(c: &CreateSetup) -> Result<(), String> {
    let spec = &c.spec;
    let linux = spec.linux().as_ref();
    for p in linux.and_then(|l| l.masked_paths().as_ref()).into_iter().flatten() {
        mask(Path::new(p))?;
    }
    for p in linux.and_then(|l| l.readonly_paths().as_ref()).into_iter().flatten() {
        readonly(Path::new(p))?;
    }
    if let Some(p) = linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        let flags = propagation(p).ok_or_else(|| format!("rootfsPropagation {p:?}"))?;
        mount(None, Path::new("/"), None, flags, None)?;
    }
    let root_ro = spec.root().as_ref().and_then(|r| r.readonly()).unwrap_or(false);
    if root_ro || c.mode == RootfsMode::ReadOnly {
        let keep = kept_flags(Path::new("/"));
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | keep;
        mount(None, Path::new("/"), None, flags, None)?;
    }
    Ok(())
}

fn mount_rootfs(c: &CreateSetup, root: &Path) -> Result<(), String> {
    let lower = c.staging.join("lower");
    match (&c.rootfs, c.mode) {
        (RootfsSource::Directory(dir), RootfsMode::Overlay) => {
            mkdir(&lower)?;
            let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount(Some(dir), &lower, None, flags, None)?;
            overlay(&c.staging, &lower, root)
        }
        (RootfsSource::Directory(dir), _) => {
            let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount(Some(dir), root, None, flags, None)
        }
        (RootfsSource::Block { device, fstype }, mode) => {
            let (target, flags) = match mode {
                RootfsMode::Overlay => (&lower, MsFlags::MS_RDONLY),
                RootfsMode::ReadOnly => (&root.to_path_buf(), MsFlags::MS_RDONLY),
                RootfsMode::Writable => (&root.to_path_buf(), MsFlags::empty()),
            };
            if mode == RootfsMode::Overlay {
                mkdir(&lower)?;
            }
            wait_for_capacity(device, DISK_CAPACITY_TIMEOUT)?;
            mount(Some(device), target, Some(fstype), flags, None)?;
            if mode == RootfsMode::Overlay {
                overlay(&c.staging, &lower, root)?;
            }
            Ok(())
        }
    }
}

/// How long a disk may take to show its capacity.
const DISK_CAPACITY_TIMEOUT: Duration = Duration::from_secs(5);

/// Wait until block device `device` (/dev/NAME) has a size: a guest restored from a snapshot
/// taken with an empty disk learns its disk's capacity from a configuration change, which its
/// kernel handles on a work queue, shortly after the restore.
fn wait_for_capacity(device: &Path, timeout: Duration) -> Result<(), String> {
    let Some(name) = device.file_name() else {
        return Err(format!("{} is not a device path", device.display()));
    };
    let size = Path::new("/sys/class/block").join(name).join("size");
    let start = Instant::now();
    loop {
        let sectors = std::fs::read_to_string(&size)
            .map_err(|e| format!("{}: {e}", size.display()))?
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{}: {e}", size.display()))?;
        if sectors > 0 {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(format!("{} is empty (no capacity after {timeout:?})", device.display()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An overlay of `lower` with its upper layer on the staging tmpfs, mounted on `root`.
fn overlay(staging: &Path, lower: &Path, root: &Path) -> Result<(), String> {
    let (upper, work) = (staging.join("upper"), staging.join("work"));
    mkdir(&upper)?;
    mkdir(&work)?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(Some(Path::new("overlay")), root, Some("overlay"), MsFlags::empty(), Some(&data))
}

fn mount_one(root: &Path, m: &Mount, cgroup: &Path, cgroupns: bool) -> Result<(), String> {
    let typ = m.typ().as_deref().unwrap_or("");
    let opts = parse_options(m.options().as_deref().unwrap_or_default());
    let dest = resolve_in_root(root, m.destination())?;
    let mut flags = opts.flags;
    let mut source = m.source().clone();
    let mut fstype = Some(typ);
    if typ == "cgroup" || typ == "cgroup2" {
        if cgroupns {
            // The cgroup namespace roots the new mount at the container's cgroup.
            fstype = Some("cgroup2");
            source = Some(PathBuf::from("cgroup2"));
        } else {
            // Without one, show only the container's own cgroup.
            flags |= MsFlags::MS_BIND | MsFlags::MS_REC;
            source = Some(cgroup.to_path_buf());
        }
    }
    let bind = flags.contains(MsFlags::MS_BIND) || typ == "bind";
    if bind {
        let src = source
            .as_deref()
            .ok_or_else(|| format!("bind mount on {} has no source", m.destination().display()))?;
        let is_dir = fs::metadata(src)
            .map_err(|e| format!("bind mount source {}: {e}", src.display()))?
            .is_dir();
        if is_dir {
            mkdir_all(&dest)?;
        } else {
            if let Some(parent) = dest.parent() {
                mkdir_all(parent)?;
            }
            if !dest.exists() {
                fs::File::create(&dest).map_err(|e| format!("creating {}: {e}", dest.display()))?;
            }
        }
        let base = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
        mount(Some(src), &dest, None, base, None)?;
        let rest = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !rest.is_empty() {
            let remount = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | rest | kept_flags(&dest);
            mount(None, &dest, None, remount, None)?;
        }
    } else {
        mkdir_all(&dest)?;
        let src = source.unwrap_or_else(|| PathBuf::from(typ));
        mount(Some(&src), &dest, fstype, flags, Some(&opts.data))?;
    }
    for p in opts.propagation {
        mount(None, &dest, None, p, None)?;
    }
    Ok(())
}

/// The device nodes every container gets in its /dev (as runc makes them), and the usual links.
fn default_devices(root: &Path) -> Result<(), String> {
    let dev = root.join("dev");
    let rw = Mode::from_bits_truncate(0o666);
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        node(&dev.join(name), SFlag::S_IFCHR, rw, major, minor)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
        ("core", "/proc/kcore"),
    ] {
        let link = dev.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink(target, &link).map_err(|e| format!("symlink {}: {e}", link.display()))?;
        }
    }
    Ok(())
}

fn node(path: &Path, kind: SFlag, mode: Mode, major: u64, minor: u64) -> Result<(), String> {
    if fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        mkdir_all(parent)?;
    }
    // mknod applies the umask; the mode is set exactly below.
    mknod(path, kind, mode, makedev(major, minor))
        .map_err(|e| format!("mknod {}: {e}", path.display()))?;
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        path,
        mode,
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// pivot_root to `root` and drop the old root (runc's way: pivot_root(".", "."), then unmount
/// the old root, which sits on top of the new one).
fn pivot_root(root: &Path) -> Result<(), String> {
    let oflags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let old = open("/", oflags, Mode::empty()).map_err(|e| format!("open /: {e}"))?;
    let new =
        open(root, oflags, Mode::empty()).map_err(|e| format!("open {}: {e}", root.display()))?;
    nix::unistd::fchdir(new.as_fd()).map_err(|e| format!("chdir to the new root: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    nix::unistd::fchdir(old.as_fd()).map_err(|e| format!("chdir to the old root: {e}"))?;
    mount(None, Path::new("."), None, MsFlags::MS_SLAVE | MsFlags::MS_REC, None)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("unmounting the old root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))
}

/// Hide `p`: /dev/null over a file, an empty read-only tmpfs over a directory.
fn mask(p: &Path) -> Result<(), String> {
    match fs::metadata(p) {
        Err(_) => Ok(()),
        Ok(md) if md.is_dir() => {
            mount(Some(Path::new("tmpfs")), p, Some("tmpfs"), MsFlags::MS_RDONLY, None)
        }
        Ok(_) => mount(Some(Path::new("/dev/null")), p, None, MsFlags::MS_BIND, None),
    }
}

/// Make `p` read-only: bind it on itself, then remount the bind read-only.
fn readonly(p: &Path) -> Result<(), String> {
    if fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    mount(Some(p), p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | kept_flags(p);
    mount(None, p, None, flags, None)
}

fn mkdir(p: &Path) -> Result<(), String> {
    fs::DirBuilder::new().mode(0o755).create(p).map_err(|e| format!("mkdir {}: {e}", p.display()))
}

fn mkdir_all(p: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(p)
        .map_err(|e| format!("mkdir {}: {e}", p.display()))
}
