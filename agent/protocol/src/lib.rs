//! husk's agent protocol: what the runtime (on the host) and the guest agent (`husk-agent`, PID 1
//! in the micro-VM) say to each other.
//!
//! # Transport
//!
//! The agent listens on two vsock ports in the guest:
//!
//! - [`AGENT_PORT`] (1024, the port Kata uses): a ttrpc server for the `husk.agent.v1.Agent`
//!   service in `proto/agent.proto` (generated at build time into [`agent`] and [`agent_ttrpc`]
//!   by ttrpc-codegen's pure-Rust parser; no `protoc` is needed). The runtime is the client:
//!   [`hybrid_vsock::connect`] opens husk's hybrid vsock to the port, and
//!   [`hybrid_vsock::agent_client`] puts a [`client::AgentClient`] on it (husk's own client:
//!   ttrpc's generated one wakes up every 10 ms while its connection is open; see [`client`]).
//! - [`STDIO_PORT`] (1025): process stdio, one connection per stream (below).
//!
//! Once both listen, the agent connects to the host's [`READY_PORT`] (1026) and closes the
//! connection: the host may wait for that instead of polling the health check.
//!
//! Both serve the host (vsock CID 2) only: a connection from inside the guest (the loopback
//! transport, CID 1 or the guest's own) is closed as soon as it is accepted.
//!
//! On a host (tests), the agent listens on Unix sockets instead; the protocol is the same.
//!
//! # Requests
//!
//! OCI documents travel as JSON bytes of the OCI runtime spec (`config.json`, or its `process`
//! object for an exec), not as a protobuf mirror of the spec: the spec evolves, both sides
//! already have serde types for it, and a mirror would be a second schema to keep in step.
//! Ids follow [`valid_id`]; the empty exec id names a container's own process. Errors are ttrpc
//! statuses whose message says what was wrong (see the comments in `proto/agent.proto`).
//!
//! # Stdio streams
//!
//! A process's stdin, stdout and stderr, or its terminal, are plain byte streams, each on its
//! own connection to [`STDIO_PORT`]: no request/response polling, so throughput is the
//! connection's. The host opens a connection and sends one header line ([`stream`]):
//!
//! ```text
//! HUSK-STDIO <container-id> <exec-id or -> <stdin|stdout|stderr|tty>\n
//! ```
//!
//! and the agent answers `OK\n`, after which the connection is the stream, or `ERR <reason>\n`
//! and closes it. Which streams a process has is fixed when it is created (the `Stdio` message;
//! a terminal process has only `tty`); each can be attached once.
//!
//! - `stdout`, `stderr`: the process's output, byte for byte. The agent writes only as fast as
//!   the host reads (back-pressure reaches the process through its pipe), and shuts down the
//!   write side of the connection once the process and everything that inherited the pipe have
//!   closed it. Nothing is lost when the host attaches late: until then the output waits in the
//!   pipe, and a process that fills it blocks. The agent closes the connection only after the
//!   host closed its end, so the host may take the last bytes as slowly as it likes: a closed
//!   guest vsock socket would be reset by the guest kernel 8 s later, losing what the host had
//!   not read yet. The host closes the connection once it has read EOF.
//! - `stdin`: what the host writes reaches the process's stdin; when the host shuts down its
//!   write side (or closes), the agent closes the process's stdin, which then reads EOF.
//! - `tty`: both directions of the process's terminal (the pty master). Output ends, and the
//!   agent shuts down its write side, when every holder of the terminal has closed it; the host
//!   shutting down its write side ends only the input. As with output, the agent closes the
//!   connection after the host did.
//!
//! **Exit and output.** `WaitProcess` answers as soon as the process has exited; its output may
//! still be in flight. A host that needs all of it (as containerd does before it publishes an
//! exit) reads the output streams to EOF, which the agent guarantees to deliver after the last
//! byte, before it acts on the exit status.

pub mod client;
pub mod hybrid_vsock;
pub mod line;
pub mod stream;

include!(concat!(env!("OUT_DIR"), "/mod.rs"));

/// The vsock port of the agent's ttrpc service.
pub const AGENT_PORT: u32 = 1024;

/// The host's vsock port the agent connects to, and at once closes, when it has started to
/// serve: a host that listens there (the VMM's Unix socket `<uds>_1026`) learns that the agent
/// is ready without polling it. Nothing has to listen; the agent goes on either way.
pub const READY_PORT: u32 = 1026;

/// The vsock port of the agent's stdio streams.
pub const STDIO_PORT: u32 = 1025;

/// This protocol's version, as `Version` reports it; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest container or exec id.
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` is a valid container or exec id: 1 to [`MAX_ID_LEN`] ASCII letters, digits,
/// `_`, `.` and `-`, starting with a letter or digit. Ids become path components and words of
/// the stream header, so nothing else is allowed.
pub fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_ID_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "abc-1.2_3", "0", &"x".repeat(MAX_ID_LEN)] {
            assert!(valid_id(good), "{good:?} should be valid");
        }
        for bad in
            ["", "-a", ".a", "_a", "a b", "a/b", "..", "a\n", "é", &"x".repeat(MAX_ID_LEN + 1)]
        {
            assert!(!valid_id(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn generated_service_paths_and_round_trip() {
        use protobuf::Message;
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = "c1".into();
        req.oci_spec_json = br#"{"ociVersion":"1.0.2"}"#.to_vec();
        req.rootfs.mut_or_insert_default().set_directory("/tmp/root".into());
        req.rootfs.mut_or_insert_default().mode = agent::RootfsMode::OVERLAY.into();
        let bytes = req.write_to_bytes().unwrap();
        let back = agent::CreateContainerRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.rootfs.directory(), "/tmp/root");
        // The server registers its methods under the proto package's service name.
        let service: std::sync::Arc<dyn agent_ttrpc::Agent + Send + Sync> =
            std::sync::Arc::new(Unimplemented);
        let methods = agent_ttrpc::create_agent(service);
        assert!(methods.contains_key("/husk.agent.v1.Agent/CreateContainer"));
        assert!(methods.contains_key("/husk.agent.v1.Agent/WaitProcess"));
        assert!(methods.contains_key("/husk.agent.v1.Agent/AddEntropy"));
        assert_eq!(methods.len(), 22);
    }

    #[test]
    fn shutdown_when_idle_is_a_compatible_addition() {
        use protobuf::Message;
        // A host that predates the field sends an empty ShutdownRequest: power off at once.
        let old = agent::ShutdownRequest::parse_from_bytes(&[]).unwrap();
        assert!(!old.when_idle);
        let mut req = agent::ShutdownRequest::new();
        req.when_idle = true;
        // Field 1, varint 1; an agent that predates it skips the unknown field.
        assert_eq!(req.write_to_bytes().unwrap(), [0x08, 0x01]);
        assert!(agent::ShutdownRequest::parse_from_bytes(&[0x08, 0x01]).unwrap().when_idle);
    }

    struct Unimplemented;
    impl agent_ttrpc::Agent for Unimplemented {}
}
