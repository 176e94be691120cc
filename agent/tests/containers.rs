//! The agent as a host process (root, Unix sockets) running containers from a busybox rootfs:
//! the protocol end to end except for the VM.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use husk_agent_protocol::agent as pb;
use husk_agent_protocol::stream::StreamKind;
use serde_json::json;

#[test]
fn health_check_and_version() {
    let agent = Agent::start();
    let r = agent.client.check(ctx(), &pb::CheckRequest::new()).unwrap();
    assert!(r.serving);
    let v = agent.client.version(ctx(), &pb::VersionRequest::new()).unwrap();
    assert_eq!(v.protocol_version, husk_agent_protocol::PROTOCOL_VERSION);
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    agent.shutdown();
}

#[test]
fn echo_output_arrives() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let (out, err, status) =
        agent.run("echo", &spec(process(&["echo", "hello from husk"])), rootfs.path());
    assert_eq!(out, "hello from husk\n");
    assert_eq!(err, "");
    assert_eq!(status.exit_status, 0);
    assert_eq!(status.signal, 0);
    assert!(!status.oom_killed);
}

#[test]
fn exit_codes_and_sigkill() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let (_, _, status) = agent.run("zero", &spec(process(&["sh", "-c", "exit 0"])), rootfs.path());
    assert_eq!(status.exit_status, 0);
    let (_, _, status) = agent.run("three", &spec(process(&["sh", "-c", "exit 3"])), rootfs.path());
    assert_eq!((status.exit_status, status.signal), (3, 0));

    agent.create("sleeper", &spec(process(&["sleep", "1000"])), rootfs.path(), (false, false, false)).unwrap();
    agent.start_container("sleeper").unwrap();
    agent.signal("sleeper", "", libc::SIGKILL).unwrap();
    let status = agent.wait("sleeper", "").unwrap();
    assert_eq!((status.exit_status, status.signal, status.oom_killed), (137, 9, false));
    // Waiting again gives the same answer; signalling the dead process is refused.
    assert_eq!(agent.wait("sleeper", "").unwrap().exit_status, 137);
    let (code, _) = status_of(agent.signal("sleeper", "", libc::SIGKILL));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    agent.remove("sleeper", false).unwrap();
    agent.shutdown();
}

fn status_of(r: ttrpc::Result<()>) -> (ttrpc::Code, String) {
    status(r.expect_err("the request should have failed"))
}

#[test]
fn env_cwd_user_groups_hostname() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let mut p = process(&[
        "sh",
        "-c",
        r#"echo "$FOO"; pwd; id -u; id -g; id -G; hostname; echo "$HOME"; umask; ulimit -n"#,
    ]);
    p["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [2000], "umask": 23});
    p["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    p["cwd"] = json!("/tmp");
    p["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 512, "soft": 256}]);
    let mut s = spec(p);
    s["hostname"] = json!("box1");
    let (out, err, status) = agent.run("who", &s, rootfs.path());
    assert_eq!(err, "");
    assert_eq!(out, "bar baz\n/tmp\n1000\n1000\n1000 2000\nbox1\n/home/user\n0027\n256\n");
    assert_eq!(status.exit_status, 0);
}

#[test]
fn security_settings_apply() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    std::fs::write(rootfs.path().join("etc/secret"), "hidden").unwrap();
    std::fs::create_dir(rootfs.path().join("etc/secrets")).unwrap();
    std::fs::write(rootfs.path().join("etc/secrets/key"), "hidden").unwrap();
    let script = "grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status; \
                  wc -c < /etc/secret; ls /etc/secrets | wc -l; \
                  echo 3 > /proc/sys/vm/drop_caches || echo ro-sys; \
                  touch /written && echo rw-root; \
                  ls -l /dev/null | cut -c1-10";
    let mut s = spec(process(&["sh", "-c", script]));
    s["linux"]["maskedPaths"].as_array_mut().unwrap().extend([json!("/etc/secret"), json!("/etc/secrets")]);
    let (out, err, status) = agent.run("sec", &s, rootfs.path());
    // Docker's 14 default capabilities.
    let caps = "00000000a80425fb";
    assert_eq!(
        out,
        format!(
            "CapEff:\t{caps}\nCapBnd:\t{caps}\nNoNewPrivs:\t1\n0\n0\nro-sys\nrw-root\ncrw-rw-rw-\n"
        ),
        "stderr: {err}"
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(status.exit_status, 0);
}

#[test]
fn exec_into_a_running_container() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    agent.create("svc", &spec(process(&["sleep", "1000"])), rootfs.path(), (false, false, false)).unwrap();
    // No exec before the container runs.
    let (code, _) = status_of(agent.exec("svc", "early", &process(&["true"]), (false, false, false)));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    agent.start_container("svc").unwrap();

    let script = "echo in $(hostname) as $$; exit 5";
    agent.exec("svc", "e1", &process(&["sh", "-c", script]), (false, true, false)).unwrap();
    let out = read_all(agent.stream("svc", "e1", StreamKind::Stdout));
    let status = agent.wait("svc", "e1").unwrap();
    // In the container's pid namespace (sleep is 1), with its hostname.
    assert!(out.starts_with("in husk-test as "), "{out}");
    assert_ne!(out.trim_end().rsplit(' ').next(), Some("1"));
    assert_eq!(status.exit_status, 5);
    let (code, _) = status_of(agent.exec("svc", "e1", &process(&["true"]), (false, false, false)));
    assert_eq!(code, ttrpc::Code::ALREADY_EXISTS);
    agent.remove_process("svc", "e1").unwrap();
    assert_eq!(common::status(agent.wait("svc", "e1").unwrap_err()).0, ttrpc::Code::NOT_FOUND);

    // The container's processes, as `ps` would list them.
    let mut req = pb::ListProcessesRequest::new();
    req.container_id = "svc".into();
    let list = agent.client.list_processes(ctx(), &req).unwrap();
    assert_eq!(list.processes.len(), 1, "{:?}", list.processes);
    assert_eq!(list.processes[0].args, ["sleep", "1000"]);

    // stdin of an exec, closed with CloseStdin rather than by the stream.
    agent.exec("svc", "cat", &process(&["cat"]), (true, true, false)).unwrap();
    let mut stdin = agent.stream("svc", "cat", StreamKind::Stdin);
    let out = agent.stream("svc", "cat", StreamKind::Stdout);
    stdin.write_all(b"through stdin\n").unwrap();
    let mut req = pb::CloseStdinRequest::new();
    req.container_id = "svc".into();
    req.exec_id = "cat".into();
    agent.client.close_stdin(ctx(), &req).unwrap();
    assert_eq!(read_all(out), "through stdin\n");
    assert_eq!(agent.wait("svc", "cat").unwrap().exit_status, 0);
    drop(stdin);

    // A running exec cannot be removed; SIGTERM ends it (a shell in the background).
    agent.exec("svc", "bg", &process(&["sleep", "1000"]), (false, false, false)).unwrap();
    let (code, _) = status_of(agent.remove_process("svc", "bg"));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    agent.signal("svc", "bg", libc::SIGTERM).unwrap();
    let status = agent.wait("svc", "bg").unwrap();
    assert_eq!((status.exit_status, status.signal), (128 + libc::SIGTERM, libc::SIGTERM as u32));

    // Once the container's process is gone, so is the container for execs.
    agent.signal("svc", "", libc::SIGKILL).unwrap();
    assert_eq!(agent.wait("svc", "").unwrap().exit_status, 137);
    let (code, msg) = status_of(agent.exec("svc", "late", &process(&["true"]), (false, false, false)));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    agent.remove("svc", false).unwrap();
    agent.shutdown();
}

#[test]
fn stdin_stream_and_eof() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let s = spec(process(&["sh", "-c", "cat; echo done"]));
    agent.create("cat", &s, rootfs.path(), (true, true, false)).unwrap();
    let mut stdin = agent.stream("cat", "", StreamKind::Stdin);
    let out = agent.stream("cat", "", StreamKind::Stdout);
    agent.start_container("cat").unwrap();
    // More than any pipe or socket buffer, so back-pressure has to work both ways.
    let data: Vec<u8> = (0..4_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let expected = [data.as_slice(), b"done\n"].concat();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&data).unwrap();
        // EOF for the process's stdin.
        stdin.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let got = read_all(out);
    writer.join().unwrap();
    assert!(got.as_bytes() == expected, "{} bytes back of {}", got.len(), expected.len());
    assert_eq!(agent.wait("cat", "").unwrap().exit_status, 0);
    agent.remove("cat", false).unwrap();
}

#[test]
fn output_waits_for_a_late_reader() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let s = spec(process(&["sh", "-c", "echo early; echo late-err >&2; exit 7"]));
    agent.create("late", &s, rootfs.path(), (false, true, true)).unwrap();
    agent.start_container("late").unwrap();
    assert_eq!(agent.wait("late", "").unwrap().exit_status, 7);
    // Attached after the exit: nothing was lost, and EOF follows.
    assert_eq!(read_all(agent.stream("late", "", StreamKind::Stdout)), "early\n");
    assert_eq!(read_all(agent.stream("late", "", StreamKind::Stderr)), "late-err\n");
    // Each stream attaches once; stdin was not asked for.
    let e = agent.try_stream("late", "", StreamKind::Stdout).unwrap_err();
    assert!(e.to_string().contains("already attached"), "{e}");
    let e = agent.try_stream("late", "", StreamKind::Stdin).unwrap_err();
    assert!(e.to_string().contains("no stdin stream"), "{e}");
    agent.remove("late", false).unwrap();
}

#[test]
fn terminal_and_window_resize() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let mut p = process(&["sh", "-c", "tty; stty size; read line; stty size; echo got $line"]);
    p["terminal"] = json!(true);
    p["consoleSize"] = json!({"height": 24, "width": 80});
    agent.create("tty", &spec(p), rootfs.path(), (false, false, false)).unwrap();
    let mut tty = agent.stream("tty", "", StreamKind::Tty);
    agent.start_container("tty").unwrap();
    let mut seen = String::new();
    read_until(&mut tty, &mut seen, "24 80");
    assert!(seen.contains("/dev/pts/0"), "{seen:?}");
    let mut req = pb::TtyWinResizeRequest::new();
    req.container_id = "tty".into();
    req.rows = 50;
    req.columns = 132;
    agent.client.tty_win_resize(ctx(), &req).unwrap();
    tty.write_all(b"hello\n").unwrap();
    let mut rest = String::new();
    tty.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tty.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("50 132\r\n"), "{rest:?}");
    assert!(rest.contains("got hello\r\n"), "{rest:?}");
    assert_eq!(agent.wait("tty", "").unwrap().exit_status, 0);
    // A terminal process has no separate stdin.
    let mut req = pb::CloseStdinRequest::new();
    req.container_id = "tty".into();
    let (code, _) = status(agent.client.close_stdin(ctx(), &req).unwrap_err());
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    agent.remove("tty", false).unwrap();
}

/// Read from `s` into `seen` until it contains `marker`.
fn read_until(s: &mut std::os::unix::net::UnixStream, seen: &mut String, marker: &str) {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 4096];
    while !seen.contains(marker) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "EOF before {marker:?}; got {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}
