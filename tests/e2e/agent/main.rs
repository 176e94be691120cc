//! The guest agent end to end: husk boots the guest kernel with `make guest-image`'s initramfs
//! (husk-agent as the guest's PID 1) inside the nested test host, and the tests drive the agent
//! the way the runtime will: ttrpc over husk's hybrid vsock on port 1024, stdio streams on
//! port 1025, the container's root file system an ext4 image on a virtio-blk disk.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_agent_protocol::agent as pb;
use husk_agent_protocol::agent_ttrpc::AgentClient;
use husk_agent_protocol::hybrid_vsock;
use husk_agent_protocol::stream::{StreamHeader, StreamKind};
use husk_agent_protocol::{AGENT_PORT, STDIO_PORT};
use husk_tests::guest::{guest_kernel, husk_binary, repo_root, require_real_kvm, NESTED_CMDLINE};
use husk_tests::oci::{process, spec};
use husk_tests::rootfs::{busybox_rootfs, ext4_image};
use husk_tests::tiny_guest::TempDir;
use serde_json::Value;

/// How long the guest may take to boot and answer a health check.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

/// The guest image built by `make guest-image`.
fn guest_image() -> PathBuf {
    let path = repo_root().join("build/guest-image.cpio.gz");
    assert!(path.is_file(), "{} is missing: run `make guest-image`", path.display());
    path
}

/// A husk micro-VM running the agent, with a busybox root file system as its disk /dev/vda.
struct AgentVm {
    child: std::process::Child,
    dir: TempDir,
    client: AgentClient,
}

impl AgentVm {
    fn boot() -> Self {
        require_real_kvm();
        let dir = TempDir::new("e2e-agent");
        let rootfs = busybox_rootfs();
        ext4_image(rootfs.path(), &dir.path().join("rootfs.img"), 32);
        let mut child = std::process::Command::new(husk_binary())
            .args(["vm", "run", "--mem-mib", "256", "--kernel"])
            .arg(guest_kernel())
            .arg("--initrd")
            .arg(guest_image())
            .arg("--disk")
            .arg(format!("{},ro", dir.path().join("rootfs.img").display()))
            .arg("--vsock-uds")
            .arg(dir.path().join("vsock"))
            .arg("--console")
            .arg(dir.path().join("console.log"))
            .args(["--cmdline", NESTED_CMDLINE])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start husk vm run");
        let client = wait_for_agent(&mut child, dir.path());
        AgentVm { child, dir, client }
    }

    fn console(&self) -> String {
        console(self.dir.path())
    }

    fn vsock(&self) -> PathBuf {
        self.dir.path().join("vsock")
    }

    /// Open a stdio stream of a process (`exec` empty: the container's own).
    fn stream(&self, container: &str, exec: &str, kind: StreamKind) -> UnixStream {
        let mut s = hybrid_vsock::connect(&self.vsock(), STDIO_PORT).expect("stdio port");
        let header = StreamHeader { container_id: container.into(), exec_id: exec.into(), kind };
        header.open(&mut s).unwrap_or_else(|e| panic!("opening {kind} of {container}/{exec}: {e}"));
        s
    }

    fn create(&self, id: &str, spec: &Value, stdio: (bool, bool, bool)) -> ttrpc::Result<()> {
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = serde_json::to_vec(spec).unwrap();
        let r = req.rootfs.mut_or_insert_default();
        let mut block = pb::BlockDevice::new();
        block.device = "/dev/vda".into();
        block.fstype = "ext4".into();
        r.set_block(block);
        r.mode = pb::RootfsMode::OVERLAY.into();
        let s = req.stdio.mut_or_insert_default();
        (s.stdin, s.stdout, s.stderr) = stdio;
        self.client.create_container(ctx(), &req).map(drop)
    }

    fn start(&self, id: &str) {
        let mut req = pb::StartContainerRequest::new();
        req.container_id = id.into();
        self.client.start_container(ctx(), &req).expect("StartContainer");
    }

    fn exec(&self, id: &str, exec: &str, process: &Value, stdio: (bool, bool, bool)) {
        let mut req = pb::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.process_json = serde_json::to_vec(process).unwrap();
        let s = req.stdio.mut_or_insert_default();
        (s.stdin, s.stdout, s.stderr) = stdio;
        self.client.exec_process(ctx(), &req).expect("ExecProcess");
    }

    fn wait(&self, id: &str, exec: &str) -> pb::WaitProcessResponse {
        let mut req = pb::WaitProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        self.client.wait_process(ctx(), &req).expect("WaitProcess")
    }

    fn signal(&self, id: &str, signal: i32) {
        let mut req = pb::SignalProcessRequest::new();
        req.container_id = id.into();
        req.signal = signal as u32;
        self.client.signal_process(ctx(), &req).expect("SignalProcess");
    }

    fn remove(&self, id: &str) {
        let mut req = pb::RemoveContainerRequest::new();
        req.container_id = id.into();
        self.client.remove_container(ctx(), &req).expect("RemoveContainer");
    }

    /// Run `args` in a new container and return its stdout and exit status.
    fn run(&self, id: &str, args: &[&str]) -> (String, pb::WaitProcessResponse) {
        self.create(id, &spec(process(args)), (false, true, false)).expect("CreateContainer");
        let out = self.stream(id, "", StreamKind::Stdout);
        self.start(id);
        let out = read_to_end(out);
        let status = self.wait(id, "");
        self.remove(id);
        (out, status)
    }

    /// Shut the guest down through the agent; husk must then exit 0.
    fn shutdown(mut self) {
        self.client.shutdown(ctx(), &pb::ShutdownRequest::new()).expect("Shutdown");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "husk still runs after Shutdown:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "husk exited {status} after Shutdown:\n{}", self.console());
        assert!(!Path::new(&self.vsock()).exists(), "husk removed its vsock socket");
    }
}

fn console(dir: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(dir.join("console.log")).unwrap_or_default())
        .into_owned()
}

/// A client of the agent in the VM `husk` runs in `dir`, once it answers a health check.
fn wait_for_agent(husk: &mut std::process::Child, dir: &Path) -> AgentClient {
    let start = Instant::now();
    loop {
        if let Ok(stream) = hybrid_vsock::connect(&dir.join("vsock"), AGENT_PORT) {
            let client = hybrid_vsock::agent_client(stream).expect("a ttrpc client");
            if client.check(ctx(), &pb::CheckRequest::new()).is_ok_and(|c| c.serving) {
                return client;
            }
        }
        if let Ok(Some(status)) = husk.try_wait() {
            panic!("husk ended ({status}) before the agent answered:\n{}", console(dir));
        }
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = husk.kill();
            let _ = husk.wait();
            panic!("the agent did not answer within {BOOT_TIMEOUT:?}:\n{}", console(dir));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for AgentVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_to_end(mut s: UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("reading a stream to EOF");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn containers_run_from_a_disk_with_their_output_and_exit_codes() {
    let vm = AgentVm::boot();
    let version = vm.client.version(ctx(), &pb::VersionRequest::new()).expect("Version");
    assert_eq!(version.protocol_version, husk_agent_protocol::PROTOCOL_VERSION);

    let (out, status) = vm.run("echo", &["sh", "-c", "echo hello from $(hostname); uname -r"]);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello from husk-test"), "{out:?}");
    let guest_release = lines.next().unwrap_or_default().to_owned();
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(guest_release, host_release.trim(), "the container runs on the guest's kernel");
    assert_eq!((status.exit_status, status.signal), (0, 0));

    let (_, status) = vm.run("three", &["sh", "-c", "exit 3"]);
    assert_eq!((status.exit_status, status.signal), (3, 0));

    vm.create("sleeper", &spec(process(&["sleep", "1000"])), (false, false, false)).unwrap();
    vm.start("sleeper");
    vm.signal("sleeper", libc::SIGKILL);
    let status = vm.wait("sleeper", "");
    assert_eq!((status.exit_status, status.signal), (137, 9));
    vm.remove("sleeper");

    // A bad spec is refused with a clear error, and the agent goes on serving.
    let err = vm.create("bad", &serde_json::json!({"process": 7}), (false, false, false));
    let ttrpc::Error::RpcStatus(status) = err.expect_err("a bad spec is refused") else {
        panic!("expected an error status")
    };
    assert_eq!(status.code(), ttrpc::Code::INVALID_ARGUMENT, "{}", status.message());
    let (out, _) = vm.run("after", &["echo", "still serving"]);
    assert_eq!(out, "still serving\n");
    vm.shutdown();
}

#[test]
fn exec_into_a_running_container_with_stdin_to_eof() {
    let vm = AgentVm::boot();
    vm.create("box", &spec(process(&["sleep", "1000"])), (false, false, false)).unwrap();
    vm.start("box");

    // 1 MiB through `sha256sum` in the container: stdin to EOF, the digest back.
    let mut cat = process(&["sha256sum"]);
    cat["cwd"] = "/tmp".into();
    vm.exec("box", "sum", &cat, (true, true, false));
    let mut stdin = vm.stream("box", "sum", StreamKind::Stdin);
    let stdout = vm.stream("box", "sum", StreamKind::Stdout);
    let data: Vec<u8> =
        (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    stdin.write_all(&data).unwrap();
    stdin.shutdown(std::net::Shutdown::Write).unwrap();
    let out = read_to_end(stdout);
    let mut sha = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sha.stdin.take().unwrap().write_all(&data).unwrap();
    let host = String::from_utf8(sha.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(out.split_whitespace().next(), host.split_whitespace().next());
    assert_eq!(vm.wait("box", "sum").exit_status, 0);

    let mut fails = process(&["sh", "-c", "exit 5"]);
    fails["env"] = serde_json::json!(["PATH=/bin"]);
    vm.exec("box", "five", &fails, (false, false, false));
    assert_eq!(vm.wait("box", "five").exit_status, 5, "an exec has its own exit code");

    vm.signal("box", libc::SIGKILL);
    assert_eq!(vm.wait("box", "").exit_status, 137);
    vm.remove("box");
    vm.shutdown();
}
