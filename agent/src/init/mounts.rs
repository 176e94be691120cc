//! Mount helpers for setting up a container's root: the OCI mount options as mount(2) flags and
//! data, paths resolved inside the new root without escaping it through symlinks, and mount(2)
//! with errors that name what failed.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;

/// The parsed options of one OCI mount.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub flags: MsFlags,
    /// Propagation changes to apply after the mount (MS_SHARED, MS_PRIVATE, ... with MS_REC).
    pub propagation: Vec<MsFlags>,
    /// What mount(2) gets as data: the options that are not flags, comma-joined.
    pub data: String,
}

/// Parse OCI mount options (as `mount(8)` takes them).
pub fn parse_options<S: AsRef<str>>(options: &[S]) -> Options {
    let mut o = Options { flags: MsFlags::empty(), propagation: Vec::new(), data: String::new() };
    let mut data = Vec::new();
    for opt in options {
        let opt = opt.as_ref();
        let (set, flag) = match opt {
            "defaults" => (true, MsFlags::empty()),
            "ro" => (true, MsFlags::MS_RDONLY),
            "rw" => (false, MsFlags::MS_RDONLY),
            "suid" => (false, MsFlags::MS_NOSUID),
            "nosuid" => (true, MsFlags::MS_NOSUID),
            "dev" => (false, MsFlags::MS_NODEV),
            "nodev" => (true, MsFlags::MS_NODEV),
            "exec" => (false, MsFlags::MS_NOEXEC),
            "noexec" => (true, MsFlags::MS_NOEXEC),
            "sync" => (true, MsFlags::MS_SYNCHRONOUS),
            "async" => (false, MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (true, MsFlags::MS_DIRSYNC),
            "remount" => (true, MsFlags::MS_REMOUNT),
            "mand" => (true, MsFlags::MS_MANDLOCK),
            "nomand" => (false, MsFlags::MS_MANDLOCK),
            "atime" => (false, MsFlags::MS_NOATIME),
            "noatime" => (true, MsFlags::MS_NOATIME),
            "diratime" => (false, MsFlags::MS_NODIRATIME),
            "nodiratime" => (true, MsFlags::MS_NODIRATIME),
            "bind" => (true, MsFlags::MS_BIND),
            "rbind" => (true, MsFlags::MS_BIND | MsFlags::MS_REC),
            "relatime" => (true, MsFlags::MS_RELATIME),
            "norelatime" => (false, MsFlags::MS_RELATIME),
            "strictatime" => (true, MsFlags::MS_STRICTATIME),
            "nostrictatime" => (false, MsFlags::MS_STRICTATIME),
            "silent" => (true, MsFlags::MS_SILENT),
            "loud" => (false, MsFlags::MS_SILENT),
            _ => {
                if let Some(p) = propagation(opt) {
                    o.propagation.push(p);
                } else if opt != "tmpcopyup" {
                    // runc's tmpcopyup is not a kernel option; everything else is data.
                    data.push(opt);
                }
                continue;
            }
        };
        if set {
            o.flags |= flag;
        } else {
            o.flags &= !flag;
        }
    }
    o.data = data.join(",");
    o
}

/// A propagation option's flags.
pub fn propagation(opt: &str) -> Option<MsFlags> {
    let rec = MsFlags::MS_REC;
    Some(match opt {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | rec,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | rec,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | rec,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | rec,
        _ => return None,
    })
}

/// `path` (absolute, as the container sees it) as a path under `root`, with every symlink on
/// the way resolved as if `root` were `/`, so that no symlink in the container's file system
/// can point a mount outside it. Components that do not exist are taken as they are.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, String> {
    const MAX_LINKS: usize = 40;
    let mut pending: VecDeque<OsString> = components(path);
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let candidate = root.join(&resolved).join(&c);
        match std::fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(format!("too many symlinks resolving {}", path.display()));
                }
                let target = std::fs::read_link(&candidate)
                    .map_err(|e| format!("reading symlink {}: {e}", candidate.display()))?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                let mut next = components(&target);
                next.extend(pending);
                pending = next;
            }
            _ => resolved.push(c),
        }
    }
    Ok(root.join(resolved))
}

fn components(p: &Path) -> VecDeque<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// mount(2), with an error that says what was mounted where.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    let data = data.filter(|d| !d.is_empty());
    nix::mount::mount(source, target, fstype, flags, data).map_err(|e| {
        format!(
            "mount {} on {}{}{}: {e}",
            source.map_or("none".into(), |s| s.display().to_string()),
            target.display(),
            fstype.map_or(String::new(), |t| format!(" type {t}")),
            data.map_or(String::new(), |d| format!(" ({d})")),
        )
    })
}

/// The flags a mount has now that a bind remount must keep (a remount sets them all anew).
pub fn kept_flags(path: &Path) -> MsFlags {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let Ok(st) = statvfs(path) else { return MsFlags::empty() };
    let f = st.flags();
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
    ] {
        if f.contains(fs) {
            out |= ms;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn options() {
        let o = parse_options(&["nosuid", "strictatime", "mode=755", "size=65536k", "rprivate"]);
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME);
        assert_eq!(o.data, "mode=755,size=65536k");
        assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        let o = parse_options(&["rbind", "ro", "rw", "tmpcopyup"]);
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(o.data, "");
    }

    #[test]
    fn symlinks_stay_inside_the_root() {
        let dir = husk_tests::tiny_guest::TempDir::new("resolve");
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("real/dir")).unwrap();
        symlink("/real", root.join("abs")).unwrap();
        symlink("../../..", root.join("real/up")).unwrap();
        symlink("/real/dir", root.join("etc")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        let r = |p: &str| resolve_in_root(&root, Path::new(p));
        assert_eq!(r("/abs/dir").unwrap(), root.join("real/dir"));
        // Up past the root stays at the root; absolute targets start again from it.
        assert_eq!(r("/real/up/etc/passwd").unwrap(), root.join("real/dir/passwd"));
        assert_eq!(r("/../../x").unwrap(), root.join("x"));
        assert_eq!(r("/new/a/b").unwrap(), root.join("new/a/b"));
        assert!(r("/loop").unwrap_err().contains("too many symlinks"));
    }
}
