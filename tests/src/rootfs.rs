//! Container root file systems for tests: a busybox tree made from the host's static busybox,
//! and ext4 disk images of a tree (for guests that get their root file system on virtio-blk).

use std::path::Path;
use std::process::Command;

use crate::tiny_guest::TempDir;

/// A busybox root file system in a temporary directory: /bin/busybox with its applets linked,
/// /etc/passwd and /etc/group with root and a user 1000, and the usual mount points.
pub fn busybox_rootfs() -> TempDir {
    let busybox = Path::new("/bin/busybox");
    let file = Command::new("file").arg("-L").arg(busybox).output();
    let is_static = file
        .as_ref()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"));
    assert!(
        is_static,
        "busybox root file systems need a static /bin/busybox (Debian: busybox-static)"
    );
    let dir = TempDir::new("rootfs");
    let root = dir.path();
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc", "root", "home/user", "run"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let list = Command::new(busybox).arg("--list").output().unwrap();
    assert!(list.status.success(), "busybox --list failed");
    for applet in String::from_utf8_lossy(&list.stdout).lines().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    std::fs::set_permissions(
        root.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    dir
}

/// Copy the host's `program` into the root file system `root` with the shared libraries it
/// loads (as ldd lists them), each at its own path: a dynamically linked tool in a busybox tree.
pub fn add_host_program(root: &Path, program: &Path) {
    let ldd = Command::new("ldd").arg(program).output().expect("ldd runs");
    assert!(
        ldd.status.success(),
        "ldd {}: {}",
        program.display(),
        String::from_utf8_lossy(&ldd.stderr)
    );
    let libs = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')).map(str::to_string))
        .collect::<Vec<_>>();
    for file in libs.iter().map(Path::new).chain([program]) {
        let to = root.join(file.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(file, &to).unwrap_or_else(|e| panic!("copying {}: {e}", file.display()));
    }
}

/// An ext4 image of `tree` at `image`, `size_mib` large (e2fsprogs' mkfs.ext4 -d).
pub fn ext4_image(tree: &Path, image: &Path, size_mib: u32) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(tree)
        .arg(image)
        .arg(format!("{size_mib}M"))
        .output()
        .expect("mkfs.ext4 runs (e2fsprogs)");
    assert!(out.status.success(), "mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr));
}
