//! Cgroup v2 for containers: one cgroup per container under the agent's root (with the spec's
//! memory, cpu and pids limits), its OOM kill count, its processes, freezing, killing and
//! removing it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

/// The controllers the agent delegates to container cgroups when the root offers them.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error(
        "the cgroup v2 `{controller}` controller is not available in {path} (needed for {what})"
    )]
    MissingController { controller: &'static str, path: PathBuf, what: String },
    #[error("invalid resources: {0}")]
    Invalid(String),
    #[error("{path} did not {action} within {timeout:?}")]
    FreezeTimeout { path: PathBuf, action: &'static str, timeout: Duration },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_path_buf(), source }
}

/// The directory under which the agent makes container cgroups.
pub struct CgroupRoot {
    path: PathBuf,
}

impl CgroupRoot {
    /// Make `path` (a directory in a cgroup v2 hierarchy) ready: create it and delegate to its
    /// children the controllers it has (cpu, memory, pids).
    pub fn prepare(path: &Path) -> Result<Self, CgroupError> {
        fs::create_dir_all(path).map_err(io_err(path))?;
        let sfs = nix::sys::statfs::statfs(path)
            .map_err(|e| CgroupError::Io { path: path.to_path_buf(), source: e.into() })?;
        if sfs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
            return Err(CgroupError::NotCgroup2 { path: path.to_path_buf() });
        }
        // The root's controllers come from its parent (for the guest's PID 1, the hierarchy's
        // root): delegate them there first, then to the containers.
        if let Some(parent) = path.parent().filter(|p| p.join("cgroup.controllers").exists()) {
            delegate(parent);
        }
        delegate(path);
        Ok(Self { path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new cgroup for container `id` (an id is a valid path component). A leftover from an
    /// earlier container of that id is removed first if it is empty.
    pub fn create(&self, id: &str) -> Result<Cgroup, CgroupError> {
        let path = self.path.join(id);
        if path.exists() {
            fs::remove_dir(&path).map_err(io_err(&path))?;
        }
        fs::create_dir(&path).map_err(io_err(&path))?;
        Ok(Cgroup { path })
    }
}

/// One container's cgroup.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Apply the spec's memory, cpu and pids limits (and its `unified` entries), at create or
    /// as an update: what `r` leaves out (or gives as 0, as runc reads it) keeps its value.
    /// Other resources (devices, block I/O, hugepages, network, rdma, cpusets) are not limited
    /// inside the guest: the VM's own size bounds them.
    pub fn apply(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(mem) = r.memory() {
            let limit = mem.limit().filter(|&l| l != 0);
            if let Some(limit) = limit {
                self.set("memory", "memory.max", &max_or(limit), "a memory limit")?;
            }
            if let Some(low) = mem.reservation().filter(|&l| l != 0) {
                self.set("memory", "memory.low", &max_or(low), "a memory reservation")?;
            }
            if let Some(swap) = mem.swap().filter(|&s| s != 0) {
                // The spec's swap is memory + swap (cgroup v1); v2 limits swap alone. The
                // memory limit is this request's, else (an update) the one the cgroup has.
                let limit = limit.or_else(|| self.limit("memory.max"));
                let value = match (swap, limit) {
                    (-1, _) => "max".to_string(),
                    (s, Some(l)) if l > 0 && s >= l => (s - l).to_string(),
                    (s, l) => {
                        let l = l.filter(|&l| l > 0).map_or("none".into(), |l| l.to_string());
                        return Err(CgroupError::Invalid(format!(
                            "memory.swap {s} needs a memory.limit at most as large (limit: {l})"
                        )));
                    }
                };
                if self.has_no_swap() {
                    // The guest kernel has no swap at all (CONFIG_SWAP off), so there is nothing
                    // to limit. Docker asks for a swap limit whenever its own host has swap
                    // accounting, which says nothing about the guest's.
                    log::debug!("no swap in this kernel: swap limit {value} not needed");
                } else {
                    self.set("memory", "memory.swap.max", &value, "a swap limit")?;
                }
            }
        }
        if let Some(cpu) = r.cpu() {
            if let Some(shares) = cpu.shares().filter(|&s| s > 0) {
                // runc's conversion from v1 shares [2, 262144] to v2 weight [1, 10000].
                let shares = shares.clamp(2, 262_144);
                let weight = 1 + ((shares - 2) * 9999) / 262_142;
                self.set("cpu", "cpu.weight", &weight.to_string(), "cpu shares")?;
            }
            let quota = match cpu.quota() {
                Some(q) if q > 0 => Some(q.to_string()),
                Some(q) if q < 0 => Some("max".to_string()),
                _ => None,
            };
            let period = cpu.period().filter(|&p| p > 0);
            if (quota.is_some() || period.is_some()) && self.has_no_cpu_bandwidth() {
                // The guest kernel has the cpu controller without CFS bandwidth control
                // (CONFIG_CFS_BANDWIDTH off, as in the shared prebuilt kernel): no cpu.max. The
                // VM's vCPUs, ceil(quota / period) of them, still cap the container.
                log::warn!(
                    "no cpu.max in this kernel: cpu quota {quota:?} per {period:?} left to the \
                     vCPU count"
                );
            } else {
                self.set_cpu_max(quota, period)?;
            }
        }
        if let Some(pids) = r.pids().filter(|p| p.limit() != 0) {
            self.set("pids", "pids.max", &max_or(pids.limit()), "a pids limit")?;
        }
        if let Some(unified) = r.unified() {
            for (key, value) in unified {
                let ok = key.contains('.')
                    && !key.starts_with("cgroup.")
                    && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
                if !ok {
                    return Err(CgroupError::Invalid(format!("unified key {key:?}")));
                }
                let file = self.path.join(key);
                fs::write(&file, value).map_err(io_err(&file))?;
            }
        }
        Ok(())
    }

    /// A limit file's value, `max` as -1; None when it cannot be read.
    fn limit(&self, file: &str) -> Option<i64> {
        match fs::read_to_string(self.path.join(file)).ok()?.trim() {
            "max" => Some(-1),
            n => n.parse().ok(),
        }
    }

    /// The memory controller is on for this cgroup but the kernel has no swap to account.
    fn has_no_swap(&self) -> bool {
        self.path.join("memory.max").exists() && !self.path.join("memory.swap.max").exists()
    }

    /// cpu.max from the spec's quota and period ("QUOTA PERIOD"; written alone, the quota
    /// keeps the period).
    fn set_cpu_max(&self, quota: Option<String>, period: Option<u64>) -> Result<(), CgroupError> {
        match (quota, period) {
            (Some(q), Some(p)) => self.set("cpu", "cpu.max", &format!("{q} {p}"), "a cpu quota")?,
            (Some(q), None) => self.set("cpu", "cpu.max", &q, "a cpu quota")?,
            (None, Some(p)) => {
                let file = self.path.join("cpu.max");
                let current = fs::read_to_string(&file).unwrap_or_default();
                let q = current.split_whitespace().next().unwrap_or("max");
                self.set("cpu", "cpu.max", &format!("{q} {p}"), "a cpu period")?
            }
            (None, None) => {}
        }
        Ok(())
    }

    fn has_no_cpu_bandwidth(&self) -> bool {
        self.path.join("cpu.weight").exists() && !self.path.join("cpu.max").exists()
    }

    fn set(
        &self,
        controller: &'static str,
        file: &str,
        value: &str,
        what: &str,
    ) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        if !path.exists() {
            return Err(CgroupError::MissingController {
                controller,
                path: self.path.clone(),
                what: what.to_string(),
            });
        }
        fs::write(&path, value).map_err(io_err(&path))
    }

    /// How many times the kernel's OOM killer has killed a process of this cgroup (from
    /// `memory.events`); None without the memory controller.
    pub fn oom_kills(&self) -> Option<u64> {
        let events = fs::read_to_string(self.path.join("memory.events")).ok()?;
        events.lines().find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
    }

    /// The pids in the cgroup.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let procs = read(&self.path.join("cgroup.procs"))?;
        Ok(procs.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// SIGKILL every process in the cgroup (asynchronously, as the kernel does it).
    pub fn kill(&self) -> Result<(), CgroupError> {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            return fs::write(&kill, "1").map_err(io_err(&kill));
        }
        // Kernels before 5.14: one by one.
        for pid in self.pids()? {
            // SAFETY: kill takes a pid and a signal number; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        Ok(())
    }

    /// Freeze (or thaw) every process in the cgroup and wait until the kernel says it is done
    /// (`frozen 1` or `frozen 0` in cgroup.events). A freeze that does not complete within
    /// `timeout` (a process stuck in the kernel, say) is undone.
    pub fn set_frozen(&self, frozen: bool, timeout: Duration) -> Result<(), CgroupError> {
        let freeze = self.path.join("cgroup.freeze");
        fs::write(&freeze, if frozen { "1" } else { "0" }).map_err(io_err(&freeze))?;
        let events = self.path.join("cgroup.events");
        let done = if frozen { "frozen 1" } else { "frozen 0" };
        let deadline = Instant::now() + timeout;
        while !read(&events)?.lines().any(|l| l.trim() == done) {
            if Instant::now() >= deadline {
                if frozen {
                    let _ = fs::write(&freeze, "0");
                }
                let action = if frozen { "freeze" } else { "thaw" };
                return Err(CgroupError::FreezeTimeout {
                    path: self.path.clone(),
                    action,
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Remove the cgroup, waiting up to `timeout` for its killed processes to leave it.
    pub fn remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(CgroupError::Io { path: self.path.clone(), source: e }),
            }
        }
    }
}

/// Enable in `dir`'s subtree_control the wanted controllers `dir` has. Failing is not fatal
/// here: a container that asks for a limit then gets an error naming the missing controller.
fn delegate(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let subtree = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&subtree).unwrap_or_default();
    for c in CONTROLLERS {
        let has = |list: &str| list.split_whitespace().any(|a| a == c);
        if has(&available) && !has(&enabled) {
            if let Err(e) = fs::write(&subtree, format!("+{c}")) {
                log::warn!("cannot enable the {c} controller in {}: {e}", subtree.display());
            }
        }
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// A limit as cgroup v2 writes it: a negative one is "max".
fn max_or(v: i64) -> String {
    if v < 0 {
        "max".to_string()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Where this machine mounts cgroup v2.
    pub fn cgroup2_mount() -> PathBuf {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        let line = mounts
            .lines()
            .find(|l| l.split(' ').nth(2) == Some("cgroup2"))
            .expect("this test needs a cgroup v2 mount");
        PathBuf::from(line.split(' ').nth(1).unwrap())
    }

    #[test]
    fn create_track_kill_remove() {
        assert!(nix::unistd::geteuid().is_root(), "this test needs root (cgroups)");
        let root_path = cgroup2_mount().join(format!("husk-unit-{}", std::process::id()));
        let root = CgroupRoot::prepare(&root_path).unwrap();
        let cg = root.create("c1").unwrap();
        assert!(cg.pids().unwrap().is_empty());
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        fs::write(cg.path().join("cgroup.procs"), child.id().to_string()).unwrap();
        assert_eq!(cg.pids().unwrap(), vec![child.id() as i32]);
        // Removing a populated cgroup fails (after the timeout) ...
        assert!(cg.remove(Duration::from_millis(50)).is_err());
        cg.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        // ... and succeeds once its processes are gone.
        cg.remove(Duration::from_secs(5)).unwrap();
        assert!(!cg.path().exists());
        fs::remove_dir(&root_path).unwrap();
        // Not a cgroup v2 directory.
        let err = CgroupRoot::prepare(Path::new("/tmp")).err().unwrap();
        assert!(matches!(err, CgroupError::NotCgroup2 { .. }), "{err}");
    }

    #[test]
    fn limits_need_their_controller() {
        assert!(nix::unistd::geteuid().is_root(), "this test needs root (cgroups)");
        let root_path = cgroup2_mount().join(format!("husk-unit-limits-{}", std::process::id()));
        let root = CgroupRoot::prepare(&root_path).unwrap();
        let cg = root.create("c1").unwrap();
        let resources: LinuxResources =
            serde_json::from_str(r#"{"pids":{"limit":50},"memory":{"limit":67108864}}"#).unwrap();
        let available = fs::read_to_string(cg.path().join("cgroup.controllers")).unwrap();
        let result = cg.apply(&resources);
        if available.contains("memory") && available.contains("pids") {
            result.unwrap();
            assert_eq!(fs::read_to_string(cg.path().join("pids.max")).unwrap().trim(), "50");
            assert_eq!(
                fs::read_to_string(cg.path().join("memory.max")).unwrap().trim(),
                "67108864"
            );
            assert_eq!(cg.oom_kills(), Some(0));
        } else {
            // This machine's cgroup v2 lacks them: the error must say which.
            let err = result.unwrap_err();
            assert!(matches!(err, CgroupError::MissingController { .. }), "{err}");
            assert_eq!(cg.oom_kills(), None);
        }
        let bad: LinuxResources =
            serde_json::from_str(r#"{"unified":{"cgroup.procs":"1"}}"#).unwrap();
        assert!(matches!(cg.apply(&bad), Err(CgroupError::Invalid(_))));
        cg.remove(Duration::from_secs(1)).unwrap();
        fs::remove_dir(&root_path).unwrap();
    }
}
