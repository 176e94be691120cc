//! A private Docker daemon for the Docker end-to-end suite (`tests/e2e/docker`): Debian's
//! dockerd with its own data root (a tmpfs, which overlay2 accepts where `/` is an overlay, as in
//! the nested test host), exec root, socket and pid file under a temporary directory, `--dns`
//! fixed; husk registered as the default runtime through a wrapper script that gives it the guest
//! assets and test settings (dockerd's environment does not reach the runtime through containerd
//! and its shim), runc as `--runtime runc`; images imported from root file system trees; and at
//! the end a check that nothing is left behind.
//!
//! The test process moves into its own network and mount namespaces first, so that dockerd's
//! bridge, iptables rules, published ports and mounts touch nothing of the machine's, nor of
//! another dockerd's, and go away with the process whatever happens.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use crate::agent_vm::guest_image;
use crate::guest::{guest_kernel, husk_binary, require_real_kvm, NESTED_TIMING};
use crate::procfs::{processes, processes_mentioning};
use crate::rootfs::busybox_rootfs;
use crate::tiny_guest::TempDir;

/// The Docker client of Debian's docker.io (another `docker` on PATH may be a different one).
pub const DOCKER: &str = "/usr/bin/docker";
/// Debian's dockerd.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// The name server every container gets in /etc/resolv.conf (TEST-NET-1: never answers).
pub const DNS: &str = "192.0.2.53";
/// The image made from the busybox root file system ([`busybox_rootfs`]).
pub const BUSYBOX_IMAGE: &str = "husk-e2e/busybox";
/// The image made from the Debian tree named by `HUSK_TEST_DEBIAN_ROOTFS`.
pub const DEBIAN_IMAGE: &str = "husk-e2e/debian";

/// How long dockerd may take to answer (the nested test host runs it at emulation speed).
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long dockerd may take to shut down.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`Dockerd::diagnostics`] may take.
const DIAGNOSTICS_TIMEOUT: Duration = Duration::from_secs(60);

/// The runtime a case's containers run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// husk, the daemon's default runtime: no `--runtime` flag.
    Husk,
    /// runc, `--runtime runc`: the oracle.
    Runc,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Husk => "husk",
            Runtime::Runc => "runc",
        }
    }

    /// The `docker run` flags that select it.
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            Runtime::Husk => &[],
            Runtime::Runc => &["--runtime", "runc"],
        }
    }
}

/// Fail with a clear message unless `tool` is on PATH.
fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()));
    assert!(found, "the Docker suite needs {tool} on PATH (Debian: {package})");
}

/// A command's status, stdout and stderr, for failure messages (long output cut short).
pub fn describe(out: &Output) -> String {
    let cut = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4000)]).into_owned();
        if bytes.len() > 4000 {
            format!("{text}... ({} bytes)", bytes.len())
        } else {
            text
        }
    };
    format!("{}\n--- stdout:\n{}\n--- stderr:\n{}", out.status, cut(&out.stdout), cut(&out.stderr))
}

/// Move this process into its own network and mount namespaces (mounts from outside still
/// propagate in, none propagate out), with loopback up. Must be called while this
/// process has one thread: namespaces are per thread, and threads started later inherit them.
fn isolate() {
    // SAFETY: unshare and mount with constant arguments change only this process's namespaces.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS),
            0,
            "unshare(CLONE_NEWNET | CLONE_NEWNS): {}",
            std::io::Error::last_os_error()
        );
        let root = c"/";
        let r = libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        );
        assert_eq!(r, 0, "making / a slave mount: {}", std::io::Error::last_os_error());
    }
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
}

/// Run `cmd` to the end; it must succeed. Its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The network interfaces of this process's network namespace.
fn links() -> Vec<String> {
    run_ok(Command::new("ip").args(["-o", "link", "show"]))
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|name| name.trim().split('@').next().unwrap_or_default().to_string())
        .collect()
}

/// The mount points at or below `dir`, from this process's mount table.
fn mounts_under(dir: &Path) -> Vec<String> {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.to_str().unwrap();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .map(str::to_string)
        .collect()
}

/// The entries of `dir` (none when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into()).collect())
        .unwrap_or_default()
}

/// The last `n` lines of the file at `path` (none if it cannot be read).
fn last_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The files under `dir` (and its subdirectories, not following links) called one of `names`.
fn files_named(dir: &Path, names: &[&str], found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(kind) = entry.file_type() else { continue };
        if kind.is_dir() {
            files_named(&entry.path(), names, found);
        } else if kind.is_file() && names.iter().any(|n| entry.file_name() == *n) {
            found.push(entry.path());
        }
    }
}

/// A private dockerd; see the module's documentation. [`Dockerd::stop`] ends it and checks for
/// leftovers; dropping it without that only ends dockerd.
pub struct Dockerd {
    dir: TempDir,
    child: Option<Child>,
    /// The network interfaces there were before dockerd started (loopback).
    links_before: Vec<String>,
    debian: OnceLock<()>,
}

impl Dockerd {
    /// Start dockerd and import the busybox image. With `husk` false (no husk case will run),
    /// husk's guest assets and KVM are not required, and the registered husk runtime refuses
    /// to run. Call while this process has one thread (see [`isolate`]).
    pub fn start(husk: bool) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the Docker suite runs dockerd: run it as root");
        for path in [DOCKER, DOCKERD] {
            assert!(Path::new(path).is_file(), "{path} is missing (Debian: docker.io)");
        }
        require_tool("containerd", "containerd");
        require_tool("containerd-shim-runc-v2", "containerd");
        require_tool("runc", "runc");
        require_tool("iptables", "iptables");
        require_tool("ip", "iproute2");
        require_tool("tar", "tar");
        isolate();
        let dir = TempDir::new("e2e-docker");
        let dockerd = Dockerd { links_before: links(), dir, child: None, debian: OnceLock::new() };
        dockerd.write_runtime_wrapper(husk);
        let data_root = dockerd.data_root();
        fs::create_dir_all(&data_root).unwrap();
        run_ok(
            Command::new("mount").args(["-t", "tmpfs", "-o", "mode=0711", "tmpfs"]).arg(&data_root),
        );
        let config = serde_json::json!({
            "runtimes": {"husk": {"path": dockerd.dir.path().join("husk-runtime")}},
            "default-runtime": "husk",
        });
        fs::write(dockerd.dir.path().join("daemon.json"), config.to_string()).unwrap();
        fs::create_dir_all(dockerd.dir.path().join("client")).unwrap();
        fs::create_dir_all(dockerd.dir.path().join("husk-logs")).unwrap();
        let log = fs::File::create(dockerd.dir.path().join("dockerd.log")).unwrap();
        let mut cmd = Command::new(DOCKERD);
        cmd.arg("--config-file")
            .arg(dockerd.dir.path().join("daemon.json"))
            .arg("--data-root")
            .arg(&data_root)
            .arg("--exec-root")
            .arg(dockerd.exec_root())
            .arg("--pidfile")
            .arg(dockerd.dir.path().join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", dockerd.socket().display()))
            .args(["--dns", DNS])
            // Its stdio is a file: it outlives every command whose output a test waits for.
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl with integer arguments only changes the child's attributes.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut dockerd = dockerd;
        dockerd.child = Some(cmd.spawn().expect("start dockerd"));
        dockerd.wait_ready();
        let default = dockerd.ok(&["info", "--format", "{{.DefaultRuntime}}"]);
        assert_eq!(default.trim(), "husk", "dockerd's default runtime");
        let rootfs = busybox_rootfs();
        dockerd.import(rootfs.path(), BUSYBOX_IMAGE, &[]);
        dockerd
    }

    /// The wrapper registered as the husk runtime: husk with the guest assets and the test
    /// settings, `--debug`, and its log (`--log`, in the container's bundle, which containerd
    /// removes with the container) copied to `husk-logs/<container id>.json` after each call.
    fn write_runtime_wrapper(&self, husk: bool) {
        let path = self.dir.path().join("husk-runtime");
        let script = if husk {
            require_real_kvm();
            let config = self.dir.path().join("husk-config.toml");
            // Containers boot one after another, but the nested test host is slow.
            fs::write(&config, "boot_timeout_secs = 900\n").unwrap();
            let logs = self.dir.path().join("husk-logs");
            format!(
                "#!/bin/sh\n\
                 # husk as this suite's dockerd runs it (see husk_tests::docker).\n\
                 export HUSK_KERNEL='{}' HUSK_INITRD='{}' HUSK_KERNEL_CMDLINE='{NESTED_TIMING}'\n\
                 export HUSK_CACHE_DIR='{}' HUSK_CONFIG='{}'\n\
                 log= prev=\n\
                 for arg in \"$@\"; do [ \"$prev\" = --log ] && log=$arg; prev=$arg; done\n\
                 '{}' --debug \"$@\"\n\
                 status=$?\n\
                 if [ -n \"$log\" ] && [ -f \"$log\" ]; then\n\
                 \tcp \"$log\" '{}'/\"$(basename \"$(dirname \"$log\")\")\".json\n\
                 fi\n\
                 exit $status\n",
                guest_kernel().display(),
                guest_image().display(),
                self.husk_cache().display(),
                config.display(),
                husk_binary().display(),
                logs.display(),
            )
        } else {
            "#!/bin/sh\necho 'husk is not set up: no husk case was selected' >&2\nexit 1\n".into()
        };
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn data_root(&self) -> PathBuf {
        self.dir.path().join("data-root")
    }

    /// dockerd's `--exec-root`: its state, containerd's, and the runtimes' `--root`s.
    fn exec_root(&self) -> PathBuf {
        self.dir.path().join("exec-root")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    fn husk_cache(&self) -> PathBuf {
        self.dir.path().join("husk-cache")
    }

    /// Wait until dockerd answers `docker info`.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = self.output(&["info"]);
            if out.status.success() {
                return;
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "dockerd did not come up ({}): {}\n--- dockerd log:\n{}",
                exited.map_or("timed out".into(), |s| format!("exited: {s}")),
                describe(&out),
                self.dockerd_log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// What this daemon is doing now, for a case that takes far too long: the last lines of the
    /// husk logs and guest consoles of the containers it runs, and its processes (docker
    /// clients, shims, husk and its VM processes) with each thread's kernel wait channel.
    /// Gathered on a thread of its own, for at most [`DIAGNOSTICS_TIMEOUT`]: reading a
    /// process's command line waits for its memory map, which a process stuck in the kernel
    /// may hold for ever; then what was gathered comes back, with the processes in
    /// uninterruptible sleep.
    pub fn diagnostics(&self) -> String {
        let needle = self.dir.path().to_str().unwrap().to_string();
        let exec_root = self.exec_root();
        let (pieces, gathered) = std::sync::mpsc::channel();
        // Detached: a read stuck for ever must not keep the suite from going on.
        std::thread::spawn(move || {
            let mut files = Vec::new();
            files_named(&exec_root, &["log.json", "console.log"], &mut files);
            for file in files {
                let _ =
                    pieces.send(format!("--- {}:\n{}\n", file.display(), last_lines(&file, 30)));
            }
            let mut out =
                String::from("--- processes of this dockerd (pid: args; threads: name@wchan):\n");
            for process in processes_mentioning(&needle) {
                let pid = process.split(':').next().unwrap_or_default();
                out.push_str(&process);
                out.push_str("\n    threads:");
                for task in entries(&Path::new("/proc").join(pid).join("task")) {
                    let dir = Path::new("/proc").join(pid).join("task").join(&task);
                    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
                    out.push_str(&format!(" {}@{}", read("comm").trim(), read("wchan").trim()));
                }
                out.push('\n');
            }
            let _ = pieces.send(out);
        });
        let deadline = Instant::now() + DIAGNOSTICS_TIMEOUT;
        let mut out = String::new();
        loop {
            match gathered.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(piece) => out.push_str(&piece),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return out,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
            }
        }
        // A process's stat takes no lock of its memory map.
        out.push_str(&format!(
            "--- the processes did not come within {DIAGNOSTICS_TIMEOUT:?}; in uninterruptible \
             sleep (/proc/PID/stat):\n"
        ));
        for process in processes().into_iter().filter(|p| p.state == 'D') {
            out.push_str(&process.line);
        }
        out
    }

    /// Kill the Docker clients this process runs (SIGKILL), so that a case waiting on one that
    /// hangs goes on and fails.
    pub fn kill_clients(&self) {
        let me = std::process::id() as i32;
        for process in processes() {
            if process.comm == "docker" && process.ppid == me {
                // SAFETY: kill(2) of a child of this process, which it has not reaped yet.
                unsafe { libc::kill(process.pid, libc::SIGKILL) };
            }
        }
    }

    /// dockerd's log (its last lines).
    fn dockerd_log(&self) -> String {
        last_lines(&self.dir.path().join("dockerd.log"), 60)
    }

    /// husk's logs of the containers it ran since `since` (the last lines of each).
    pub fn husk_logs_since(&self, since: SystemTime) -> String {
        let mut out = String::new();
        for entry in fs::read_dir(self.dir.path().join("husk-logs")).into_iter().flatten().flatten()
        {
            let recent = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t >= since);
            if !recent {
                continue;
            }
            out.push_str(&format!("--- husk log of container {:?}:\n", entry.file_name()));
            out.push_str(&last_lines(&entry.path(), 40));
            out.push('\n');
        }
        out
    }

    /// `docker -H <this daemon> ARGS...`, stdin from /dev/null.
    pub fn docker(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.env("DOCKER_CONFIG", self.dir.path().join("client"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Run a docker command to the end.
    pub fn output(&self, args: &[&str]) -> Output {
        self.docker(args).output().expect("run docker")
    }

    /// Run a docker command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(out.status.success(), "docker {args:?} failed: {}", describe(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `docker run <runtime's flags> ARGS...` (options, image, command) to the end.
    pub fn run(&self, runtime: Runtime, args: &[&str]) -> Output {
        let mut all = vec!["run"];
        all.extend_from_slice(runtime.flags());
        all.extend_from_slice(args);
        self.output(&all)
    }

    /// `docker inspect -f FORMAT NAME`, trimmed.
    pub fn inspect(&self, name: &str, format: &str) -> String {
        self.ok(&["inspect", "-f", format, name]).trim().to_string()
    }

    /// Import `tree` as image `name`: `tar -c` of it, less `exclude` (tar patterns), piped into
    /// `docker import`.
    fn import(&self, tree: &Path, name: &str, exclude: &[&str]) {
        let mut tar = Command::new("tar");
        tar.arg("-C").arg(tree).args(["--numeric-owner", "-c"]);
        for pattern in exclude {
            tar.arg(format!("--exclude={pattern}"));
        }
        let mut tar = tar.arg(".").stdout(Stdio::piped()).spawn().expect("run tar");
        let out = self
            .docker(&["import", "-", name])
            .stdin(tar.stdout.take().unwrap())
            .output()
            .expect("run docker import");
        let tar_status = tar.wait().unwrap();
        assert!(tar_status.success(), "tar -C {} failed: {tar_status}", tree.display());
        assert!(out.status.success(), "docker import {name} failed: {}", describe(&out));
    }

    /// The Debian image, imported on first use from the debootstrap tree that
    /// `HUSK_TEST_DEBIAN_ROOTFS` names (`make debian-rootfs`; `make test-e2e` sets it).
    pub fn debian_image(&self) -> &'static str {
        self.debian.get_or_init(|| {
            let tree = std::env::var_os("HUSK_TEST_DEBIAN_ROOTFS").map(PathBuf::from);
            let tree = tree.expect(
                "HUSK_TEST_DEBIAN_ROOTFS is not set: it names a Debian tree for the Debian image \
                 (`make debian-rootfs` makes build/debian-rootfs; `make test-e2e` sets it)",
            );
            assert!(
                tree.join("etc/debian_version").is_file(),
                "HUSK_TEST_DEBIAN_ROOTFS={} is not a Debian tree (no etc/debian_version): run \
                 `make debian-rootfs`",
                tree.display()
            );
            // Documentation and package lists: nothing a container here runs needs them.
            let slim =
                ["./usr/share/doc", "./usr/share/man", "./usr/share/locale", "./var/cache/apt/*"];
            self.import(&tree, DEBIAN_IMAGE, &slim);
        });
        DEBIAN_IMAGE
    }

    /// Remove every container and volume, stop dockerd (SIGTERM, wait), remove the bridge it
    /// made, unmount the data root, and check that nothing is left: no processes using the
    /// temporary directory (husk, shims, containerd), no network interfaces but those there
    /// were before, no network namespace mounts, no state under the runtimes' roots, no rootfs
    /// images in use, no container cgroups, no mounts. Returns what is wrong.
    pub fn stop(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let kinds: [(&[&str], &[&str]); 2] =
            [(&["ps", "-aq"], &["rm", "-f"]), (&["volume", "ls", "-q"], &["volume", "rm", "-f"])];
        for (list, remove) in kinds {
            let out = self.output(list);
            let names = String::from_utf8_lossy(&out.stdout).into_owned();
            let names: Vec<&str> = names.split_whitespace().collect();
            if !names.is_empty() {
                let out = self.output(&[remove, &names].concat());
                if !out.status.success() {
                    problems
                        .push(format!("docker {remove:?} {names:?} failed: {}", describe(&out)));
                }
            }
        }
        if let Some(problem) = self.end_dockerd() {
            problems.push(problem);
        }
        // dockerd leaves its bridge; nothing else of the network namespace is its to leave.
        let _ = Command::new("ip").args(["link", "del", "docker0"]).stderr(Stdio::null()).status();
        let left: Vec<String> =
            links().into_iter().filter(|l| !self.links_before.contains(l)).collect();
        if !left.is_empty() {
            problems.push(format!("network interfaces left: {left:?}"));
        }
        let needle = self.dir.path().to_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut procs = processes_mentioning(&needle);
        while !procs.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            procs = processes_mentioning(&needle);
        }
        if !procs.is_empty() {
            problems.push(format!("processes left: {procs:?}"));
        }
        let netns = entries(&self.exec_root().join("netns"));
        if !netns.is_empty() {
            problems.push(format!("network namespaces left under the exec root: {netns:?}"));
        }
        // containerd's runc shim runs each runtime with `--root <exec-root>/runtime-<name>/moby`;
        // dockerd 20.10 gives husk runc's (runtime-runc), later ones its own.
        for runtime in ["husk", "runc"] {
            let root = self.exec_root().join(format!("runtime-{runtime}/moby"));
            let state = entries(&root);
            if !state.is_empty() {
                problems.push(format!("{runtime} state left in {}: {state:?}", root.display()));
            }
        }
        // Docker's cgroupfs parent (cgroup v2): each container's cgroup, which husk's VM process
        // joins as runc's container process does, goes with the container.
        let cgroups: Vec<String> = std::fs::read_dir("/sys/fs/cgroup/docker")
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        if !cgroups.is_empty() {
            problems.push(format!("container cgroups left in /sys/fs/cgroup/docker: {cgroups:?}"));
        }
        let in_use = entries(&self.husk_cache().join("in-use"));
        if !in_use.is_empty() {
            problems.push(format!("husk rootfs images still in use: {in_use:?}"));
        }
        // SAFETY: umount2 of a path this harness mounted.
        let data_root = std::ffi::CString::new(self.data_root().to_str().unwrap()).unwrap();
        if unsafe { libc::umount2(data_root.as_ptr(), 0) } != 0 {
            problems.push(format!(
                "unmounting the data root: {}; mounts: {:?}",
                std::io::Error::last_os_error(),
                mounts_under(self.dir.path())
            ));
        }
        let mounts = mounts_under(self.dir.path());
        if !mounts.is_empty() {
            problems.push(format!("mounts left: {mounts:?}"));
        }
        if !problems.is_empty() {
            problems.push(format!("--- dockerd log:\n{}", self.dockerd_log()));
        }
        problems
    }

    /// SIGTERM dockerd and wait for it (SIGKILL after [`STOP_TIMEOUT`]); what went wrong.
    fn end_dockerd(&mut self) -> Option<String> {
        let mut child = self.child.take()?;
        // SAFETY: kill of the child this harness started and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait().unwrap() {
                Some(status) if status.success() => return None,
                Some(status) => return Some(format!("dockerd exited with {status} on SIGTERM")),
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        Some(format!("dockerd did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed)"))
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.end_dockerd();
        for mount in mounts_under(self.dir.path()).iter().rev() {
            let _ = Command::new("umount").args(["-l", mount]).status();
        }
    }
}
