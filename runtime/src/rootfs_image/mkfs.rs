//! Building an image of a tree: mkfs.erofs (uncompressed, owners, modes, times and xattrs as
//! they are), or mkfs.ext4 -d where erofs cannot be used.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::error::{Error, Result};
use super::key::Scan;

/// Build an erofs image of `tree` at `out`. No compression: measured on a 200 MB Debian tree,
/// lz4 makes the build about 40% slower for a third less space, and the guest then
/// decompresses on every page-cache miss.
pub(super) fn erofs(tree: &Path, out: &Path) -> Result<()> {
    let mut cmd = Command::new("mkfs.erofs");
    cmd.arg("--quiet").arg(out).arg(tree);
    run(cmd, "mkfs.erofs", "erofs-utils", tree, None)
}

/// Build an ext4 image of `tree` at `out`, sized from the walk: the tree's disk usage plus a
/// tenth, its inodes, and 16 MiB. No journal (the guest mounts it read-only) and no reserved
/// blocks; 256-byte inodes keep nanosecond timestamps. mke2fs gives the root directory its own
/// mode and a lost+found; debugfs then puts the tree's root mode back and removes lost+found
/// where the tree has none.
pub(super) fn ext4(tree: &Path, out: &Path, scan: &Scan) -> Result<()> {
    let inodes = scan.entries + scan.entries / 4 + 64;
    let bytes = scan.disk_bytes + scan.disk_bytes / 10 + inodes * 256 + (16 << 20);
    let kib = bytes.div_ceil(4096) * 4;
    let root = &scan.root;
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-b", "4096", "-I", "256", "-m", "0", "-O", "^has_journal"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg(format!("root_owner={}:{}", root.uid(), root.gid()))
        .arg("-d")
        .arg(tree)
        .arg(out)
        .arg(format!("{kib}k"));
    run(cmd, "mkfs.ext4", "e2fsprogs", tree, None)?;

    let mut fixes = format!("set_inode_field / mode 0{:o}\n", root.mode());
    if !tree.join("lost+found").exists() {
        fixes.push_str("rmdir lost+found\n");
    }
    let mut cmd = Command::new("debugfs");
    cmd.arg("-w").arg("-f").arg("-").arg(out);
    run(cmd, "debugfs", "e2fsprogs", tree, Some(fixes.as_bytes()))
}

/// Run a build tool, with `stdin` as its input if given, and turn its failure into an error
/// carrying what it printed.
pub(super) fn run(
    mut cmd: Command,
    tool: &'static str,
    package: &'static str,
    tree: &Path,
    stdin: Option<&[u8]>,
) -> Result<()> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let failed = |status: String, stderr: String| Error::MkfsFailed {
        tool,
        rootfs: tree.to_path_buf(),
        status,
        stderr,
    };
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MkfsMissing { tool, package },
        _ => failed("could not start".into(), e.to_string()),
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).map_err(|e| failed("writing its input".into(), e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| failed("wait".into(), e.to_string()))?;
    // debugfs reports failed commands on stderr but still exits 0.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complained = tool == "debugfs" && stderr.lines().any(|l| !l.starts_with("debugfs "));
    if out.status.success() && !complained {
        return Ok(());
    }
    let mut text = stderr.trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    Err(failed(out.status.to_string(), text))
}
