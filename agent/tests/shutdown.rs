//! Shutdown with `when_idle`, the agent as a host process (where powering off is the agent
//! exiting 0): it answers, keeps serving while a container is left, and ends as soon as none
//! is, at once when there is none.

mod common;

use std::time::Duration;

use common::*;
use husk_agent_protocol::agent as pb;

/// Longer than the agent's wait between answering and powering off.
const SETTLE: Duration = Duration::from_millis(500);

#[test]
fn when_idle_without_containers_powers_off_at_once() {
    let agent = Agent::start();
    agent.shutdown_when_idle().expect("Shutdown when_idle is answered");
    agent.expect_clean_exit();
}

#[test]
fn when_idle_waits_for_the_last_container_then_powers_off() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    agent
        .create("running", &spec(process(&["sleep", "1000"])), rootfs.path(), (false, false, false))
        .unwrap();
    agent.start_container("running").unwrap();
    agent
        .create("created", &spec(process(&["true"])), rootfs.path(), (false, false, false))
        .unwrap();

    agent.shutdown_when_idle().expect("Shutdown when_idle is answered");
    std::thread::sleep(SETTLE);
    assert!(agent.serving(), "the agent powered off with two containers left");

    // The guest goes on working meanwhile: removing one, creating and removing another, and a
    // create that fails, all leave a container behind.
    agent.remove("running", true).unwrap();
    let (out, _, status) = agent.run("more", &spec(process(&["echo", "more"])), rootfs.path());
    assert_eq!((out.as_str(), status.exit_status), ("more\n", 0));
    let bad = agent.create(
        "bad",
        &serde_json::json!({"process": 7}),
        rootfs.path(),
        (false, false, false),
    );
    assert_eq!(status_of(bad).0, ttrpc::Code::INVALID_ARGUMENT);
    std::thread::sleep(SETTLE);
    assert!(agent.serving(), "the agent powered off with a container left");

    // The RemoveContainer of the last one is answered, then the agent powers off.
    agent.remove("created", false).expect("the last RemoveContainer is answered");
    agent.expect_clean_exit();
}

#[test]
fn plain_shutdown_still_powers_off_at_once_with_containers_left() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    agent
        .create("left", &spec(process(&["sleep", "1000"])), rootfs.path(), (false, false, false))
        .unwrap();
    agent.start_container("left").unwrap();
    // when_idle explicitly false is the same as a host that predates the field.
    let mut req = pb::ShutdownRequest::new();
    req.when_idle = false;
    agent.client.shutdown(ctx(), &req).unwrap();
    agent.expect_clean_exit();
}

fn status_of(r: ttrpc::Result<()>) -> (ttrpc::Code, String) {
    status(r.expect_err("the request should fail"))
}
