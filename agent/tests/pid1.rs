//! The agent as PID 1, as the guest runs it, in new pid, mount, UTS, cgroup and network
//! namespaces on this host: it mounts its file systems, reaps orphans, sets the guest's
//! hostname, and powers off on Shutdown (in a pid namespace, reboot(2) ends the namespace; in
//! the guest, the VM).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::*;
use husk_agent_protocol::agent as pb;
use serde_json::json;

/// The mount points (field 5) and types of /proc/PID/mountinfo.
fn mounts(pid: u32) -> Vec<(String, String)> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    info.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-").unwrap();
            (f[4].to_string(), f[dash + 1].to_string())
        })
        .collect()
}

#[test]
fn pid1_mounts_reaps_names_the_guest_and_powers_off() {
    let agent = Agent::start_as_pid1();
    let rootfs = busybox_rootfs();
    let m = mounts(agent.pid());
    for (point, fstype) in [
        ("/dev", "devtmpfs"),
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/run", "tmpfs"),
        ("/sys/fs/cgroup", "cgroup2"),
    ] {
        assert!(
            m.iter().any(|(p, t)| p == point && t == fstype),
            "{fstype} is not mounted on {point}: {m:?}"
        );
    }

    // The guest's hostname; a container without its own UTS namespace sees it.
    let mut req = pb::SetHostnameRequest::new();
    req.hostname = "guest-7".into();
    agent.client.set_hostname(ctx(), &req).unwrap();
    // A container without a pid namespace leaves an orphan behind: it becomes PID 1's.
    let mut s = spec(process(&["sh", "-c", "hostname; sleep 1 & echo $!"]));
    s["hostname"] = json!(null);
    s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "ipc"}]);
    let (out, err, status) = agent.run("orphans", &s, rootfs.path());
    assert_eq!(status.exit_status, 0, "{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("guest-7"));
    // The orphan's pid in the agent's namespace; it is gone, reaped, within a few seconds.
    let orphan: u32 = lines.next().unwrap().parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let agent_pid = agent.pid();
    let zombies = || {
        let children =
            std::fs::read_to_string(format!("/proc/{agent_pid}/task/{agent_pid}/children"))
                .unwrap_or_default();
        children.split_whitespace().count()
    };
    while zombies() > 0 {
        assert!(std::time::Instant::now() < deadline, "orphan {orphan} was never reaped");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Shutdown: reboot(2), which in a pid namespace kills its init with SIGHUP as the status.
    agent.client.shutdown(ctx(), &pb::ShutdownRequest::new()).unwrap();
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(
        status.signal() == Some(libc::SIGHUP) || status.code() == Some(128 + libc::SIGHUP),
        "the agent did not power off: {status}"
    );
}
