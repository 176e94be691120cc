//! The container's cgroup on the host: the spec's `linux.cgroupsPath` under the cgroup v2
//! hierarchy, which the VM process joins so that the host accounts the whole VM (guest memory,
//! vCPU threads, the VMM) to the container. containerd's runc shim finds the cgroup through the
//! VM process's pid and reads `docker stats` from it and watches it for OOM events, as it does
//! for runc's containers.
//!
//! No limit is set on the host: the guest enforces the spec's limits inside, on a VM sized from
//! them (a host limit on the VM would kill the whole VM where the guest kills one process).
//! Only cgroupfs-style paths (`/docker/<id>`) are used; a systemd-style one (`slice:prefix:name`,
//! with `--systemd-cgroup`) needs systemd to make the scope and is left alone, as is a host
//! without cgroup v2 at `/sys/fs/cgroup`. Joining is best effort: the container runs anyway.
//! `delete` removes the directory once the VM process is gone.

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;

/// Where cgroup v2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The controllers the shim reads stats from, enabled down to the container's cgroup where the
/// host has them.
const CONTROLLERS: [&str; 4] = ["cpu", "io", "memory", "pids"];

/// The container's host cgroup directory for `spec`, if it has a cgroupfs-style path and the
/// host has cgroup v2.
pub fn path(spec: &Spec) -> Option<PathBuf> {
    let wanted = spec.linux().as_ref()?.cgroups_path().as_ref()?;
    let text = wanted.to_str()?;
    if text.is_empty() || text.contains(':') {
        return None;
    }
    // Only plain names below the root: no `..`, nothing that leaves the hierarchy.
    let relative: PathBuf = wanted
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .map(|c| match c {
            Component::Normal(name) => Some(name),
            _ => None,
        })
        .collect::<Option<_>>()?;
    if relative.as_os_str().is_empty() {
        return None;
    }
    let root = Path::new(CGROUP_ROOT);
    root.join("cgroup.controllers").exists().then(|| root.join(relative))
}

/// Move this process (all its threads) into the container's host cgroup, making it and enabling
/// the stat controllers on the way. Failures are logged: the container runs without it.
pub fn join(spec: &Spec) {
    let Some(dir) = path(spec) else { return };
    if let Err(e) = try_join(&dir) {
        log::warn!("cannot join the host cgroup {}: {e}", dir.display());
    }
}

fn try_join(dir: &Path) -> std::io::Result<()> {
    let root = Path::new(CGROUP_ROOT);
    let mut parent = root.to_path_buf();
    for name in dir.strip_prefix(root).expect("path() joins onto the root").components() {
        enable_controllers(&parent);
        parent.push(name);
        match std::fs::create_dir(&parent) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
}

/// Enable in `dir`'s children the controllers of [`CONTROLLERS`] that `dir` has.
fn enable_controllers(dir: &Path) {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enable: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if enable.is_empty() {
        return;
    }
    if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), enable.join(" ")) {
        log::debug!("enabling {enable:?} in {}: {e}", dir.display());
    }
}

/// Remove the container's host cgroup (its VM process is gone, or is this process, as with
/// `husk run`: it moves to the root cgroup first); a missing one is fine.
pub fn remove(spec: &Spec) {
    let Some(dir) = path(spec) else { return };
    let ours = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let inside = ours.lines().any(|l| {
        l.strip_prefix("0::")
            .is_some_and(|p| Path::new(CGROUP_ROOT).join(p.trim_start_matches('/')) == dir)
    });
    if inside {
        let procs = Path::new(CGROUP_ROOT).join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            log::debug!("leaving {}: {e}", dir.display());
        }
    }
    match std::fs::remove_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            log::warn!("cannot remove the host cgroup {}: {e}", dir.display());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_path(path: &str) -> Spec {
        let mut spec = serde_json::to_value(Spec::default()).unwrap();
        spec["linux"]["cgroupsPath"] = path.into();
        serde_json::from_value(spec).unwrap()
    }

    #[test]
    fn only_plain_cgroupfs_paths_are_used() {
        let v2 = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
        let expect = |p: &str| v2.then(|| Path::new(CGROUP_ROOT).join(p));
        assert_eq!(path(&with_path("/docker/abc")), expect("docker/abc"));
        assert_eq!(path(&with_path("docker/./abc")), expect("docker/abc"));
        for refused in ["system.slice:docker:abc", "/docker/../../etc", "/", ""] {
            assert_eq!(path(&with_path(refused)), None, "{refused}");
        }
        assert_eq!(path(&Spec::default()), None);
    }
}
