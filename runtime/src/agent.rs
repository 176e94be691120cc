//! The runtime's side of the agent protocol: a ttrpc client for the agent in a container's VM,
//! reached through the VM's hybrid vsock socket in the container's state directory.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_agent_protocol::agent as pb;
use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::hybrid_vsock;
use husk_agent_protocol::{AGENT_PORT, READY_PORT};

/// How long one request may take (creating a container mounts its rootfs; the slowest).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A request context with the default timeout.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(REQUEST_TIMEOUT.as_nanos() as i64)
}

/// A request context with no timeout (WaitProcess blocks until the process exits).
pub fn ctx_forever() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

/// Connect to the agent of the VM whose vsock socket is `vsock`.
pub fn connect(vsock: &Path) -> Result<AgentClient, hybrid_vsock::ConnectError> {
    let stream = hybrid_vsock::connect(vsock, AGENT_PORT)?;
    hybrid_vsock::agent_client(stream)
}

/// The host end of the agent's readiness signal: a Unix socket at `<vsock uds>_1026`
/// ([`READY_PORT`]), where the VMM brings the connection the agent makes once it serves.
/// Removed when dropped.
pub struct ReadySignal {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadySignal {
    /// Listen next to the VM's hybrid vsock socket `uds` (the path the VMM is given).
    pub fn listen(uds: &Path) -> io::Result<Self> {
        let path = vmm::devices::virtio::vsock::unix::service_path(uds, READY_PORT);
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        Ok(ReadySignal { listener, path })
    }

    /// Wait up to `timeout` for the agent's connection; whether it came.
    fn wait(&self, timeout: Duration) -> bool {
        // The connection itself carries nothing: take it and let it close.
        crate::readable::wait_readable(self.listener.as_fd(), timeout)
            && self.listener.accept().is_ok()
    }
}

impl Drop for ReadySignal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How often the health check is tried while the VM boots, at most: often enough for an agent
/// that does not signal readiness ([`ReadySignal`]), seldom enough not to keep the booting guest
/// answering refused connections.
const POLL_CAP: Duration = Duration::from_millis(50);

/// Wait until the agent of a booting VM answers a health check, while `vm_alive` says the VM
/// still runs; `None` when the VM ended or `timeout` passed. Between tries it sleeps, or with
/// `ready` waits for the agent's signal, which cuts the wait short.
pub fn wait_ready(
    vsock: &Path,
    timeout: Duration,
    ready: Option<&ReadySignal>,
    vm_alive: impl Fn() -> bool,
) -> Option<AgentClient> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    while start.elapsed() < timeout && vm_alive() {
        if let Ok(client) = connect(vsock) {
            let check = ttrpc::context::with_timeout(Duration::from_secs(5).as_nanos() as i64);
            if client.check(check, &pb::CheckRequest::new()).is_ok_and(|c| c.serving) {
                return Some(client);
            }
        }
        match ready {
            Some(ready) => {
                ready.wait(pause);
            }
            None => std::thread::sleep(pause),
        }
        pause = (pause * 2).min(POLL_CAP);
    }
    None
}

/// A ttrpc error as one line: the agent's message when it sent a status.
pub fn describe(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(status) => status.message().to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_signal_wakes_on_a_connection_and_removes_its_socket() {
        let tmp = husk_tests::tiny_guest::TempDir::new("ready-signal");
        let dir = tmp.path();
        let uds = dir.join("vsock.sock");
        let ready = ReadySignal::listen(&uds).unwrap();
        let socket = dir.join("vsock.sock_1026");
        assert!(!ready.wait(Duration::from_millis(10)), "nobody connected yet");
        // What the VMM does when the agent connects to the host's port 1026.
        drop(std::os::unix::net::UnixStream::connect(&socket).unwrap());
        assert!(ready.wait(Duration::from_secs(60)), "the connection is the signal");
        drop(ready);
        assert!(!socket.exists(), "the socket goes with the signal");
    }
}
