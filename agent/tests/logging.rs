//! The copy of the agent's log (`HUSK_AGENT_LOG_TO`), the agent as a host process sending it
//! to a Unix socket: its lines arrive there as on its stderr, and without a listener the agent
//! works as ever. (In the guest the address is the host's vsock port: tests/e2e/agent.)

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use common::*;
use husk_tests::agent_vm::read_until;

/// The connection the agent makes to `listener`, within a deadline.
fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                return conn;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the agent never connected its log copy");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The agent still runs containers: three echo and exit 0.
fn serves_containers(agent: &Agent) {
    let rootfs = busybox_rootfs();
    for i in 0..3 {
        let (out, _, status) =
            agent.run(&format!("c{i}"), &spec(process(&["echo", "hi"])), rootfs.path());
        assert_eq!((out.as_str(), status.exit_status), ("hi\n", 0));
    }
}

#[test]
fn log_lines_reach_the_socket() {
    let dir = TempDir::new("agent-log-copy");
    let path = dir.path().join("log.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let agent =
        Agent::start_with_env(&[("HUSK_AGENT_LOG_TO", &format!("unix:{}", path.display()))]);
    let mut conn = accept(&listener);
    let mut seen = String::new();
    // The startup line, with env_logger's timestamp and level.
    read_until(&mut conn, &mut seen, "husk_agent] serving on unix:", Duration::from_secs(30));
    assert!(
        seen.lines().next().is_some_and(|l| l.starts_with('[') && l.contains(" INFO ")),
        "{seen:?}"
    );

    let rootfs = busybox_rootfs();
    let (out, _, status) = agent.run("logged", &spec(process(&["echo", "hi"])), rootfs.path());
    assert_eq!((out.as_str(), status.exit_status), ("hi\n", 0));
    read_until(&mut conn, &mut seen, "container logged removed", Duration::from_secs(30));
    assert!(seen.contains("container logged created"), "{seen:?}");
    agent.shutdown();
}

#[test]
fn without_a_listener_the_agent_serves_as_ever() {
    let dir = TempDir::new("agent-log-copy");
    let nobody = format!("unix:{}", dir.path().join("nobody.sock").display());
    let agent = Agent::start_with_env(&[("HUSK_AGENT_LOG_TO", &nobody)]);
    serves_containers(&agent);
    agent.shutdown();
}

#[test]
fn a_reader_that_goes_away_does_not_hurt_the_agent() {
    let dir = TempDir::new("agent-log-copy");
    let path = dir.path().join("log.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let agent =
        Agent::start_with_env(&[("HUSK_AGENT_LOG_TO", &format!("unix:{}", path.display()))]);
    drop(accept(&listener));
    serves_containers(&agent);
    agent.shutdown();
}
