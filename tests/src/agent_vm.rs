//! A husk micro-VM running the guest agent (`make guest-image`), driven the way the runtime
//! will drive it: ttrpc over husk's hybrid vsock on port 1024, stdio streams on port 1025, a
//! busybox root file system as an ext4 image on virtio-blk (/dev/vda). For the end-to-end
//! suites and benchmarks, which run it inside the nested test host.

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_agent_protocol::agent as pb;
use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::hybrid_vsock;
use husk_agent_protocol::stream::{StreamHeader, StreamKind};
use husk_agent_protocol::AGENT_PORT;
use serde_json::Value;

use crate::guest::{guest_kernel, husk_binary, repo_root, require_real_kvm, NESTED_CMDLINE};
use crate::oci::{process, spec};
use crate::rootfs::{busybox_rootfs, ext4_image};
use crate::tiny_guest::TempDir;

/// How long the guest may take to boot and answer a health check.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

/// The guest image built by `make guest-image`.
pub fn guest_image() -> PathBuf {
    let path = repo_root().join("build/guest-image.cpio.gz");
    assert!(path.is_file(), "{} is missing: run `make guest-image`", path.display());
    path
}

/// A husk micro-VM running the agent, with a busybox root file system as its disk /dev/vda.
pub struct AgentVm {
    child: std::process::Child,
    dir: TempDir,
    /// The agent service.
    pub client: AgentClient,
}

impl AgentVm {
    /// Boot the guest kernel with the guest image and wait until the agent answers.
    pub fn boot() -> Self {
        Self::boot_with("", &[]).0
    }

    /// Boot as [`AgentVm::boot`] with `extra_cmdline` appended to the kernel command line and
    /// a host listener for each of `host_ports`, bound before the guest boots: the Unix
    /// sockets `<vsock>_<port>` where husk's VMM takes the guest's connections to the host's
    /// (CID 2) vsock port.
    pub fn boot_with(extra_cmdline: &str, host_ports: &[u32]) -> (Self, Vec<UnixListener>) {
        require_real_kvm();
        let dir = TempDir::new("e2e-agent");
        let listeners = host_ports
            .iter()
            .map(|port| UnixListener::bind(dir.path().join(format!("vsock_{port}"))).unwrap())
            .collect();
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
            .args(["--cmdline", &format!("{NESTED_CMDLINE} {extra_cmdline}")])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start husk vm run");
        let client = wait_for_agent(&mut child, dir.path());
        (AgentVm { child, dir, client }, listeners)
    }

    /// The next connection the guest made to one of the host ports `boot_with` listened on
    /// (within a minute; the test fails with the console otherwise).
    pub fn accept_from_guest(&self, listener: &UnixListener) -> UnixStream {
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "no connection from the guest:\n{}",
                        self.console()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn
    }

    /// The guest's console so far.
    pub fn console(&self) -> String {
        console(self.dir.path())
    }

    /// husk's hybrid vsock socket.
    pub fn vsock(&self) -> PathBuf {
        self.dir.path().join("vsock")
    }

    /// Open a stdio stream of a process (`exec` empty: the container's own).
    pub fn stream(&self, container: &str, exec: &str, kind: StreamKind) -> UnixStream {
        let header = StreamHeader { container_id: container.into(), exec_id: exec.into(), kind };
        hybrid_vsock::open_stream(&self.vsock(), &header)
            .unwrap_or_else(|e| panic!("opening {kind} of {container}/{exec}: {e:?}"))
    }

    /// CreateContainer on the busybox disk (overlay) with the stdio streams `stdio` names.
    pub fn create(&self, id: &str, spec: &Value, stdio: (bool, bool, bool)) -> ttrpc::Result<()> {
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

    /// StartContainer.
    pub fn start(&self, id: &str) {
        let mut req = pb::StartContainerRequest::new();
        req.container_id = id.into();
        self.client.start_container(ctx(), &req).expect("StartContainer");
    }

    /// ExecProcess `process` as `exec` in container `id`.
    pub fn exec(&self, id: &str, exec: &str, process: &Value, stdio: (bool, bool, bool)) {
        let mut req = pb::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.process_json = serde_json::to_vec(process).unwrap();
        let s = req.stdio.mut_or_insert_default();
        (s.stdin, s.stdout, s.stderr) = stdio;
        self.client.exec_process(ctx(), &req).expect("ExecProcess");
    }

    /// WaitProcess (`exec` empty: the container's own).
    pub fn wait(&self, id: &str, exec: &str) -> pb::WaitProcessResponse {
        let mut req = pb::WaitProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        self.client.wait_process(ctx(), &req).expect("WaitProcess")
    }

    /// SignalProcess to the container's own process.
    pub fn signal(&self, id: &str, signal: i32) {
        let mut req = pb::SignalProcessRequest::new();
        req.container_id = id.into();
        req.signal = signal as u32;
        self.client.signal_process(ctx(), &req).expect("SignalProcess");
    }

    /// RemoveContainer.
    pub fn remove(&self, id: &str) {
        let mut req = pb::RemoveContainerRequest::new();
        req.container_id = id.into();
        self.client.remove_container(ctx(), &req).expect("RemoveContainer");
    }

    /// Run `args` in a new container and return its stdout and exit status.
    pub fn run(&self, id: &str, args: &[&str]) -> (String, pb::WaitProcessResponse) {
        self.create(id, &spec(process(args)), (false, true, false)).expect("CreateContainer");
        let out = self.stream(id, "", StreamKind::Stdout);
        self.start(id);
        let out = read_to_end(out);
        let status = self.wait(id, "");
        self.remove(id);
        (out, status)
    }

    /// Shut the guest down through the agent; husk must then exit 0.
    pub fn shutdown(self) {
        self.client.shutdown(ctx(), &pb::ShutdownRequest::new()).expect("Shutdown");
        self.expect_power_off();
    }

    /// Shutdown with `when_idle`: the agent powers the VM off once no container is left.
    pub fn shutdown_when_idle(&self) {
        let mut req = pb::ShutdownRequest::new();
        req.when_idle = true;
        self.client.shutdown(ctx(), &req).expect("Shutdown when_idle");
    }

    /// Whether husk's VM process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The guest powers off: husk exits 0 (within a minute) and removes its vsock socket.
    pub fn expect_power_off(mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "husk still runs after the guest was to power off:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "husk exited {status} at power-off:\n{}", self.console());
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

/// Read a stream to EOF (with a deadline).
pub fn read_to_end(mut s: UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("reading a stream to EOF");
    String::from_utf8_lossy(&out).into_owned()
}

/// Read from `s` into `seen` until it contains `marker`, each read within `timeout`.
pub fn read_until(s: &mut UnixStream, seen: &mut String, marker: &str, timeout: Duration) {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    while !seen.contains(marker) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "EOF before {marker:?}; got {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}
