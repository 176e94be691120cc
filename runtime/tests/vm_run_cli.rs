//! `husk vm run` as a user drives it: exit codes, console output, and the clear errors for bad
//! input, with tiny test guests on this machine's /dev/kvm.

use std::process::{Command, Output, Stdio};

use husk_tests::tiny_guest::{elf_image, Asm, TempDir, COM1};
use vmm::arch::layout::BOOT_TIMER_START;

fn husk() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_husk"));
    cmd.env_remove("HUSK_KERNEL").env_remove("HUSK_INITRD").stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("husk runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn hello_and_reset() -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_dx(COM1).print(b"hello from the guest\n").i8042_reset();
    elf_image(a.code())
}

#[test]
fn guest_reset_exits_zero_with_console_on_stdout() {
    let dir = TempDir::new("cli-reset");
    let kernel = dir.write("k.elf", &hello_and_reset());
    let out = run(husk().args(["vm", "run", "--mem-mib", "32", "--kernel"]).arg(&kernel));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from the guest\n");
}

#[test]
fn kernel_and_initrd_come_from_the_environment() {
    let dir = TempDir::new("cli-env");
    let kernel = dir.write("k.elf", &hello_and_reset());
    let initrd = dir.write("initrd", b"not really an initramfs");
    let console = dir.path().join("console");
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--console"])
        .arg(&console)
        .env("HUSK_KERNEL", &kernel)
        .env("HUSK_INITRD", &initrd));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&console).unwrap(), "hello from the guest\n");
    assert!(out.stdout.is_empty());
}

#[test]
fn husk_log_sets_the_log_level() {
    let dir = TempDir::new("cli-log");
    let mut a = Asm::new();
    a.mov_rbx(BOOT_TIMER_START).mov_at_rbx_byte(123).i8042_reset();
    let kernel = dir.write("k.elf", &elf_image(a.code()));
    let vm_run = || {
        let mut cmd = husk();
        cmd.args(["vm", "run", "--mem-mib", "32", "--kernel"]).arg(&kernel);
        cmd
    };
    let timer = "boot-timer: guest userspace after";
    let out = run(vm_run().env_remove("HUSK_LOG"));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(!stderr(&out).contains(timer), "warn by default; stderr: {}", stderr(&out));
    let out = run(vm_run().env("HUSK_LOG", "info"));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains(timer), "stderr: {}", stderr(&out));
    let out = run(vm_run().env("HUSK_LOG", "loud"));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid log level \"loud\""), "stderr: {}", stderr(&out));
}

#[test]
fn triple_fault_exits_non_zero_with_a_message() {
    let dir = TempDir::new("cli-crash");
    let mut a = Asm::new();
    a.lidt_empty().ud2();
    let kernel = dir.write("k.elf", &elf_image(a.code()));
    let out = run(husk().args(["vm", "run", "--mem-mib", "32", "--kernel"]).arg(&kernel));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("guest crashed: triple fault"), "stderr: {}", stderr(&out));
}

#[test]
fn sigint_stops_the_vm_with_128_plus_signal() {
    let dir = TempDir::new("cli-sigint");
    let mut a = Asm::new();
    a.mov_dx(COM1).print(b"up\n");
    let top = a.here();
    a.jmp_back(top);
    let kernel = dir.write("k.elf", &elf_image(a.code()));
    let mut child = husk()
        .args(["vm", "run", "--mem-mib", "32", "--kernel"])
        .arg(&kernel)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 3];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    assert_eq!(&first, b"up\n");
    // SAFETY: signals a child process we own and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGINT));
}

fn assert_fails_with(out: &Output, phrase: &str) {
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(out);
    assert!(err.contains(phrase), "expected {phrase:?} in stderr: {err}");
    assert!(!err.contains("panicked"), "no panic: {err}");
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let out = run(husk().args(["vm", "run", "--kernel", "/nonexistent/vmlinux"]));
    assert_fails_with(&out, "cannot open kernel /nonexistent/vmlinux: No such file or directory");
    assert_eq!(
        stderr(&out).matches("No such file").count(),
        1,
        "each cause once: {}",
        stderr(&out)
    );
}

#[test]
fn kernel_flag_is_required() {
    let out = run(husk().args(["vm", "run"]));
    assert_fails_with(&out, "--kernel");
}

#[test]
fn a_file_that_is_not_a_kernel_is_refused() {
    let dir = TempDir::new("cli-not-kernel");
    let junk = dir.write("junk", &[0x5a; 4096]);
    let out = run(husk().args(["vm", "run", "--mem-mib", "32", "--kernel"]).arg(&junk));
    assert_fails_with(&out, "is not a kernel");
}

#[test]
fn missing_initrd_is_a_clear_error() {
    let dir = TempDir::new("cli-no-initrd");
    let kernel = dir.write("k.elf", &hello_and_reset());
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--initrd", "/nonexistent/initrd", "--kernel"])
        .arg(&kernel));
    assert_fails_with(&out, "cannot read initramfs /nonexistent/initrd");
}

#[test]
fn initrd_larger_than_memory_is_a_clear_error() {
    let dir = TempDir::new("cli-big-initrd");
    let kernel = dir.write("k.elf", &hello_and_reset());
    let initrd = dir.write("initrd", &vec![0u8; 40 << 20]);
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--initrd"])
        .arg(&initrd)
        .arg("--kernel")
        .arg(&kernel));
    assert_fails_with(&out, "does not fit in guest memory");
}

#[test]
fn memory_sizes_out_of_range_are_refused() {
    let dir = TempDir::new("cli-mem");
    let kernel = dir.write("k.elf", &hello_and_reset());
    for mib in ["0", "8", "999999999"] {
        let out = run(husk().args(["vm", "run", "--mem-mib", mib, "--kernel"]).arg(&kernel));
        assert_fails_with(&out, &format!("guest memory of {mib} MiB is out of range"));
    }
    let out = run(husk().args(["vm", "run", "--mem-mib", "lots", "--kernel"]).arg(&kernel));
    assert_fails_with(&out, "invalid value 'lots'");
}

#[test]
fn memory_the_host_cannot_map_is_a_clear_error() {
    let dir = TempDir::new("cli-mem-map");
    let kernel = dir.write("k.elf", &hello_and_reset());
    // An address-space limit (util-linux's prlimit) below the guest's size makes the mapping fail.
    let out = run(Command::new("prlimit")
        .arg(format!("--as={}", 512u64 << 20))
        .arg(env!("CARGO_BIN_EXE_husk"))
        .args(["vm", "run", "--mem-mib", "1024", "--kernel"])
        .arg(&kernel)
        .stdin(Stdio::null()));
    assert_fails_with(&out, "cannot map 1024 MiB of guest memory");
    assert_eq!(stderr(&out).matches("Cannot allocate memory").count(), 1, "{}", stderr(&out));
}

#[test]
fn vcpu_counts_out_of_range_are_refused() {
    let dir = TempDir::new("cli-vcpus");
    let kernel = dir.write("k.elf", &hello_and_reset());
    let out =
        run(husk().args(["vm", "run", "--mem-mib", "32", "--vcpus", "0", "--kernel"]).arg(&kernel));
    assert_fails_with(&out, "0 vCPUs is out of range");
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--vcpus", "33", "--kernel"])
        .arg(&kernel));
    assert_fails_with(&out, "33 vCPUs is out of range (1 to 32)");
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--vcpus", "256", "--kernel"])
        .arg(&kernel));
    assert_fails_with(&out, "invalid value '256'");
}

#[test]
fn missing_dev_kvm_is_a_clear_error() {
    let dir = TempDir::new("cli-no-kvm");
    let kernel = dir.write("k.elf", &hello_and_reset());
    // A private mount namespace with an empty /dev.
    let out = run(Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs none /dev && exec \"$0\" \"$@\"",
        ])
        .arg(env!("CARGO_BIN_EXE_husk"))
        .args(["vm", "run", "--mem-mib", "32", "--console", "/proc/self/fd/2", "--kernel"])
        .arg(&kernel));
    assert_fails_with(&out, "/dev/kvm does not exist");
}

#[test]
fn no_permission_on_dev_kvm_is_a_clear_error() {
    let dir = TempDir::new("cli-kvm-perm");
    let kernel = dir.write("k.elf", &hello_and_reset());
    let binary = dir.path().join("husk");
    std::fs::copy(env!("CARGO_BIN_EXE_husk"), &binary).unwrap();
    for path in [dir.path(), binary.as_path(), kernel.as_path()] {
        let mode = if path.is_dir() || path == binary { 0o755 } else { 0o644 };
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    let out = run(Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(&binary)
        .args(["vm", "run", "--mem-mib", "32", "--console", "/dev/null", "--kernel"])
        .arg(&kernel));
    assert_fails_with(&out, "permission denied opening /dev/kvm");
}

#[test]
fn bad_disks_are_clear_errors() {
    let dir = TempDir::new("cli-disk");
    let kernel = dir.write("k.elf", &hello_and_reset());
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--disk", "/nonexistent/disk.img", "--kernel"])
        .arg(&kernel));
    assert_fails_with(&out, "/nonexistent/disk.img");
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--disk"])
        .arg(dir.path())
        .arg("--kernel")
        .arg(&kernel));
    assert_fails_with(&out, "is neither a regular file nor a block device");
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--disk", "x.img,fast", "--kernel"])
        .arg(&kernel));
    assert_fails_with(&out, "unknown disk option");
}

#[test]
fn bad_taps_are_clear_errors() {
    let dir = TempDir::new("cli-net");
    let kernel = dir.write("k.elf", &hello_and_reset());
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--net", "a-tap-name-far-too-long", "--kernel"])
        .arg(&kernel));
    assert_fails_with(&out, "a-tap-name-far-too-long");
    let out =
        run(husk().args(["vm", "run", "--mem-mib", "32", "--net", "lo", "--kernel"]).arg(&kernel));
    assert_fails_with(&out, "lo");
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--net", "tap0,mac=zz", "--kernel"])
        .arg(&kernel));
    assert_fails_with(&out, "invalid MAC address");
}

#[test]
fn a_tap_husk_created_is_gone_after_the_vm_ends() {
    let dir = TempDir::new("cli-tap-gone");
    let kernel = dir.write("k.elf", &hello_and_reset());
    let tap = format!("hkcli{}", std::process::id() % 100_000);
    let out =
        run(husk().args(["vm", "run", "--mem-mib", "32", "--net", &tap, "--kernel"]).arg(&kernel));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(!std::path::Path::new("/sys/class/net").join(&tap).exists(), "tap {tap} left behind");
}

#[test]
fn vsock_socket_errors_are_clear_and_the_socket_is_removed() {
    let dir = TempDir::new("cli-vsock");
    let kernel = dir.write("k.elf", &hello_and_reset());
    let out = run(husk()
        .args([
            "vm",
            "run",
            "--mem-mib",
            "32",
            "--vsock-uds",
            "/nonexistent/dir/v.sock",
            "--kernel",
        ])
        .arg(&kernel));
    assert_fails_with(&out, "/nonexistent/dir");

    let busy = dir.path().join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--vsock-uds"])
        .arg(&busy)
        .arg("--kernel")
        .arg(&kernel));
    assert_fails_with(&out, "in use");

    let uds = dir.path().join("v.sock");
    let out = run(husk()
        .args(["vm", "run", "--mem-mib", "32", "--vsock-uds"])
        .arg(&uds)
        .arg("--kernel")
        .arg(&kernel));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(!uds.exists(), "the vsock socket is removed when the VM ends");
}
