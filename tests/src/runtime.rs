//! The `husk` runtime driven as containerd's runc shim and people drive runc: a private
//! `--root`, bundles whose config.json points at one shared busybox root file system, the
//! guest kernel and image from the environment, and checks that nothing is left behind.
//! For the end-to-end suites, inside the nested test host.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent_vm::guest_image;
use crate::guest::{guest_kernel, husk_binary, require_real_kvm, NESTED_TIMING};
use crate::oci::{process, spec};
use crate::procfs::processes_mentioning;
use crate::rootfs::busybox_rootfs;
use crate::tiny_guest::TempDir;

/// A `--root` for husk with bundles next to it.
pub struct Husk {
    dir: TempDir,
    rootfs: TempDir,
}

impl Default for Husk {
    fn default() -> Self {
        Self::new()
    }
}

impl Husk {
    pub fn new() -> Self {
        require_real_kvm();
        // The tests wait for the VM processes they start, as containerd's shim does.
        // SAFETY: prctl with an integer argument only changes this process's attributes.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let dir = TempDir::new("e2e-runtime");
        // Twenty guests booting at once on the nested test host's one emulated vCPU take
        // minutes; the default boot timeout is for one.
        std::fs::write(dir.path().join("config.toml"), "boot_timeout_secs = 900\n").unwrap();
        Husk { dir, rootfs: busybox_rootfs() }
    }

    /// The state root: as long as Docker's (`/run/docker/runtime-runc/moby`, then a 64-digit
    /// id), so that its sockets' paths are longer than a socket address holds.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root").join("r".repeat(72))
    }

    /// The JSON log every command writes to.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("log.json")
    }

    /// The log and the guests' consoles, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = std::fs::read_to_string(self.log()).unwrap_or_default();
        for entry in std::fs::read_dir(self.root()).into_iter().flatten().flatten() {
            let console = std::fs::read_to_string(entry.path().join("console.log"));
            out.push_str(&format!("\n--- console of {:?}:\n", entry.file_name()));
            out.push_str(&console.unwrap_or_default());
        }
        out
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The shared busybox root file system.
    pub fn rootfs(&self) -> &Path {
        self.rootfs.path()
    }

    /// `husk --root ROOT --log LOG --log-format json ARGS...`, with the guest assets set.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(husk_binary());
        cmd.arg("--root")
            .arg(self.root())
            .arg("--log")
            .arg(self.log())
            .args(["--log-format", "json", "--debug"])
            .args(args)
            .env("HUSK_KERNEL", guest_kernel())
            .env("HUSK_INITRD", guest_image())
            .env("HUSK_KERNEL_CMDLINE", NESTED_TIMING)
            .env("HUSK_CACHE_DIR", self.dir.path().join("cache"))
            .env("HUSK_CONFIG", self.dir.path().join("config.toml"))
            .stdin(Stdio::null());
        cmd
    }

    /// Run a husk command to the end.
    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("husk runs")
    }

    /// Run a husk command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "husk {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run a husk command that must fail; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert_eq!(out.status.code(), Some(1), "husk {args:?} should fail with 1: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Run a husk command that leaves a process behind holding its stdio (create, run
    /// --detach, exec --detach: the container's stdio is what the command was given), with
    /// stdout and stderr in files `<name>.out` and `<name>.err`; it must succeed.
    pub fn ok_detached(&self, name: &str, args: &[&str]) {
        let out = self.dir.path().join(format!("{name}.out"));
        let err = self.dir.path().join(format!("{name}.err"));
        let status = self
            .cmd(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .expect("husk runs");
        assert!(
            status.success(),
            "husk {args:?} failed ({status}): {}\n{}",
            std::fs::read_to_string(&err).unwrap_or_default(),
            self.logs()
        );
    }

    /// What a detached command's processes wrote to stdout (see [`Husk::ok_detached`]).
    pub fn stdout_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.out"))).unwrap_or_default()
    }

    /// A bundle `name` with `config` as its config.json (root.path set to the shared rootfs).
    pub fn bundle_with(&self, name: &str, mut config: Value) -> PathBuf {
        let dir = self.dir.path().join("bundles").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        config["root"]["path"] = self.rootfs.path().to_str().unwrap().into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        dir
    }

    /// A bundle running `args`, without a terminal.
    pub fn bundle(&self, name: &str, args: &[&str]) -> PathBuf {
        self.bundle_with(name, spec(process(args)))
    }

    /// `husk state ID` as JSON.
    pub fn state(&self, id: &str) -> Value {
        serde_json::from_str(&self.ok(&["state", id])).expect("state prints JSON")
    }

    /// Create container `id` from `bundle`; returns its VM process's pid (from --pid-file).
    pub fn create(&self, id: &str, bundle: &Path) -> i32 {
        let pid_file = self.dir.path().join(format!("{id}.pid"));
        self.ok_detached(
            id,
            &[
                "create",
                "--bundle",
                bundle.to_str().unwrap(),
                "--pid-file",
                pid_file.to_str().unwrap(),
                id,
            ],
        );
        std::fs::read_to_string(pid_file).unwrap().trim().parse().expect("a pid in --pid-file")
    }

    /// Check that nothing of any container is left: no state directories, no husk processes
    /// using this root, no sockets.
    pub fn assert_nothing_left(&self) {
        let root = self.root();
        let left: Vec<_> = std::fs::read_dir(&root)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "state left under {}: {left:?}", root.display());
        let in_use = self.dir.path().join("cache/in-use");
        let held: Vec<_> = std::fs::read_dir(&in_use)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(held.is_empty(), "rootfs image links left in {}: {held:?}", in_use.display());
        let needle = root.to_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let procs = processes_mentioning(&needle);
            if procs.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "husk processes left: {procs:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Wait for a child of this (subreaper) process to exit; its exit code, 128 + signal when a
/// signal killed it.
pub fn wait_pid(pid: i32, timeout: Duration) -> i32 {
    try_wait_pid(pid, timeout)
        .unwrap_or_else(|| panic!("process {pid} did not exit within {timeout:?}"))
}

/// [`wait_pid`], `None` when the child is still running at the deadline.
pub fn try_wait_pid(pid: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG on a specific pid writes the status into `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid({pid}): {}", std::io::Error::last_os_error());
        if r == pid {
            let status = std::process::ExitStatus::from_raw(status);
            return Some(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Receive one descriptor sent with SCM_RIGHTS, the way containerd's console receiver takes
/// the pty master from a runtime: the message's data (runc sends the master's name) and the
/// descriptor.
pub fn recv_fd(stream: &std::os::unix::net::UnixStream) -> (String, std::os::fd::OwnedFd) {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut data = [0u8; 64];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    let mut control = [0u8; 64];
    // SAFETY: msghdr points at live buffers; the kernel fills at most their sizes, and the
    // control message is checked to be SCM_RIGHTS before its descriptor is taken.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, 0);
        assert!(n > 0, "recvmsg: {}", std::io::Error::last_os_error());
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(!cmsg.is_null() && (*cmsg).cmsg_type == libc::SCM_RIGHTS, "no SCM_RIGHTS");
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
        (
            String::from_utf8_lossy(&data[..n as usize]).into_owned(),
            std::os::fd::OwnedFd::from_raw_fd(fd),
        )
    }
}
