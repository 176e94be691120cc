//! Test support: the built agent running as a host process (root) on Unix sockets, with its own
//! cgroup root, a busybox root file system made from the host's static busybox, OCI specs, and
//! a client for the service and the stdio streams.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use husk_agent_protocol::agent as pb;
use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::stream::{StreamHeader, StreamKind};
use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Fail with a clear message unless the test runs as root (namespaces, mounts, cgroups).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the agent's tests need root: run them as root");
}

pub use husk_tests::tiny_guest::TempDir;

/// Where this machine mounts cgroup v2.
pub fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(2) == Some("cgroup2"))
        .expect("the agent's tests need a cgroup v2 mount (cgroup2 in /proc/self/mounts)");
    PathBuf::from(line.split(' ').nth(1).unwrap())
}

pub use husk_tests::oci::{process, spec};
pub use husk_tests::rootfs::busybox_rootfs;

/// The built agent, running on Unix sockets in a temporary directory with its own cgroup root.
pub struct Agent {
    child: Option<Child>,
    dir: TempDir,
    cgroup_root: PathBuf,
    pub client: AgentClient,
    pid1: bool,
    /// This host's mount table when the agent started: the agent must never change it.
    host_mounts: String,
}

impl Agent {
    pub fn start() -> Self {
        Self::start_with(false, &[])
    }

    /// The agent with these environment variables set (its settings, as the kernel command
    /// line passes them to the guest's).
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        Self::start_with(false, env)
    }

    /// The agent as PID 1, as in the guest: in new pid, mount, UTS, cgroup and network
    /// namespaces (`unshare`), where it mounts its file systems (the cgroup v2 hierarchy
    /// included, at /sys/fs/cgroup; sysfs shows the namespace's own NICs), configures the
    /// network and where powering off ends the namespace.
    pub fn start_as_pid1() -> Self {
        Self::start_with(true, &[])
    }

    fn start_with(pid1: bool, env: &[(&str, &str)]) -> Self {
        require_root();
        let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = TempDir::new("run");
        let name = format!(
            "husk-agent-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // As PID 1 the agent mounts the cgroup v2 hierarchy on /sys/fs/cgroup itself, in its
        // own cgroup namespace (so that its mount options, nsdelegate, do not reach this
        // host's hierarchy): rooted at this test's cgroup.
        let (cgroup_root, agent_cgroup_root) = if pid1 {
            let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
            let own =
                own.lines().find_map(|l| l.strip_prefix("0::")).unwrap().trim_start_matches('/');
            (cgroup2_mount().join(own).join(&name), Path::new("/sys/fs/cgroup").join(&name))
        } else {
            (cgroup2_mount().join(&name), cgroup2_mount().join(&name))
        };
        let sock = dir.path().join("agent.sock");
        // HUSK_AGENT_BIN: another build of the agent (the static musl one of the guest image).
        let bin =
            std::env::var("HUSK_AGENT_BIN").unwrap_or(env!("CARGO_BIN_EXE_husk-agent").into());
        let mut cmd = if pid1 {
            let mut c = Command::new("unshare");
            let namespaces = ["--pid", "--fork", "--mount", "--uts", "--cgroup", "--net"];
            c.args(namespaces).args(["--propagation", "private", "--"]);
            c.arg(bin);
            c
        } else {
            Command::new(bin)
        };
        let mut child = cmd
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--stdio-listen")
            .arg(format!("unix:{}", dir.path().join("stdio.sock").display()))
            .arg("--cgroup-root")
            .arg(&agent_cgroup_root)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("HUSK_AGENT_LOG", std::env::var("HUSK_AGENT_LOG").unwrap_or("info".into()))
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting husk-agent");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("husk-agent: ready"),
            "the agent did not start (see its log above)"
        );
        let stream = UnixStream::connect(&sock).unwrap();
        let client = husk_agent_protocol::hybrid_vsock::agent_client(stream).unwrap();
        Self { child: Some(child), dir, cgroup_root, client, pid1, host_mounts }
    }

    /// The agent's pid (as this test sees it).
    pub fn pid(&self) -> u32 {
        let child = self.child.as_ref().unwrap().id();
        if !self.pid1 {
            return child;
        }
        // The agent is unshare's only child.
        let children =
            std::fs::read_to_string(format!("/proc/{child}/task/{child}/children")).unwrap();
        children.trim().parse().expect("unshare has one child, the agent")
    }

    /// Wait for the agent (or its unshare) to end.
    pub fn wait_exit(mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// The agent's state directory (each container's staging and copied host files).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The stdio streams' socket.
    pub fn stdio_socket(&self) -> PathBuf {
        self.dir.path().join("stdio.sock")
    }

    /// Open a stdio stream of a process (`exec` empty: the container's own).
    pub fn stream(&self, container: &str, exec: &str, kind: StreamKind) -> UnixStream {
        let mut s = UnixStream::connect(self.stdio_socket()).unwrap();
        let header = StreamHeader { container_id: container.into(), exec_id: exec.into(), kind };
        header.open(&mut s).unwrap_or_else(|e| panic!("opening {kind} of {container}/{exec}: {e}"));
        s
    }

    /// Try to open a stream, for tests of refusals.
    pub fn try_stream(
        &self,
        container: &str,
        exec: &str,
        kind: StreamKind,
    ) -> Result<UnixStream, husk_agent_protocol::stream::StreamError> {
        let mut s = UnixStream::connect(self.stdio_socket()).unwrap();
        let header = StreamHeader { container_id: container.into(), exec_id: exec.into(), kind };
        header.open(&mut s).map(|()| s)
    }

    /// Create a container from `spec` on the directory `rootfs` (overlay).
    pub fn create(
        &self,
        id: &str,
        spec: &Value,
        rootfs: &Path,
        stdio: (bool, bool, bool),
    ) -> ttrpc::Result<()> {
        self.client.create_container(ctx(), &create_request(id, spec, rootfs, stdio)).map(drop)
    }

    pub fn start_container(&self, id: &str) -> ttrpc::Result<()> {
        let mut req = pb::StartContainerRequest::new();
        req.container_id = id.into();
        self.client.start_container(ctx(), &req).map(drop)
    }

    pub fn exec(
        &self,
        id: &str,
        exec: &str,
        process: &Value,
        stdio: (bool, bool, bool),
    ) -> ttrpc::Result<()> {
        let mut req = pb::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.process_json = serde_json::to_vec(process).unwrap();
        req.stdio = Some(stdio_msg(stdio)).into();
        self.client.exec_process(ctx(), &req).map(drop)
    }

    pub fn wait(&self, id: &str, exec: &str) -> ttrpc::Result<pb::WaitProcessResponse> {
        let mut req = pb::WaitProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        self.client.wait_process(ctx(), &req)
    }

    pub fn signal(&self, id: &str, exec: &str, signal: i32) -> ttrpc::Result<()> {
        let mut req = pb::SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.signal = signal as u32;
        self.client.signal_process(ctx(), &req).map(drop)
    }

    pub fn remove(&self, id: &str, force: bool) -> ttrpc::Result<()> {
        let mut req = pb::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.force = force;
        self.client.remove_container(ctx(), &req).map(drop)
    }

    pub fn remove_process(&self, id: &str, exec: &str) -> ttrpc::Result<()> {
        let mut req = pb::RemoveProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        self.client.remove_process(ctx(), &req).map(drop)
    }

    pub fn pause(&self, id: &str) -> ttrpc::Result<()> {
        let mut req = pb::PauseContainerRequest::new();
        req.container_id = id.into();
        self.client.pause_container(ctx(), &req).map(drop)
    }

    pub fn resume(&self, id: &str) -> ttrpc::Result<()> {
        let mut req = pb::ResumeContainerRequest::new();
        req.container_id = id.into();
        self.client.resume_container(ctx(), &req).map(drop)
    }

    pub fn stats(&self, id: &str) -> ttrpc::Result<pb::StatsContainerResponse> {
        let mut req = pb::StatsContainerRequest::new();
        req.container_id = id.into();
        self.client.stats_container(ctx(), &req)
    }

    pub fn update(&self, id: &str, resources: &Value) -> ttrpc::Result<()> {
        let mut req = pb::UpdateContainerRequest::new();
        req.container_id = id.into();
        req.resources_json = serde_json::to_vec(resources).unwrap();
        self.client.update_container(ctx(), &req).map(drop)
    }

    /// Run `script` as an exec in container `id`: (stdout, stderr, exit status).
    pub fn exec_sh(&self, id: &str, exec: &str, script: &str) -> (String, String, i32) {
        self.exec(id, exec, &process(&["sh", "-c", script]), (false, true, true)).unwrap();
        let out = self.stream(id, exec, StreamKind::Stdout);
        let err = self.stream(id, exec, StreamKind::Stderr);
        let (out, err) = (read_all(out), read_all(err));
        let status = self.wait(id, exec).unwrap().exit_status;
        self.remove_process(id, exec).unwrap();
        (out, err, status)
    }

    /// The pids of a container's processes (in the agent's pid namespace).
    pub fn pids(&self, id: &str) -> Vec<i32> {
        let mut req = pb::ListProcessesRequest::new();
        req.container_id = id.into();
        let list = self.client.list_processes(ctx(), &req).unwrap();
        list.processes.iter().map(|p| p.pid).collect()
    }

    /// Create and start a container running `args` with stdout and stderr, read both to EOF
    /// and wait for it: (stdout, stderr, exit status).
    pub fn run(
        &self,
        id: &str,
        spec: &Value,
        rootfs: &Path,
    ) -> (String, String, pb::WaitProcessResponse) {
        self.create(id, spec, rootfs, (false, true, true)).unwrap();
        let out = self.stream(id, "", StreamKind::Stdout);
        let err = self.stream(id, "", StreamKind::Stderr);
        self.start_container(id).unwrap();
        let (out, err) = (read_all(out), read_all(err));
        let status = self.wait(id, "").unwrap();
        self.remove(id, false).unwrap();
        (out, err, status)
    }

    /// Shut the agent down through the protocol and check that it exits cleanly.
    pub fn shutdown(self) {
        self.client.shutdown(ctx(), &pb::ShutdownRequest::new()).unwrap();
        self.expect_clean_exit();
    }

    /// Ask the agent to shut down once no container is left (Shutdown with `when_idle`).
    pub fn shutdown_when_idle(&self) -> ttrpc::Result<()> {
        let mut req = pb::ShutdownRequest::new();
        req.when_idle = true;
        self.client.shutdown(ctx(), &req).map(drop)
    }

    /// Whether the agent answers a health check.
    pub fn serving(&self) -> bool {
        self.client.check(ctx(), &pb::CheckRequest::new()).is_ok_and(|c| c.serving)
    }

    /// Check that the agent exits, cleanly: status 0, its cgroup root removed, the host's mount
    /// table as it was.
    pub fn expect_clean_exit(self) {
        let root = self.cgroup_root.clone();
        let host_mounts = self.host_mounts.clone();
        let status = self.wait_exit(Duration::from_secs(10));
        assert_eq!(
            std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
            host_mounts,
            "the host's mount table changed while the agent ran"
        );
        assert!(status.success(), "the agent exited with {status}");
        assert!(!root.exists(), "the agent left its cgroup root behind");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.pid1 {
                // Killing unshare would leave the agent running: kill the agent, and with it
                // its pid namespace.
                let id = child.id();
                let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children"));
                for pid in children.unwrap_or_default().split_whitespace() {
                    if let Ok(pid) = pid.parse() {
                        // SAFETY: kill takes a pid and a signal; no memory is involved.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever the agent left: kill it and remove the cgroups.
        if let Ok(entries) = std::fs::read_dir(&self.cgroup_root) {
            for e in entries.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                for _ in 0..100 {
                    if std::fs::remove_dir(e.path()).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup_root);
    }
}

/// A CreateContainer request for `spec` on the directory `rootfs` (overlay).
pub fn create_request(
    id: &str,
    spec: &Value,
    rootfs: &Path,
    stdio: (bool, bool, bool),
) -> pb::CreateContainerRequest {
    let mut req = pb::CreateContainerRequest::new();
    req.container_id = id.into();
    req.oci_spec_json = serde_json::to_vec(spec).unwrap();
    let r = req.rootfs.mut_or_insert_default();
    r.set_directory(rootfs.display().to_string());
    r.mode = pb::RootfsMode::OVERLAY.into();
    req.stdio = Some(stdio_msg(stdio)).into();
    req
}

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

fn stdio_msg((stdin, stdout, stderr): (bool, bool, bool)) -> pb::Stdio {
    let mut s = pb::Stdio::new();
    s.stdin = stdin;
    s.stdout = stdout;
    s.stderr = stderr;
    s
}

/// Read a stream to EOF (with a deadline).
pub fn read_all(mut s: UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("reading a stream to EOF");
    String::from_utf8_lossy(&out).into_owned()
}

/// The code and message of a ttrpc error status.
pub fn status(e: ttrpc::Error) -> (ttrpc::Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    }
}
