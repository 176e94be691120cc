//! Linux guests for end-to-end tests: `husk vm run` on the guest kernel with the test
//! initramfs plus a test's own `/test.sh`, its console in a file the test can watch.
//!
//! These need real KVM, which this project's machines only have inside the nested test host:
//! run them through `tests/nested/run` (`make test-e2e`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::cpio::Cpio;
use crate::tiny_guest::TempDir;

macro_rules! nested_timing {
    () => {
        "lpj=5000000 tsc_early_khz=2600000 no_timer_check"
    };
}

/// Kernel parameters for guests inside the nested test host, where PIT calibration does not
/// work at emulation speed: what husk's containers are given (husk adds `quiet` itself).
pub const NESTED_TIMING: &str = nested_timing!();

/// Kernel command line for guests that `husk vm run` boots inside the nested test host.
pub const NESTED_CMDLINE: &str = concat!("quiet ", nested_timing!());

/// How long a guest may take, boot included, before a test gives up on it.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_owned()
}

/// The guest kernel: `HUSK_TEST_KERNEL`, else the shared prebuilt one next to the repository.
pub fn guest_kernel() -> PathBuf {
    let path = std::env::var_os("HUSK_TEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/guest-kernel/vmlinux"));
    assert!(path.is_file(), "guest kernel {} is missing (set HUSK_TEST_KERNEL)", path.display());
    path
}

/// The test initramfs built by `make test-initramfs`.
pub fn test_initramfs() -> PathBuf {
    let path = repo_root().join("build/test-initramfs.cpio.gz");
    assert!(path.is_file(), "{} is missing: run `make test-initramfs`", path.display());
    path
}

/// The `husk` binary: the one on PATH (the nested test host puts the fresh build there).
pub fn husk_binary() -> PathBuf {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|dir| dir.join("husk")).find(|p| p.is_file())
    });
    from_path.unwrap_or_else(|| repo_root().join("target/release/husk"))
}

/// Fail with a clear message unless real KVM (hardware or emulated VMX/SVM) is available.
pub fn require_real_kvm() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_virt = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    assert!(
        has_virt && Path::new("/dev/kvm").exists(),
        "this end-to-end test boots Linux guests and needs real KVM (vmx/svm and /dev/kvm); \
         on machines without it run it inside the nested test host: make test-e2e"
    );
}

/// A bzImage to boot: `HUSK_TEST_BZIMAGE`, else Debian's installed kernel (linux-image-amd64).
pub fn bzimage_kernel() -> PathBuf {
    if let Some(path) = std::env::var_os("HUSK_TEST_BZIMAGE") {
        return PathBuf::from(path);
    }
    let mut installed: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    installed
        .retain(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")));
    installed.sort();
    installed.pop().expect("no bzImage: install linux-image-amd64 or set HUSK_TEST_BZIMAGE")
}

/// A guest to start.
pub struct GuestVm {
    dir: TempDir,
    kernel: PathBuf,
    script: Option<String>,
    args: Vec<String>,
}

impl GuestVm {
    /// A guest named `name` (for its temporary directory) with the default init behaviour.
    pub fn new(name: &str) -> Self {
        require_real_kvm();
        GuestVm { dir: TempDir::new(name), kernel: guest_kernel(), script: None, args: Vec::new() }
    }

    /// Boot `kernel` instead of the guest kernel.
    pub fn kernel(mut self, kernel: PathBuf) -> Self {
        self.kernel = kernel;
        self
    }

    /// The test's temporary directory (removed at the end).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Run `script` (a shell script, `#!/bin/sh` added) as `/test.sh` in the guest.
    pub fn script(mut self, script: &str) -> Self {
        self.script = Some(format!("#!/bin/sh\nset -e\n{script}\n"));
        self
    }

    /// Add flags to `husk vm run`.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    fn initrd(&self) -> PathBuf {
        let base = test_initramfs();
        let Some(script) = &self.script else {
            return base;
        };
        let mut bytes = std::fs::read(&base).expect("read the test initramfs");
        bytes.extend(Cpio::new().file("test.sh", 0o755, script.as_bytes()).finish());
        let path = self.dir.path().join("initrd.cpio");
        std::fs::write(&path, bytes).expect("write the test's initramfs");
        path
    }

    /// Start `husk vm run`.
    pub fn spawn(self) -> RunningGuest {
        let console = self.dir.path().join("console.log");
        let mut cmd = Command::new(husk_binary());
        cmd.args(["vm", "run", "--kernel"])
            .arg(&self.kernel)
            .arg("--initrd")
            .arg(self.initrd())
            .arg("--console")
            .arg(&console)
            .args(["--cmdline", NESTED_CMDLINE])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("start husk vm run");
        RunningGuest { child: Some(child), console, dir: Some(self.dir), started: Instant::now() }
    }

    /// Start the guest and wait for it to end.
    pub fn run(self) -> GuestResult {
        self.spawn().wait()
    }
}

/// A guest that is running.
pub struct RunningGuest {
    child: Option<Child>,
    console: PathBuf,
    /// Moved into the result when the guest ends, so that the test can still read its files.
    dir: Option<TempDir>,
    started: Instant,
}

/// What a finished guest left.
#[derive(Debug)]
pub struct GuestResult {
    /// husk's exit status.
    pub status: ExitStatus,
    /// Everything the guest printed on its console.
    pub console: String,
    /// husk's standard error.
    pub stderr: String,
    /// The exit status of `/test.sh`, if it ran to the end.
    pub test_exit: Option<i32>,
    /// The test's temporary directory, kept (with the disk images a test handed the guest)
    /// until the result is dropped.
    dir: Option<TempDir>,
}

impl GuestResult {
    /// The test's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("a result holds its directory").path()
    }

    /// The value printed by the guest on a line `key=value`.
    pub fn value(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}=");
        self.console
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix).map(str::to_owned))
    }

    /// Assert that husk exited 0 and `/test.sh` exited 0 too.
    pub fn assert_success(&self) {
        assert!(
            self.status.success() && self.test_exit == Some(0),
            "guest failed: husk {}, test.sh exit {:?}\n--- console ---\n{}\n--- husk stderr ---\n{}",
            self.status,
            self.test_exit,
            self.console,
            self.stderr
        );
    }
}

impl RunningGuest {
    /// The test's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("the guest has not finished").path()
    }

    /// The console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Wait until the console shows `marker`; panics (with the console) after `timeout` or if
    /// the guest ends first.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            if console.contains(marker) {
                return console;
            }
            let ended = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if ended.is_some() || Instant::now() > deadline {
                let result = self.finish();
                panic!(
                    "guest never printed {marker:?} ({:?} after start): {result:#?}",
                    self.started.elapsed()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the guest to end by itself (at most [`GUEST_TIMEOUT`]).
    pub fn wait(mut self) -> GuestResult {
        let deadline = self.started + GUEST_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return self.finish();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let result = self.finish();
        panic!("guest still running after {GUEST_TIMEOUT:?}: {result:#?}");
    }

    /// Collect the result, killing husk if it still runs.
    fn finish(&mut self) -> GuestResult {
        let mut child = self.child.take().expect("finished once");
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().expect("reap husk");
        let console = self.console();
        let test_exit = console.lines().find_map(|l| {
            l.trim_end_matches('\r').strip_prefix("HUSK-TEST-EXIT=").and_then(|v| v.parse().ok())
        });
        GuestResult {
            status: out.status,
            console,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            test_exit,
            dir: self.dir.take(),
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
