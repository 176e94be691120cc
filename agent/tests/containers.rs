//! The agent as a host process (root, Unix sockets) running containers from a busybox rootfs:
//! the protocol end to end except for the VM.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use husk_agent_protocol::agent as pb;
use husk_agent_protocol::stream::StreamKind;
use husk_tests::agent_vm::read_until;
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

    agent
        .create("sleeper", &spec(process(&["sleep", "1000"])), rootfs.path(), (false, false, false))
        .unwrap();
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
                  echo 3 > /proc/sys/vm/drop_caches || echo ro-sys; cat /proc/sys/kernel/msgmax; \
                  touch /written && echo rw-root; \
                  ls -l /dev/null | cut -c1-10";
    let mut s = spec(process(&["sh", "-c", script]));
    s["linux"]["maskedPaths"]
        .as_array_mut()
        .unwrap()
        .extend([json!("/etc/secret"), json!("/etc/secrets")]);
    // A sysctl of the container's own IPC namespace, written before /proc/sys turns read-only.
    s["linux"]["sysctl"] = json!({"kernel.msgmax": "12345"});
    let (out, err, status) = agent.run("sec", &s, rootfs.path());
    // Docker's 14 default capabilities.
    let caps = "00000000a80425fb";
    assert_eq!(
        out,
        format!(
            "CapEff:\t{caps}\nCapBnd:\t{caps}\nNoNewPrivs:\t1\n0\n0\nro-sys\n12345\nrw-root\ncrw-rw-rw-\n"
        ),
        "stderr: {err}"
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(status.exit_status, 0);
    // The root is an overlay: the write did not reach the rootfs directory.
    assert!(!rootfs.path().join("written").exists());
}

#[test]
fn exec_into_a_running_container() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    agent
        .create("svc", &spec(process(&["sleep", "1000"])), rootfs.path(), (false, false, false))
        .unwrap();
    // No exec before the container runs.
    let (code, _) =
        status_of(agent.exec("svc", "early", &process(&["true"]), (false, false, false)));
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
    let (code, msg) =
        status_of(agent.exec("svc", "late", &process(&["true"]), (false, false, false)));
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
    read_until(&mut tty, &mut seen, "24 80", Duration::from_secs(30));
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

#[test]
fn bad_requests_get_clear_errors_and_the_agent_keeps_serving() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let good = spec(process(&["true"]));
    let create_raw = |id: &str, json: &[u8], rootfs: pb::Rootfs| {
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = json.to_vec();
        req.rootfs = Some(rootfs).into();
        status(agent.client.create_container(ctx(), &req).unwrap_err())
    };
    let dir_rootfs = |path: &str| {
        let mut r = pb::Rootfs::new();
        r.set_directory(path.into());
        r
    };
    let root = rootfs.path().display().to_string();
    let good_json = serde_json::to_vec(&good).unwrap();

    let (code, msg) = create_raw("c1", b"{not json", dir_rootfs(&root));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("OCI spec is not valid"), "{msg}");
    let (code, msg) = create_raw("../c1", &good_json, dir_rootfs(&root));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("invalid container id"), "{msg}");
    let (code, msg) = create_raw("c1", &good_json, dir_rootfs("/nonexistent/rootfs"));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("does not exist"), "{msg}");
    let mut disk = pb::Rootfs::new();
    let mut block = pb::BlockDevice::new();
    block.device = "/dev/vdz".into();
    block.fstype = "ext4".into();
    disk.set_block(block);
    let (code, msg) = create_raw("c1", &good_json, disk);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("rootfs disk /dev/vdz is missing"), "{msg}");
    let (code, msg) = create_raw("c1", &good_json, pb::Rootfs::new());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("no source"), "{msg}");

    // Failures inside the container's setup come back with what failed.
    let mut bad_mount = good.clone();
    bad_mount["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/data", "type": "nosuchfs", "source": "x", "options": []}));
    let (code, msg) =
        status_of(agent.create("c1", &bad_mount, rootfs.path(), (false, false, false)));
    assert_eq!(code, ttrpc::Code::INTERNAL);
    assert!(msg.contains("/data type nosuchfs"), "{msg}");
    let missing = spec(process(&["no-such-program"]));
    let (_, msg) = status_of(agent.create("c1", &missing, rootfs.path(), (false, false, false)));
    assert!(msg.contains("`no-such-program` not found in $PATH"), "{msg}");

    // Unknown containers and processes.
    for r in [
        agent.start_container("ghost"),
        agent.signal("ghost", "", 9),
        agent.exec("ghost", "e", &process(&["true"]), (false, false, false)),
        agent.remove("ghost", true),
        agent.wait("ghost", "").map(drop),
    ] {
        let (code, msg) = status(r.unwrap_err());
        assert_eq!(code, ttrpc::Code::NOT_FOUND, "{msg}");
        assert!(msg.contains("no container \"ghost\""), "{msg}");
    }
    let e = agent.try_stream("ghost", "", StreamKind::Stdout).unwrap_err();
    assert!(e.to_string().contains("no container"), "{e}");
    // A stream header that is not one.
    let mut s = std::os::unix::net::UnixStream::connect(agent.stdio_socket()).unwrap();
    s.write_all(b"GET / HTTP/1.0\n").unwrap();
    assert!(read_all(s).starts_with("ERR malformed stream header"));

    // After all that, the agent still works, and the failed creates left no cgroups behind.
    agent.create("c1", &good, rootfs.path(), (false, false, false)).unwrap();
    let (code, _) = status_of(agent.create("c1", &good, rootfs.path(), (false, false, false)));
    assert_eq!(code, ttrpc::Code::ALREADY_EXISTS);
    agent.start_container("c1").unwrap();
    assert_eq!(agent.wait("c1", "").unwrap().exit_status, 0);
    agent.remove("c1", false).unwrap();
    let left: Vec<_> = std::fs::read_dir(agent.cgroup_root())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
    let (out, _, _) = agent.run("echo", &spec(process(&["echo", "still here"])), rootfs.path());
    assert_eq!(out, "still here\n");
    agent.shutdown();
}

/// The agent's open descriptors, its zombie children, its stream threads and its mounts.
fn agent_footprint(pid: u32) -> (usize, Vec<String>, usize, usize) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let mut zombies = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        if fields.len() > 2 && fields[0] == "Z" && fields[1] == pid.to_string() {
            zombies.push(stat);
        }
    }
    // Stream threads (the ttrpc server's worker pool grows and shrinks on its own).
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            matches!(comm.trim(), "stream" | "tty-in")
        })
        .count();
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap().lines().count();
    (fds, zombies, threads, mounts)
}

#[test]
fn two_hundred_execs_leave_nothing_behind() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    agent
        .create("svc", &spec(process(&["sleep", "1000"])), rootfs.path(), (false, false, false))
        .unwrap();
    agent.start_container("svc").unwrap();
    let exec_once = |i: usize| {
        let id = format!("e{i}");
        let script = format!("echo {i}; exit {}", i % 7);
        agent.exec("svc", &id, &process(&["sh", "-c", &script]), (true, true, true)).unwrap();
        let stdin = agent.stream("svc", &id, StreamKind::Stdin);
        let out = agent.stream("svc", &id, StreamKind::Stdout);
        // stderr is left unattached: the agent must drop it with the process.
        assert_eq!(read_all(out), format!("{i}\n"));
        assert_eq!(agent.wait("svc", &id).unwrap().exit_status, (i % 7) as i32);
        drop(stdin);
        agent.remove_process("svc", &id).unwrap();
    };
    exec_once(0);
    // Let the first stream threads end before taking the baseline.
    std::thread::sleep(Duration::from_millis(200));
    let before = agent_footprint(agent.pid());
    for i in 1..=200 {
        exec_once(i);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut after = agent_footprint(agent.pid());
    // Stream threads finish just after their streams: give them a moment.
    while after != before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = agent_footprint(agent.pid());
    }
    assert!(after.1.is_empty(), "zombie children of the agent: {:?}", after.1);
    assert_eq!(after.0, before.0, "the agent's open descriptors grew");
    assert_eq!((before.2, after.2), (0, 0), "stream threads left running");
    assert_eq!(after.3, before.3, "the agent's mounts changed");
    // And inside the container, nothing but its own process.
    let mut req = pb::ListProcessesRequest::new();
    req.container_id = "svc".into();
    assert_eq!(agent.client.list_processes(ctx(), &req).unwrap().processes.len(), 1);
    agent.remove("svc", true).unwrap();
    agent.shutdown();
}

/// A loop device over an ext4 image of a directory, detached on drop.
struct LoopDisk {
    device: String,
    image: std::path::PathBuf,
}

impl LoopDisk {
    fn ext4_of(dir: &std::path::Path, image: std::path::PathBuf) -> Self {
        let run = |cmd: &mut std::process::Command| {
            let out =
                cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (e2fsprogs, util-linux)"));
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        run(std::process::Command::new("truncate").arg("-s").arg("32M").arg(&image));
        run(std::process::Command::new("mkfs.ext4").args(["-q", "-d"]).arg(dir).arg(&image));
        let device =
            run(std::process::Command::new("losetup").args(["--find", "--show"]).arg(&image));
        Self { device: device.trim().to_string(), image }
    }

    /// Wait until nothing has the disk mounted any more (the container's mount namespace is
    /// torn down asynchronously after its last process), then read `path` from the image.
    fn read_file(&self, path: &str) -> String {
        let name = self.device.trim_start_matches("/dev/");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::path::Path::new("/proc/fs/ext4").join(name).exists() {
            assert!(std::time::Instant::now() < deadline, "{} is still mounted", self.device);
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = std::process::Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(&self.image)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

#[test]
fn rootfs_from_a_disk_read_only_overlay_or_writable() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let work = TempDir::new("disk");
    let disk = LoopDisk::ext4_of(rootfs.path(), work.path().join("rootfs.img"));
    let create = |id: &str, mode: pb::RootfsMode, script: &str| {
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = id.into();
        req.oci_spec_json = serde_json::to_vec(&spec(process(&["sh", "-c", script]))).unwrap();
        let mut block = pb::BlockDevice::new();
        block.device = disk.device.clone();
        block.fstype = "ext4".into();
        let r = req.rootfs.mut_or_insert_default();
        r.set_block(block);
        r.mode = mode.into();
        let mut stdio = pb::Stdio::new();
        stdio.stdout = true;
        req.stdio = Some(stdio).into();
        agent.client.create_container(ctx(), &req).unwrap();
        let out = agent.stream(id, "", StreamKind::Stdout);
        agent.start_container(id).unwrap();
        let out = read_all(out);
        assert_eq!(agent.wait(id, "").unwrap().exit_status, 0);
        agent.remove(id, false).unwrap();
        out
    };
    let script = "echo data > /written 2>/dev/null && cat /written || echo refused";
    assert_eq!(create("ro", pb::RootfsMode::READ_ONLY, script), "refused\n");
    assert_eq!(create("ovl", pb::RootfsMode::OVERLAY, script), "data\n");
    // The overlay's writes went to its tmpfs, not the disk.
    assert_eq!(disk.read_file("/written"), "");
    assert_eq!(create("rw", pb::RootfsMode::WRITABLE, script), "data\n");
    assert_eq!(disk.read_file("/written"), "data\n");
    agent.shutdown();
}

#[test]
fn seccomp_profile_applies_to_the_container_and_its_execs() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let setuid_bit = |index: usize| json!({"index": index, "value": 0o4000, "valueTwo": 0o4000, "op": "SCMP_CMP_MASKED_EQ"});
    let profile = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["chmod"], "action": "SCMP_ACT_ERRNO", "args": [setuid_bit(1)]},
            {"names": ["fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO", "args": [setuid_bit(2)]}
        ]
    });
    let script = "mkdir /tmp/d 2>/dev/null || echo mkdir-denied; touch /tmp/f; \
                  chmod 4755 /tmp/f 2>/dev/null || echo setuid-denied; \
                  chmod 755 /tmp/f && echo chmod-ok; grep Seccomp: /proc/self/status";
    for nnp in [true, false] {
        let mut p = process(&["sh", "-c", script]);
        p["noNewPrivileges"] = json!(nnp);
        // As uid 1000: without no_new_privileges the filter goes on before the identity change,
        // which it has to let through. (/tmp is world-writable: only the filter stops mkdir.)
        p["user"] = json!({"uid": 1000, "gid": 1000});
        let mut s = spec(p);
        s["linux"]["seccomp"] = profile.clone();
        let id = format!("seccomp-{nnp}");
        let (out, err, status) = agent.run(&id, &s, rootfs.path());
        assert_eq!(out, "mkdir-denied\nsetuid-denied\nchmod-ok\nSeccomp:\t2\n", "{err}");
        assert_eq!(status.exit_status, 0);
    }

    // An exec gets its container's profile.
    let mut s = spec(process(&["sleep", "1000"]));
    s["linux"]["seccomp"] = profile;
    agent.create("svc", &s, rootfs.path(), (false, false, false)).unwrap();
    agent.start_container("svc").unwrap();
    let script = "mkdir /tmp/e 2>/dev/null || echo denied";
    agent.exec("svc", "e", &process(&["sh", "-c", script]), (false, true, false)).unwrap();
    assert_eq!(read_all(agent.stream("svc", "e", StreamKind::Stdout)), "denied\n");
    agent.remove("svc", true).unwrap();

    // A profile the agent cannot apply is refused up front.
    let mut s = spec(process(&["true"]));
    s["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_NOTIFY"});
    let (code, msg) = status_of(agent.create("bad", &s, rootfs.path(), (false, false, false)));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("SCMP_ACT_NOTIFY"), "{msg}");
    agent.shutdown();
}

/// The number a container keeps writing to /tmp/n, read through its process's root.
fn counter(pid: i32) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // The shell truncates the file before it writes: retry an empty read.
        let text = std::fs::read_to_string(format!("/proc/{pid}/root/tmp/n")).unwrap_or_default();
        if let Ok(n) = text.trim().parse() {
            return n;
        }
        assert!(std::time::Instant::now() < deadline, "no counter in the container");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pause_freezes_the_container_and_resume_thaws_it() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let count = "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.01; done";
    let s = spec(process(&["sh", "-c", count]));
    agent.create("ctr", &s, rootfs.path(), (false, false, false)).unwrap();
    // Only a running container can be paused.
    let (code, msg) = status_of(agent.pause("ctr"));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    agent.start_container("ctr").unwrap();
    let sh = agent.pids("ctr")[0];
    let wait_past = |n: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while counter(sh) <= n {
            assert!(std::time::Instant::now() < deadline, "the counter is stuck at {n}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_past(0);

    agent.pause("ctr").unwrap();
    let events = agent.cgroup_root().join("ctr/cgroup.events");
    assert!(std::fs::read_to_string(&events).unwrap().contains("frozen 1"));
    let frozen_at = counter(sh);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(sh), frozen_at, "the counter moved while paused");
    let (code, msg) = status_of(agent.pause("ctr"));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(msg.contains("already paused"), "{msg}");
    // No exec into a frozen container; listing it still works.
    let (code, msg) = status_of(agent.exec("ctr", "e", &process(&["true"]), (false, false, false)));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(msg.contains("paused"), "{msg}");
    assert!(agent.pids("ctr").contains(&sh));

    agent.resume("ctr").unwrap();
    assert!(std::fs::read_to_string(&events).unwrap().contains("frozen 0"));
    wait_past(frozen_at);
    let (code, msg) = status_of(agent.resume("ctr"));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    assert!(msg.contains("not paused"), "{msg}");

    // A paused container is still running: removal needs force, which works.
    agent.pause("ctr").unwrap();
    let (code, _) = status_of(agent.remove("ctr", false));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    agent.remove("ctr", true).unwrap();
    assert!(!agent.cgroup_root().join("ctr").exists());

    // Signals and waits still reach a paused container.
    agent.create("sig", &s, rootfs.path(), (false, false, false)).unwrap();
    agent.start_container("sig").unwrap();
    agent.pause("sig").unwrap();
    agent.signal("sig", "", libc::SIGKILL).unwrap();
    assert_eq!(agent.wait("sig", "").unwrap().exit_status, 137);
    let (code, msg) = status_of(agent.pause("sig"));
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    agent.remove("sig", false).unwrap();
    agent.shutdown();
}

#[test]
fn stats_count_cpu_time_and_leave_out_loopback() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let busy = "while true; do i=$((i+1)); done";
    agent
        .create("busy", &spec(process(&["sh", "-c", busy])), rootfs.path(), (false, false, false))
        .unwrap();
    agent.start_container("busy").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let first = agent.stats("busy").unwrap();
    assert!(first.cpu.usage_usec > 0, "{first:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = agent.stats("busy").unwrap();
        if now.cpu.usage_usec > first.cpu.usage_usec {
            assert!(now.cpu.user_usec + now.cpu.system_usec > 0, "{now:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "cpu usage stuck: {now:?}");
    }
    // Memory and pids counters come with their controllers (cgroup_limits checks their values).
    let cg = agent.cgroup_root().join("busy");
    assert_eq!(first.memory.is_some(), cg.join("memory.current").exists());
    assert_eq!(first.pids.is_some(), cg.join("pids.current").exists());
    // The guest's NICs are this host's here; loopback is never among them.
    assert!(first.networks.iter().all(|n| n.name != "lo"), "{:?}", first.networks);
    agent.remove("busy", true).unwrap();
    let (code, _) = status(agent.stats("busy").unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
    agent.shutdown();
}

#[test]
fn update_checks_its_resources() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    agent
        .create("upd", &spec(process(&["sleep", "1000"])), rootfs.path(), (false, false, false))
        .unwrap();
    agent.start_container("upd").unwrap();
    let (code, msg) = status_of(agent.update("upd", &json!({"memory": {"limit": "lots"}})));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("resources are not valid"), "{msg}");
    // Nothing asked, nothing changed.
    agent.update("upd", &json!({})).unwrap();
    // A limit whose controller the cgroup lacks names it (cgroup_limits tests the rest).
    let r = agent.update("upd", &json!({"pids": {"limit": 10}}));
    if agent.cgroup_root().join("upd/pids.max").exists() {
        r.unwrap();
    } else {
        let (code, msg) = status_of(r);
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
        assert!(msg.contains("`pids` controller"), "{msg}");
    }
    let (code, _) = status_of(agent.update("ghost", &json!({})));
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
    agent.remove("upd", true).unwrap();
    agent.shutdown();
}

#[test]
fn host_files_are_copied_and_other_host_paths_refused() {
    let agent = Agent::start();
    let rootfs = busybox_rootfs();
    let mut s = spec(process(&["sh", "-c", "cat /etc/hosts; echo 10.0.0.9 extra >> /etc/hosts"]));
    let bind = |source: &str, destination: &str| {
        json!({"destination": destination, "type": "bind", "source": source,
               "options": ["rbind", "rprivate"]})
    };
    s["mounts"].as_array_mut().unwrap().push(bind("/host/hosts", "/etc/hosts"));
    let mut req = create_request("hosts", &s, rootfs.path(), (false, true, true));
    let mut file = pb::HostFile::new();
    file.source = "/host/hosts".into();
    file.content = b"127.0.0.1 localhost\n10.0.0.2 hosts-test\n".to_vec();
    req.host_files.push(file);
    agent.client.create_container(ctx(), &req).unwrap();
    let (out, err) = (
        agent.stream("hosts", "", StreamKind::Stdout),
        agent.stream("hosts", "", StreamKind::Stderr),
    );
    agent.start_container("hosts").unwrap();
    assert_eq!(read_all(out), "127.0.0.1 localhost\n10.0.0.2 hosts-test\n");
    assert_eq!(read_all(err), "");
    assert_eq!(agent.wait("hosts", "").unwrap().exit_status, 0);
    // The copy was the container's to write; it goes with the container.
    let copy = agent.state_dir().join("hosts/files/0-hosts");
    assert!(std::fs::read_to_string(&copy).unwrap().ends_with("10.0.0.9 extra\n"));
    agent.remove("hosts", false).unwrap();
    assert!(!agent.state_dir().join("hosts").exists());

    // A host path the guest does not have (and was not sent) cannot be bind-mounted.
    let mut s = spec(process(&["true"]));
    s["mounts"].as_array_mut().unwrap().push(bind("/host/data", "/data"));
    let (code, msg) = status_of(agent.create("data", &s, rootfs.path(), (false, false, false)));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("/host/data"), "{msg}");
    assert!(msg.contains("need a shared file system, which husk does not have yet"), "{msg}");
    assert!(!agent.state_dir().join("data").exists());
    agent.shutdown();
}
