//! Cgroup v2 limits inside containers and OOM kills reported as such. These need the cgroup v2
//! memory, pids and cpu controllers, which this project's build machines bind to cgroup v1, so
//! they are ignored in a plain `cargo test`: `make test-agent-cgroups` runs them (`--ignored`) inside the
//! nested test host, whose kernel has them all in cgroup v2, or directly where this machine's
//! cgroup v2 has them.

mod common;

use common::*;
use serde_json::json;

/// Fail with a clear message unless the agent's cgroup root can get the controllers.
fn require_controllers() {
    let mount = cgroup2_mount();
    let available = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    for c in ["memory", "pids", "cpu"] {
        assert!(
            available.split_whitespace().any(|a| a == c),
            "this test needs the cgroup v2 {c} controller ({} offers {available:?}); \
             `make test-agent-cgroups` runs it inside the nested test host",
            mount.display()
        );
    }
}

#[test]
#[ignore = "needs the cgroup v2 memory, pids and cpu controllers: make test-agent-cgroups"]
fn limits_are_applied_and_visible_inside() {
    require_controllers();
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let mut s = spec(process(&[
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max; \
         for i in 1 2 3 4 5 6 7 8; do sleep 5 & done 2>&1 | grep -c fork",
    ]));
    s["linux"]["resources"] = json!({
        "memory": {"limit": 64 << 20},
        "pids": {"limit": 5},
        "cpu": {"quota": 50000, "period": 100000}
    });
    let (out, err, status) = agent.run("limits", &s, rootfs.path());
    // The container sees its own limits (cgroup namespace); the pids limit stops the loop.
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["67108864", "5", "50000 100000"], "{out}\n{err}");
    assert_ne!(lines.get(3), Some(&"0"), "no fork failed: {out}\n{err}");
    assert_eq!(status.exit_status, 0);
    agent.shutdown();
}

#[test]
#[ignore = "needs the cgroup v2 memory controller: make test-agent-cgroups"]
fn the_oom_killer_is_reported() {
    require_controllers();
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    // The shell keeps 96 MiB in a variable, three times its limit.
    let hog = "a=$(head -c 100663296 /dev/zero | tr '\\0' x); echo survived";
    let mut s = spec(process(&["sh", "-c", hog]));
    s["linux"]["resources"] = json!({"memory": {"limit": 32 << 20, "swap": 32 << 20}});
    let (out, _, status) = agent.run("hog", &s, rootfs.path());
    assert_eq!(out, "");
    assert_eq!((status.exit_status, status.signal, status.oom_killed), (137, 9, true));

    // A SIGKILL that is not the OOM killer's is not reported as one.
    let mut s = spec(process(&["sleep", "1000"]));
    s["linux"]["resources"] = json!({"memory": {"limit": 64 << 20}});
    agent.create("sleeper", &s, rootfs.path(), (false, false, false)).unwrap();
    agent.start_container("sleeper").unwrap();
    agent.signal("sleeper", "", libc::SIGKILL).unwrap();
    let status = agent.wait("sleeper", "").unwrap();
    assert_eq!((status.exit_status, status.oom_killed), (137, false));
    agent.remove("sleeper", false).unwrap();
    agent.shutdown();
}

#[test]
#[ignore = "needs the cgroup v2 memory and pids controllers: make test-agent-cgroups"]
fn stats_report_memory_and_pids() {
    require_controllers();
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let mut s = spec(process(&["sh", "-c", "sleep 1000 & wait"]));
    s["linux"]["resources"] = json!({"memory": {"limit": 64 << 20}, "pids": {"limit": 20}});
    agent.create("stats", &s, rootfs.path(), (false, false, false)).unwrap();
    agent.start_container("stats").unwrap();
    let stats = agent.stats("stats").unwrap();
    let (memory, pids) = (stats.memory.unwrap(), stats.pids.unwrap());
    assert!(memory.usage_bytes > 0, "{memory:?}");
    assert_eq!(memory.limit_bytes, 64 << 20);
    assert_eq!(memory.oom_kills, 0);
    assert!(pids.current >= 1, "{pids:?}");
    assert_eq!(pids.limit, 20);
    agent.remove("stats", true).unwrap();
    agent.shutdown();
}

#[test]
#[ignore = "needs the cgroup v2 memory, pids and cpu controllers: make test-agent-cgroups"]
fn update_changes_the_limits_of_a_running_container() {
    require_controllers();
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let mut s = spec(process(&["sleep", "1000"]));
    s["linux"]["resources"] = json!({"memory": {"limit": 64 << 20}, "pids": {"limit": 20}});
    agent.create("upd", &s, rootfs.path(), (false, false, false)).unwrap();
    agent.start_container("upd").unwrap();
    let fork = "sleep 0 & wait; echo end";
    let (out, err, _) = agent.exec_sh("upd", "f1", fork);
    assert_eq!((out.as_str(), err.as_str()), ("end\n", ""));

    // Two processes: sleep and the exec's shell (joining a cgroup is not a fork), which can
    // then fork no more.
    agent.update("upd", &json!({"pids": {"limit": 2}})).unwrap();
    let (out, err, _) = agent.exec_sh("upd", "f2", fork);
    assert!(err.contains("fork"), "the fork was not refused: {out:?} {err:?}");

    // Memory (the swap with the limit the cgroup has), then cpu: each part alone keeps the
    // others, and a period alone keeps the quota.
    agent.update("upd", &json!({"pids": {"limit": 20}})).unwrap();
    agent.update("upd", &json!({"memory": {"limit": 32 << 20, "reservation": 16 << 20}})).unwrap();
    agent.update("upd", &json!({"cpu": {"quota": 20000}})).unwrap();
    agent.update("upd", &json!({"cpu": {"period": 50000}})).unwrap();
    let has_swap = agent.cgroup_root().join("upd/memory.swap.max").exists();
    if has_swap {
        agent.update("upd", &json!({"memory": {"swap": 48 << 20}})).unwrap();
    }
    let read = "cd /sys/fs/cgroup; cat memory.max memory.low cpu.max pids.max; \
                cat memory.swap.max 2>/dev/null || true";
    let (out, err, exit) = agent.exec_sh("upd", "r", read);
    assert_eq!(exit, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..4], ["33554432", "16777216", "20000 50000", "20"], "{out}");
    if has_swap {
        assert_eq!(lines[4], "16777216", "{out}");
    }
    // Swap needs a limit to go with.
    agent.update("upd", &json!({"memory": {"limit": -1}})).unwrap();
    let (code, msg) =
        status(agent.update("upd", &json!({"memory": {"swap": 1 << 30}})).unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    agent.remove("upd", true).unwrap();
    agent.shutdown();
}
