//! The runtime's side of the agent protocol: a ttrpc client for the agent in a container's VM,
//! reached through the VM's hybrid vsock socket in the container's state directory.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_agent_protocol::agent as pb;
use husk_agent_protocol::agent_ttrpc::AgentClient;
use husk_agent_protocol::hybrid_vsock;
use husk_agent_protocol::AGENT_PORT;

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

/// Wait until the agent of a booting VM answers a health check, while `vm_alive` says the VM
/// still runs; `None` when the VM ended or `timeout` passed.
pub fn wait_ready(
    vsock: &Path,
    timeout: Duration,
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
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
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
