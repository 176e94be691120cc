//! The guest agent end to end: husk boots the guest kernel with `make guest-image`'s initramfs
//! (husk-agent as the guest's PID 1) inside the nested test host, and the tests drive the agent
//! the way the runtime will (see husk_tests::agent_vm).

use std::io::Write;

use husk_agent_protocol::agent as pb;
use husk_agent_protocol::stream::StreamKind;
use husk_agent_protocol::READY_PORT;
use std::time::Duration;

use husk_tests::agent_vm::{ctx, read_to_end, read_until, AgentVm};
use husk_tests::oci::{process, spec};

#[test]
fn containers_run_from_a_disk_with_their_output_env_user_and_exit_codes() {
    let (vm, ready) = AgentVm::boot_with("", &[READY_PORT]);
    // Serving, the agent told the host so on the ready port (and closed the connection).
    let signal = vm.accept_from_guest(&ready[0]);
    assert_eq!(read_to_end(signal), "", "the ready connection carries nothing");
    let version = vm.client.version(ctx(), &pb::VersionRequest::new()).expect("Version");
    assert_eq!(version.protocol_version, husk_agent_protocol::PROTOCOL_VERSION);

    let (out, status) = vm.run("echo", &["sh", "-c", "echo hello from $(hostname); uname -r"]);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello from husk-test"), "{out:?}");
    let guest_release = lines.next().unwrap_or_default().to_owned();
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_ne!(guest_release, host_release.trim(), "the container runs on the guest's kernel");
    assert_eq!((status.exit_status, status.signal), (0, 0));

    // The process's env, cwd and user from the spec.
    let mut who = process(&["sh", "-c", "echo $GREETING; pwd; id -u; id -g"]);
    who["env"] = serde_json::json!(["PATH=/bin", "GREETING=hi there"]);
    who["cwd"] = "/tmp".into();
    who["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
    vm.create("who", &spec(who), (false, true, false)).expect("CreateContainer");
    let out = vm.stream("who", "", StreamKind::Stdout);
    vm.start("who");
    assert_eq!(read_to_end(out), "hi there\n/tmp\n1000\n1000\n");
    assert_eq!(vm.wait("who", "").exit_status, 0);
    vm.remove("who");

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

#[test]
fn terminal_with_resize_and_an_oom_kill_in_the_guest() {
    let vm = AgentVm::boot();

    // A terminal: the pty's size from the spec, then from TtyWinResize, input echoed back.
    let mut p = process(&["sh", "-c", "tty; stty size; read line; stty size; echo got $line"]);
    p["terminal"] = true.into();
    p["consoleSize"] = serde_json::json!({"height": 24, "width": 80});
    vm.create("tty", &spec(p), (false, false, false)).expect("CreateContainer");
    let mut tty = vm.stream("tty", "", StreamKind::Tty);
    vm.start("tty");
    let mut seen = String::new();
    read_until(&mut tty, &mut seen, "24 80", Duration::from_secs(60));
    assert!(seen.contains("/dev/pts/0"), "{seen:?}");
    let mut req = pb::TtyWinResizeRequest::new();
    req.container_id = "tty".into();
    req.rows = 50;
    req.columns = 132;
    vm.client.tty_win_resize(ctx(), &req).expect("TtyWinResize");
    tty.write_all(b"hello\n").unwrap();
    let rest = read_to_end(tty);
    assert!(rest.contains("50 132\r\n"), "{rest:?}");
    assert!(rest.contains("got hello\r\n"), "{rest:?}");
    assert_eq!(vm.wait("tty", "").exit_status, 0);
    vm.remove("tty");

    // A shell holding 48 MiB under a 16 MiB limit is killed by the guest's OOM killer, and
    // the agent says so.
    let hog = "a=$(head -c 50331648 /dev/zero | tr '\\0' x); echo survived";
    let mut s = spec(process(&["sh", "-c", hog]));
    s["linux"]["resources"] = serde_json::json!({"memory": {"limit": 16 << 20, "swap": 16 << 20}});
    vm.create("hog", &s, (false, true, false)).expect("CreateContainer");
    let out = vm.stream("hog", "", StreamKind::Stdout);
    vm.start("hog");
    assert_eq!(read_to_end(out), "");
    let status = vm.wait("hog", "");
    assert_eq!((status.exit_status, status.signal, status.oom_killed), (137, 9, true));
    vm.remove("hog");
    vm.shutdown();
}

#[test]
fn two_hundred_execs_leave_no_zombie_fd_or_mount_in_the_guest() {
    let vm = AgentVm::boot();
    // A container in the guest's own pid namespace, allowed to look at the agent (PID 1).
    let mut p = process(&["sleep", "1000"]);
    let caps = ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_DAC_OVERRIDE", "CAP_KILL"];
    p["capabilities"] = serde_json::json!({"bounding": caps, "effective": caps, "permitted": caps});
    let mut s = spec(p);
    s["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}, {"type": "uts"}]);
    vm.create("svc", &s, (false, false, false)).expect("CreateContainer");
    vm.start("svc");
    let probe_script = "ls /proc/1/fd | wc -l; wc -l < /proc/1/mountinfo; \
                        cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == \"Z\"' | wc -l";
    let mut n = 0;
    let mut probe = || {
        n += 1;
        let id = format!("probe{n}");
        vm.exec("svc", &id, &process(&["sh", "-c", probe_script]), (false, true, false));
        let out = read_to_end(vm.stream("svc", &id, StreamKind::Stdout));
        assert_eq!(vm.wait("svc", &id).exit_status, 0, "{out}");
        let mut req = pb::RemoveProcessRequest::new();
        req.container_id = "svc".into();
        req.exec_id = id;
        vm.client.remove_process(ctx(), &req).expect("RemoveProcess");
        out
    };
    // The baseline once the container's start has settled (its set-up descriptors closed):
    // two probes in a row that agree.
    let mut before = probe();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let again = probe();
        if again == before {
            break;
        }
        before = again;
    }
    for i in 0..200 {
        let id = format!("e{i}");
        // Every tenth with its stdout attached, the rest with none.
        let with_out = i % 10 == 0;
        vm.exec("svc", &id, &process(&["echo", "x"]), (false, with_out, false));
        if with_out {
            assert_eq!(read_to_end(vm.stream("svc", &id, StreamKind::Stdout)), "x\n");
        }
        assert_eq!(vm.wait("svc", &id).exit_status, 0);
        let mut req = pb::RemoveProcessRequest::new();
        req.container_id = "svc".into();
        req.exec_id = id;
        vm.client.remove_process(ctx(), &req).expect("RemoveProcess");
    }
    // Stream threads finish just after their streams: give them a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut after = probe();
    while after != before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        after = probe();
    }
    let [fds, mounts, zombies]: [&str; 3] =
        after.lines().collect::<Vec<_>>().try_into().expect("three counts");
    assert_eq!(after, before, "agent fds, mounts and zombies (fds {fds}, mounts {mounts})");
    assert_eq!(zombies, "0", "no zombies in the guest");
    let mut req = pb::ListProcessesRequest::new();
    req.container_id = "svc".into();
    let procs = vm.client.list_processes(ctx(), &req).unwrap().processes;
    assert_eq!(procs.len(), 1, "only the container's own process is left: {procs:?}");
    vm.signal("svc", libc::SIGKILL);
    vm.wait("svc", "");
    vm.remove("svc");
    vm.shutdown();
}

#[test]
fn shutdown_when_idle_powers_off_after_the_last_remove_even_with_no_log_listener() {
    // The log copy goes to a port nobody listens on: the agent must not mind.
    let (mut vm, _) = AgentVm::boot_with("HUSK_AGENT_LOG_TO=vsock:1030", &[]);
    vm.create("last", &spec(process(&["sleep", "1000"])), (false, false, false)).unwrap();
    vm.start("last");
    vm.shutdown_when_idle();
    std::thread::sleep(Duration::from_secs(2));
    assert!(vm.running(), "the VM powered off with a container left:\n{}", vm.console());
    let check = vm.client.check(ctx(), &pb::CheckRequest::new()).expect("Check after when_idle");
    assert!(check.serving);
    // Still serving: an exec runs.
    vm.exec("last", "probe", &process(&["echo", "alive"]), (false, true, false));
    assert_eq!(read_to_end(vm.stream("last", "probe", StreamKind::Stdout)), "alive\n");
    assert_eq!(vm.wait("last", "probe").exit_status, 0);

    // The agent tried the log port, found nobody and said so on the console.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !vm.console().contains("logging on the console only") {
        assert!(std::time::Instant::now() < deadline, "no word of the log copy:\n{}", vm.console());
        std::thread::sleep(Duration::from_millis(200));
    }

    vm.signal("last", libc::SIGKILL);
    vm.wait("last", "");
    vm.remove("last");
    vm.expect_power_off();
}

#[test]
fn agent_log_lines_reach_a_host_vsock_port() {
    const LOG_PORT: u32 = 1031;
    let (vm, listeners) =
        AgentVm::boot_with(&format!("HUSK_AGENT_LOG_TO=vsock:{LOG_PORT}"), &[LOG_PORT]);
    // The agent connected while it started (the queue kept its first lines meanwhile).
    let mut log = vm.accept_from_guest(&listeners[0]);
    let mut seen = String::new();
    read_until(&mut log, &mut seen, "serving on vsock:1024", Duration::from_secs(60));

    let (out, _) = vm.run("logged", &["echo", "hi"]);
    assert_eq!(out, "hi\n");
    read_until(&mut log, &mut seen, "container logged removed", Duration::from_secs(60));
    assert!(seen.contains("container logged created"), "{seen:?}");
    // The console has warnings and errors only: every byte there is a VM exit.
    assert!(!vm.console().contains("container logged created"), "{}", vm.console());
    vm.shutdown();
}
