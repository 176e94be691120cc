//! The `husk` runtime end to end, driven as containerd's runc shim drives runc: bundles from
//! busybox-static, real guests inside the nested test host, the VM processes reaped by this
//! test process as a subreaper (as the shim is), and nothing left behind after each test.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_tests::oci::{process, spec};
use husk_tests::rootfs::add_host_program;
use husk_tests::runtime::{recv_fd, wait_pid, Husk};
use serde_json::json;

const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Wait until `id` exists and has `status`.
fn wait_status(husk: &Husk, id: &str, status: &str) {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        let out = husk.output(&["state", id]);
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if state["status"] == status {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never became {status}: {out:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn lifecycle_create_start_kill_delete() {
    let husk = Husk::new();
    let bundle = husk.bundle("life", &["sleep", "1000"]);
    let pid = husk.create("life", &bundle);
    let state = husk.state("life");
    assert_eq!(state["status"], "created");
    assert_eq!(state["pid"], pid);
    assert_eq!(state["bundle"], bundle.to_str().unwrap());
    assert_eq!(state["id"], "life");

    husk.ok(&["start", "life"]);
    assert_eq!(husk.state("life")["status"], "running");
    assert!(husk.fails(&["start", "life"]).contains("running"), "a second start is refused");
    assert!(husk.fails(&["delete", "life"]).contains("not stopped"), "a running one stays");

    husk.ok(&["kill", "life", "KILL"]);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 137, "the VM process exits as SIGKILL did");
    let state = husk.state("life");
    assert_eq!((state["status"].as_str(), state["pid"].as_i64()), (Some("stopped"), Some(0)));
    assert!(husk.fails(&["kill", "life", "TERM"]).contains("container not running"));

    husk.ok(&["delete", "life"]);
    assert!(husk.fails(&["state", "life"]).contains("container \"life\" does not exist"));
    let log = std::fs::read_to_string(husk.log()).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    assert_eq!(last["msg"], "container \"life\" does not exist");
    husk.assert_nothing_left();
}

#[test]
fn run_exit_codes_the_guest_kernel_and_stdin() {
    let husk = Husk::new();
    let bundle = husk.bundle("three", &["sh", "-c", "exit 3"]);
    let out = husk.cmd(&["run", "--bundle", bundle.to_str().unwrap(), "three"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let bundle = husk.bundle("uname", &["sh", "-c", "uname -r; cat /proc/cmdline"]);
    let out = husk.cmd(&["run", "--bundle", bundle.to_str().unwrap(), "uname"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (guest, cmdline) = stdout.split_once('\n').unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(!guest.is_empty());
    assert_ne!(guest, host.trim(), "uname -r in the container is the guest kernel's");
    // The guest kernel keeps no kernel memory accounting (4 MiB of metadata per idle VM), and
    // its boot log off the serial console (the tests' own parameters do not ask for either).
    for param in ["cgroup.memory=nokmem", "quiet"] {
        assert!(cmdline.split_whitespace().any(|p| p == param), "{param}: {cmdline}");
    }

    let bundle = husk.bundle("cat", &["sh", "-c", "cat; echo done >&2"]);
    let mut child = husk
        .cmd(&["run", "--bundle", bundle.to_str().unwrap(), "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        let input = input.clone();
        std::thread::spawn(move || stdin.write_all(&input).unwrap())
    };
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout == input, "stdin came back whole through cat ({} bytes)", out.stdout.len());
    assert!(String::from_utf8_lossy(&out.stderr).contains("done"));

    let bundle = husk.bundle("killed", &["sleep", "1000"]);
    let mut child =
        husk.cmd(&["run", "--bundle", bundle.to_str().unwrap(), "killed"]).spawn().unwrap();
    wait_status(&husk, "killed", "running");
    husk.ok(&["kill", "killed", "9"]);
    assert_eq!(child.wait().unwrap().code(), Some(137));
    husk.assert_nothing_left();
}

/// Output still on its way when the process exits reaches a slow reader whole, however long
/// that takes: the guest kernel resets a closed vsock socket 8 s after close, so the agent
/// closes a stream only after the host did, and husk waits for output that is being taken.
#[test]
fn output_reaches_a_slow_reader_whole_long_after_the_process_exited() {
    let husk = Husk::new();
    let bundle = husk.bundle("slow", &["sh", "-c", "seq 1 150000; echo exited >&2"]);
    let mut child = husk
        .cmd(&["run", "--bundle", bundle.to_str().unwrap(), "slow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let exited = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("exited") {
            match stderr.read(&mut buf).unwrap() {
                0 => return None,
                n => seen.extend_from_slice(&buf[..n]),
            }
        }
        Some(Instant::now())
    });
    // About 24 KiB/s: the last few hundred KiB, in buffers along the way when the process
    // exits, take far longer than 10 s to be read.
    let mut stdout = child.stdout.take().unwrap();
    let (mut got, mut buf) = (Vec::new(), vec![0u8; 6144]);
    loop {
        match stdout.read(&mut buf).unwrap() {
            0 => break,
            n => got.extend_from_slice(&buf[..n]),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let last_byte = Instant::now();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let exited = exited.join().unwrap().expect("the shell reported its end on stderr");
    let expected: String = (1..=150000).map(|n| format!("{n}\n")).collect();
    assert!(
        got == expected.as_bytes(),
        "{} bytes of stdout, expected {}",
        got.len(),
        expected.len()
    );
    let tail = last_byte - exited;
    assert!(tail > Duration::from_secs(10), "the test never made output wait: {tail:?}");
    husk.assert_nothing_left();
}

#[test]
fn a_terminal_through_the_console_socket_with_a_resize() {
    let husk = Husk::new();
    let mut p = process(&["sh"]);
    p["terminal"] = true.into();
    let bundle = husk.bundle_with("tty", spec(p));
    let socket = husk.dir().join("console.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let pid_file = husk.dir().join("tty.pid");
    let receiver = std::thread::spawn(move || recv_fd(&listener.accept().unwrap().0).1);
    husk.ok_detached(
        "tty",
        &[
            "create",
            "--bundle",
            bundle.to_str().unwrap(),
            "--console-socket",
            socket.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "tty",
        ],
    );
    let master = std::fs::File::from(receiver.join().unwrap());
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    husk.ok(&["start", "tty"]);
    let ws = libc::winsize { ws_row: 50, ws_col: 132, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
    assert_eq!(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) }, 0);
    // The resize travels as SIGWINCH -> TtyWinResize; give it a moment before asking.
    std::thread::sleep(Duration::from_secs(2));
    let mut writer = master.try_clone().unwrap();
    writer.write_all(b"stty size; tty; exit 7\n").unwrap();
    let mut seen = String::new();
    let mut reader = master;
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while !(seen.contains("50 132") && seen.contains("/dev/pts/")) {
        assert!(Instant::now() < deadline, "no size and tty in {seen:?}: {}", husk.logs());
        let mut pfd = libc::pollfd { fd: reader.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 1000) } <= 0 {
            continue;
        }
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    assert!(seen.contains("50 132"), "the guest terminal got the resize: {seen:?}");
    assert!(seen.contains("/dev/pts/"), "the shell has a terminal: {seen:?}");
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 7);
    husk.ok(&["delete", "tty"]);
    husk.assert_nothing_left();
}

#[test]
fn exec_ps_pause_resume_kill_all_and_delete_force() {
    let husk = Husk::new();
    let bundle = husk.bundle("box", &["sleep", "1000"]);
    let pid_file = husk.dir().join("box.pid");
    husk.ok_detached(
        "box",
        &[
            "run",
            "--detach",
            "--bundle",
            bundle.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "box",
        ],
    );
    let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert_eq!(husk.state("box")["status"], "running");

    let out = husk.output(&["exec", "-e", "WHO=exec", "box", "sh", "-c", "echo in $WHO; exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "in exec\n");

    let exec_pid_file = husk.dir().join("exec.pid");
    husk.ok_detached(
        "exec",
        &["exec", "--detach", "--pid-file", exec_pid_file.to_str().unwrap(), "box", "sleep", "999"],
    );
    let exec_pid: i32 = std::fs::read_to_string(&exec_pid_file).unwrap().trim().parse().unwrap();
    let pids: Vec<i32> =
        serde_json::from_str(&husk.ok(&["ps", "--format", "json", "box"])).unwrap();
    assert_eq!(
        pids,
        [husk.state("box")["pid"].as_i64().unwrap() as i32],
        "the VM process, for docker top"
    );
    let table = husk.ok(&["ps", "box"]);
    assert!(table.starts_with("UID") && table.contains("sleep 999"), "{table}");
    assert!(table.contains("sleep 1000"), "the guest's processes: {table}");

    husk.ok(&["pause", "box"]);
    assert_eq!(husk.state("box")["status"], "paused");
    assert!(husk.fails(&["exec", "box", "true"]).contains("paused"));
    husk.ok(&["resume", "box"]);
    assert_eq!(husk.state("box")["status"], "running");
    let stats: serde_json::Value =
        serde_json::from_str(&husk.ok(&["events", "--stats", "box"])).unwrap();
    assert_eq!(stats["type"], "stats");
    assert!(stats["data"]["pids"]["current"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0, "{stats}");
    // update: from flags, and from OCI resources JSON on stdin as containerd sends them.
    husk.ok(&["update", "--pids-limit", "50", "box"]);
    let mut update = husk.cmd(&["update", "--resources", "-", "box"]);
    let mut child = update.stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(br#"{"memory": {"limit": 134217728}}"#).unwrap();
    assert!(child.wait().unwrap().success());
    let stats: serde_json::Value =
        serde_json::from_str(&husk.ok(&["events", "--stats", "box"])).unwrap();
    assert_eq!(stats["data"]["pids"]["limit"], 50, "{stats}");
    assert_eq!(stats["data"]["memory"]["usage"]["limit"], 134217728u64, "{stats}");

    husk.ok(&["kill", "--all", "box", "KILL"]);
    assert_eq!(wait_pid(exec_pid, EXIT_TIMEOUT), 137, "the exec died with the rest");
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 137);
    husk.ok(&["delete", "box"]);

    // delete --force of a running container.
    let pid = husk.create("forced", &bundle);
    husk.ok(&["start", "forced"]);
    husk.ok(&["delete", "--force", "forced"]);
    wait_pid(pid, EXIT_TIMEOUT);
    assert!(husk.fails(&["state", "forced"]).contains("does not exist"));
    husk.assert_nothing_left();
}

#[test]
fn kill_9_of_the_vm_process_then_delete_leaves_nothing() {
    let husk = Husk::new();
    let bundle = husk.bundle("victim", &["sleep", "1000"]);
    let pid = husk.create("victim", &bundle);
    husk.ok(&["start", "victim"]);
    // SAFETY: kill(2) on the VM process this test's husk started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert_eq!(wait_pid(pid, EXIT_TIMEOUT), 137);
    assert_eq!(husk.state("victim")["status"], "stopped");
    assert!(husk.fails(&["exec", "victim", "true"]).contains("container not running"));
    husk.ok(&["delete", "victim"]);
    husk.assert_nothing_left();
}

#[test]
fn twenty_containers_in_parallel_leave_nothing() {
    let husk = std::sync::Arc::new(Husk::new());
    let bundle = husk.bundle("many", &["sleep", "1000"]);
    let ids: Vec<String> = (0..20).map(|i| format!("many-{i}")).collect();
    let create: Vec<_> = ids
        .iter()
        .map(|id| {
            let (husk, bundle, id) = (husk.clone(), bundle.clone(), id.clone());
            std::thread::spawn(move || {
                husk.create(&id, &bundle);
                husk.ok(&["start", &id]);
            })
        })
        .collect();
    for t in create {
        t.join().unwrap();
    }
    let listed = husk.ok(&["list", "--quiet"]);
    assert_eq!(listed.lines().count(), 20, "{listed}");
    let delete: Vec<_> = ids
        .iter()
        .map(|id| {
            let (husk, id) = (husk.clone(), id.clone());
            std::thread::spawn(move || husk.ok(&["delete", "--force", &id]))
        })
        .collect();
    for t in delete {
        t.join().unwrap();
    }
    husk.assert_nothing_left();
}

#[test]
fn bad_bundles_and_ids_get_clear_errors_and_leave_nothing() {
    let husk = Husk::new();
    let empty = husk.dir().join("bundles/empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = husk.fails(&["create", "--bundle", empty.to_str().unwrap(), "c"]);
    assert!(e.contains("has no config.json"), "{e}");

    let bad_json = husk.dir().join("bundles/bad-json");
    std::fs::create_dir_all(&bad_json).unwrap();
    std::fs::write(bad_json.join("config.json"), "{ not json").unwrap();
    let e = husk.fails(&["create", "--bundle", bad_json.to_str().unwrap(), "c"]);
    assert!(e.contains("is not valid JSON"), "{e}");

    let mut no_rootfs = spec(process(&["true"]));
    no_rootfs["root"]["path"] = "missing-rootfs".into();
    let dir = husk.dir().join("bundles/no-rootfs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), no_rootfs.to_string()).unwrap();
    let e = husk.fails(&["create", "--bundle", dir.to_str().unwrap(), "c"]);
    assert!(e.contains("missing-rootfs") && e.contains("does not exist"), "{e}");

    for verb in [&["state"][..], &["start"], &["kill"], &["delete"], &["exec"], &["pause"]] {
        let mut args = verb.to_vec();
        args.push("nobody");
        if verb[0] == "exec" {
            args.push("true");
        }
        let e = husk.fails(&args);
        assert!(e.contains("container \"nobody\" does not exist"), "{verb:?}: {e}");
    }
    husk.assert_nothing_left();

    let bundle = husk.bundle("twice", &["sleep", "1000"]);
    let pid = husk.create("twice", &bundle);
    let e = husk.fails(&["create", "--bundle", bundle.to_str().unwrap(), "twice"]);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(husk.state("twice")["status"], "created", "the first one is untouched");
    husk.ok(&["delete", "twice"]);
    wait_pid(pid, EXIT_TIMEOUT);
    husk.assert_nothing_left();
}

/// A network namespace with a veth whose other end is in the test's namespace.
struct Netns {
    name: String,
    host_veth: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("ip runs");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    fn new(n: u32) -> Self {
        let name = format!("husk-e2e-{}-{n}", std::process::id());
        let host_veth = format!("hve{n}");
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &name]);
        ip(&["addr", "add", "10.200.0.1/24", "dev", &host_veth]);
        ip(&["link", "set", &host_veth, "up"]);
        ip(&["-n", &name, "addr", "add", "10.200.0.2/24", "dev", "eth0"]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "route", "add", "default", "via", "10.200.0.1"]);
        Netns { name, host_veth }
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.host_veth]).status();
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Listen on `addr` and take one connection: who sent it and what it sent, to EOF.
fn receive_once(addr: &str) -> std::thread::JoinHandle<(std::net::SocketAddr, String)> {
    let listener = std::net::TcpListener::bind(addr).unwrap();
    std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        (peer, got)
    })
}

#[test]
fn a_container_in_a_network_namespace_reaches_outside_through_the_tap() {
    let husk = Husk::new();
    let netns = Netns::new(1);
    let server = receive_once("10.200.0.1:18080");
    let mut config = spec(process(&[
        "sh",
        "-c",
        "ip addr show eth0; echo hello from the guest | nc 10.200.0.1 18080",
    ]));
    config["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        {"type": "network", "path": netns.path()}
    ]);
    let bundle = husk.bundle_with("net", config);
    let out = husk.cmd(&["run", "--bundle", bundle.to_str().unwrap(), "net"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("10.200.0.2/24"), "the guest NIC has the veth's address: {stdout}");
    let (peer, got) = server.join().unwrap();
    assert_eq!(got, "hello from the guest\n");
    assert_eq!(peer.ip().to_string(), "10.200.0.2");
    // The tap and the veth's filters went with the container.
    let links =
        std::process::Command::new("ip").args(["-n", &netns.name, "-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("husk"), "the tap is gone: {links}");
    let qdiscs = std::process::Command::new("tc")
        .args(["-n", &netns.name, "qdisc", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&qdiscs.stdout).contains("ingress"), "filters are gone");
    // The guest was restored from a VM template, whose NIC the agent gave the veth's MAC (the
    // address the reply came from is the veth's, and the guest printed its link).
    let log = std::fs::read_to_string(husk.log()).unwrap();
    assert!(log.contains("micro-VM restored"), "{log}");
    let mac = std::process::Command::new("ip")
        .args(["-n", &netns.name, "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    let mac = String::from_utf8_lossy(&mac.stdout);
    let mac = mac.split("link/ether ").nth(1).and_then(|m| m.split(' ').next()).unwrap();
    assert!(stdout.contains(&format!("link/ether {mac}")), "the guest NIC has {mac}: {stdout}");
    husk.assert_nothing_left();
}

/// Containers without NICs are restored from one VM template, made by the first: the guest
/// kernel's random number generator, which every restored guest starts with, is reseeded from
/// the host in each (and a kernel UUID drawn from it differs, as it would from the kernel's own
/// reseeding too); with HUSK_VM_TEMPLATES=0 they boot.
#[test]
fn containers_are_restored_from_one_template_each_with_its_rng_reseeded() {
    let husk = Husk::new();
    let bundle = husk.bundle(
        "uuid",
        &["cat", "/proc/sys/kernel/random/uuid", "/proc/sys/kernel/random/boot_id"],
    );
    let mut uuids = Vec::new();
    for id in ["first", "second", "third"] {
        let out = husk.cmd(&["run", "--bundle", bundle.to_str().unwrap(), id]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", husk.logs());
        uuids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let log = std::fs::read_to_string(husk.log()).unwrap();
    assert_eq!(log.matches("VM template").count(), 1, "one template, made once: {log}");
    assert_eq!(log.matches("micro-VM restored").count(), 3, "{log}");
    assert_eq!(log.matches("random number generator reseeded").count(), 3, "{log}");
    assert_eq!(log.matches("micro-VM built in").count(), 1, "only the template booted: {log}");
    let templates: Vec<_> = std::fs::read_dir(husk.dir().join("cache/templates"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(templates.len(), 1, "one template directory, no partial ones: {templates:?}");
    // A UUID and the boot id (made at its first read, after the restore) of each.
    assert!(uuids.iter().all(|u| u.len() == 36 * 2 + 1), "{uuids:?}");
    assert!(uuids[0] != uuids[1] && uuids[1] != uuids[2] && uuids[0] != uuids[2], "{uuids:?}");
    let boot_ids: Vec<&str> = uuids.iter().map(|u| &u[37..]).collect();
    assert!(boot_ids[0] != boot_ids[1] && boot_ids[1] != boot_ids[2], "{boot_ids:?}");
    let mode = std::fs::metadata(husk.dir().join("cache/templates").join(&templates[0]))
        .unwrap()
        .permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o700, "root's only");

    let out = husk
        .cmd(&["run", "--bundle", bundle.to_str().unwrap(), "booted"])
        .env("HUSK_VM_TEMPLATES", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let log = std::fs::read_to_string(husk.log()).unwrap();
    assert_eq!(log.matches("micro-VM restored").count(), 3, "the fourth booted: {log}");
    assert_eq!(log.matches("micro-VM built in").count(), 2, "{log}");
    // Once its container was made, the booted guest's VM gave the host the pages its boot left
    // zeroed (about 3 MiB of a fresh guest; a restored guest's memory is the template's file).
    let given_back: Vec<u64> = log
        .lines()
        .filter_map(|line| line.split("gave back ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        given_back.len() == 1 && given_back[0] >= 1024,
        "zero pages given back: {given_back:?}"
    );
    husk.assert_nothing_left();
}

/// A container's process reaching the agent over the guest's vsock loopback: the agent's ttrpc
/// port (1024) would hand it the guest's root (CreateContainer, ExecProcess with any spec) and
/// its stdio port (1025) other processes' streams. The agent takes connections from the host
/// (CID 2) only, so both close at once. The probe is perl (raw AF_VSOCK sockets, no module):
/// for each port it connects to CID 1, asks the ttrpc service for Check, and prints whether an
/// answer came, the connection closed, or it stayed open (5 s).
const VSOCK_PROBE: &str = r#"
for my $port (1024, 1025) {
    socket(my $s, 40, 1, 0) or die "socket: $!";
    if (!connect($s, pack("SSLLCx3", 40, 0, $port, 1, 0))) { print "$port refused ($!)\n"; next }
    my ($svc, $method) = ("husk.agent.v1.Agent", "Check");
    my $req = "\x0a" . chr(length $svc) . $svc . "\x12" . chr(length $method) . $method;
    syswrite($s, pack("NNCC", length $req, 1, 1, 0) . $req);
    my $n = eval { local $SIG{ALRM} = sub { die "open\n" }; alarm 5; my $n = sysread($s, my $buf, 4096); alarm 0; $n };
    print "$port ", ($@ ? "stayed open" : $n ? "answered" : "closed"), "\n";
}
"#;

#[test]
fn the_agent_refuses_vsock_connections_from_inside_the_guest() {
    let husk = Husk::new();
    add_host_program(husk.rootfs(), Path::new("/usr/bin/perl"));
    let bundle = husk.bundle("probe", &["perl", "-e", VSOCK_PROBE]);
    let out = husk.cmd(&["run", "--bundle", bundle.to_str().unwrap(), "probe"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "one line per port: {out:?}");
    for (line, port) in lines.iter().zip(["1024", "1025"]) {
        let verdict = line.strip_prefix(port).map(str::trim);
        assert!(
            verdict.is_some_and(|v| v == "closed" || v.starts_with("refused")),
            "the agent's port {port} must not serve the container: {line}"
        );
    }
    husk.assert_nothing_left();
}

/// A hook script line that takes the state from stdin: `$pid` and `$status`.
const READ_STATE: &str = r#"state=$(cat); pid=$(echo "$state" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p'); status=$(echo "$state" | sed -n 's/.*"status":"\([a-z]*\)".*/\1/p')"#;

#[test]
fn hooks_run_in_order_and_prestart_fills_a_new_network_namespace_as_docker_does() {
    let husk = Husk::new();
    let log = husk.dir().join("hooks.log");
    let log = log.to_str().unwrap();
    // As Docker's libnetwork-setkey: from the pid in the state, put a veth into the
    // container's namespace and configure it there.
    let prestart = format!(
        "{READ_STATE}; echo \"prestart $status $(readlink /proc/self/ns/net) \
         $(readlink /proc/$pid/ns/net)\" >> {log}; \
         ip link add hk-h2 type veth peer name eth0 netns $pid && \
         ip addr add 10.201.0.1/24 dev hk-h2 && ip link set hk-h2 up && \
         nsenter --net=/proc/$pid/ns/net sh -c 'ip addr add 10.201.0.2/24 dev eth0 && \
         ip link set eth0 up && ip route add default via 10.201.0.1'"
    );
    let stage = |name: &str| {
        json!({"path": "/bin/sh", "args": ["sh", "-c", format!("{READ_STATE}; echo \"{name} $status\" >> {log}")],
               "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]})
    };
    let mut config = spec(process(&[
        "sh",
        "-c",
        "ip addr show eth0; echo hello through the hook | nc 10.201.0.1 18081",
    ]));
    config["hooks"] = json!({
        "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", prestart],
                      "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}],
        "createRuntime": [stage("createRuntime")],
        "poststart": [stage("poststart")],
        "poststop": [stage("poststop")],
    });
    let server = receive_once("0.0.0.0:18081");
    let bundle = husk.bundle_with("hooks", config);
    let out = husk.cmd(&["run", "--bundle", bundle.to_str().unwrap(), "hooks"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", husk.logs());
    assert!(stdout.contains("10.201.0.2/24"), "the guest NIC has the veth's address: {stdout}");
    let (peer, got) = server.join().unwrap();
    assert_eq!(got, "hello through the hook\n");
    assert_eq!(peer.ip().to_string(), "10.201.0.2");

    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let ours = ours.to_str().unwrap();
    let lines: Vec<String> =
        std::fs::read_to_string(log).unwrap().lines().map(String::from).collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let prestart: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(prestart[..3], ["prestart", "creating", ours], "prestart runs in husk's namespace");
    assert_ne!(prestart[3], ours, "the VM process is in a new namespace: {lines:?}");
    assert_eq!(lines[1..], ["createRuntime creating", "poststart running", "poststop stopped"]);
    // The namespace went with the VM process, and the veth pair with it.
    let link = std::process::Command::new("ip").args(["link", "show", "hk-h2"]).output().unwrap();
    assert!(!link.status.success(), "the host end of the veth is gone");
    husk.assert_nothing_left();
}
