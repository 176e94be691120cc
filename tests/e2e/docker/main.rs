//! Docker end to end: one private dockerd (`husk_tests::docker`) with husk as its default
//! runtime, and every case run twice, as `husk::<case>` (no `--runtime` flag) and as
//! `runc::<case>` (`--runtime runc`, the oracle: the same assertions hold for it, except where
//! the VM makes husk differ, which the case handles by runtime). Its own main (libtest-mimic):
//! it starts dockerd, runs the selected cases one at a time (they share port 18080, and husk's
//! guests boot one after another anyway), stops dockerd and fails if anything is left behind.
//! Filter as usual: `cargo test -p husk-e2e --test docker -- runc::`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use husk_tests::docker::{describe, Dockerd, Runtime, BUSYBOX_IMAGE, DNS};
use husk_tests::pty::Pty;
use husk_tests::tiny_guest::TempDir;
use libtest_mimic::{Arguments, Failed, Trial};

/// How long a terminal may take to answer (a husk container boots first).
const TTY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one case may run in the nested test host (the slowest take a minute or two).
const CASE_TIMEOUT: Duration = Duration::from_secs(600);
/// The host port published to a container's port 80.
const PUBLISHED_PORT: u16 = 18080;

/// A case: its name and body.
type Case = (&'static str, fn(&Dockerd, Runtime));

const CASES: &[Case] = &[
    ("kernel_cpus_memory", kernel_cpus_memory),
    ("exit_code", exit_code),
    ("kill_then_wait_137", kill_then_wait_137),
    ("stop_kills_after_timeout", stop_kills_after_timeout),
    ("stop_graceful_and_logs", stop_graceful_and_logs),
    ("stdin_stdout_stderr", stdin_stdout_stderr),
    ("terminal_run_and_exec", terminal_run_and_exec),
    ("env_workdir_user_hostname", env_workdir_user_hostname),
    ("read_only_root_and_tmpfs", read_only_root_and_tmpfs),
    ("memory_limit_oom", memory_limit_oom),
    ("exec_top_pause_restart_rm", exec_top_pause_restart_rm),
    ("network_bridge", network_bridge),
    ("network_none", network_none),
    ("bind_mount", bind_mount),
    ("named_volume", named_volume),
    ("debian_image", debian_image),
];

/// A container (or volume) that a case names, removed when the case ends however it ends.
struct Named<'a> {
    docker: &'a Dockerd,
    kind: &'static str,
    name: String,
}

impl<'a> Named<'a> {
    fn container(docker: &'a Dockerd, runtime: Runtime, case: &str) -> Self {
        Named { docker, kind: "container", name: format!("{case}-{}", runtime.name()) }
    }

    fn volume(docker: &'a Dockerd, runtime: Runtime, case: &str) -> Self {
        Named { docker, kind: "volume", name: format!("{case}-{}", runtime.name()) }
    }
}

impl Drop for Named<'_> {
    fn drop(&mut self) {
        let _ = self.docker.output(&[self.kind, "rm", "-f", &self.name]);
    }
}

/// The exit code of a finished command.
fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or_else(|| panic!("docker was killed: {}", describe(out)))
}

/// The stdout of a command that must have succeeded.
fn stdout_ok(out: &std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", describe(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `docker run -d --name NAME ...` of a container the case then works with.
fn run_detached(d: &Dockerd, rt: Runtime, name: &Named, args: &[&str]) {
    let all = [&["-d", "--name", name.name.as_str()][..], args].concat();
    stdout_ok(&d.run(rt, &all), &format!("docker run -d {args:?}"));
}

/// Wait until `docker logs NAME` shows `text` (the container got that far).
fn wait_for_log(d: &Dockerd, name: &str, text: &str) {
    let deadline = Instant::now() + TTY_TIMEOUT;
    loop {
        let out = d.output(&["logs", name]);
        if String::from_utf8_lossy(&out.stdout).contains(text) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never logged {text:?}: {}", describe(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The host's `nproc` (CPUs this process may run on).
fn host_nproc() -> usize {
    let out = std::process::Command::new("nproc").output().expect("run nproc");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("nproc prints a number")
}

/// MemTotal in KiB from a /proc/meminfo text.
fn mem_total_kib(meminfo: &str) -> u64 {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"));
    let value = line.and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok());
    value.unwrap_or_else(|| panic!("no MemTotal in {meminfo:?}"))
}

/// `uname -r` is the guest kernel's for husk and the host's for runc; `--cpus 2` gives husk two
/// vCPUs while runc's container sees the host's CPUs (a quota is no affinity); `--memory 256m`
/// sizes husk's guest (limit + 96 MiB), while runc's container sees the host's MemTotal. Docker
/// refuses more `--cpus` than the host has (the nested test host has one), so it asks for at
/// most that many.
fn kernel_cpus_memory(d: &Dockerd, rt: Runtime) {
    let cpus = host_nproc().min(2);
    let script = "uname -r; nproc; cat /proc/meminfo";
    let cpus_flag = cpus.to_string();
    let out = d.run(
        rt,
        &["--rm", "--cpus", &cpus_flag, "--memory", "256m", BUSYBOX_IMAGE, "sh", "-c", script],
    );
    let text = stdout_ok(&out, "uname/nproc/meminfo");
    let mut lines = text.lines();
    let release = lines.next().unwrap_or_default().trim().to_string();
    let nproc: usize =
        lines.next().unwrap_or_default().trim().parse().expect("nproc prints a number");
    let mem_kib = mem_total_kib(&text);
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let host_mem = mem_total_kib(&std::fs::read_to_string("/proc/meminfo").unwrap());
    match rt {
        Runtime::Husk => {
            assert!(!release.is_empty(), "no uname -r: {text:?}");
            assert_ne!(
                release,
                host_release.trim(),
                "uname -r is the guest kernel's, not the host's"
            );
            assert_eq!(nproc, cpus, "--cpus {cpus}: as many vCPUs");
            assert!(
                mem_kib <= (256 + 96) * 1024 && mem_kib > 128 * 1024,
                "--memory 256m: the guest has 256 + 96 MiB, its MemTotal is {mem_kib} KiB"
            );
        }
        Runtime::Runc => {
            assert_eq!(release, host_release.trim(), "uname -r is the host's");
            assert_eq!(
                nproc,
                host_nproc(),
                "--cpus limits time, not the CPUs runc's container sees"
            );
            assert_eq!(mem_kib, host_mem, "runc's container sees the host's MemTotal");
        }
    }
}

/// The container's exit code is `docker run`'s.
fn exit_code(d: &Dockerd, rt: Runtime) {
    let out = d.run(rt, &["--rm", BUSYBOX_IMAGE, "sh", "-c", "exit 3"]);
    assert_eq!(code(&out), 3, "sh -c 'exit 3': {}", describe(&out));
}

/// `docker kill` (SIGKILL) then `docker wait` prints 137.
fn kill_then_wait_137(d: &Dockerd, rt: Runtime) {
    let c = Named::container(d, rt, "kill");
    run_detached(d, rt, &c, &[BUSYBOX_IMAGE, "sleep", "1d"]);
    d.ok(&["kill", &c.name]);
    assert_eq!(d.ok(&["wait", &c.name]).trim(), "137", "docker wait after docker kill");
}

/// `docker stop -t 1` of a container that ignores SIGTERM kills it after the timeout: 137, in
/// less than Docker's default 10 s stop timeout (generous: the point is that -t 1 is honoured).
fn stop_kills_after_timeout(d: &Dockerd, rt: Runtime) {
    let c = Named::container(d, rt, "stop-kill");
    let script = "trap '' TERM; echo ready; sleep 1d";
    run_detached(d, rt, &c, &[BUSYBOX_IMAGE, "sh", "-c", script]);
    wait_for_log(d, &c.name, "ready");
    let started = Instant::now();
    d.ok(&["stop", "-t", "1", &c.name]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "docker stop -t 1 took {took:?}");
    assert_eq!(d.inspect(&c.name, "{{.State.ExitCode}}"), "137", "killed after the timeout");
}

/// `docker stop` of a shell that exits 0 on SIGTERM gives 0; `docker logs` of the detached
/// container has what it printed, stdout and stderr apart.
fn stop_graceful_and_logs(d: &Dockerd, rt: Runtime) {
    let c = Named::container(d, rt, "stop-graceful");
    let script = "trap 'exit 0' TERM; echo ready; echo on-stderr >&2; while :; do sleep 0.1; done";
    run_detached(d, rt, &c, &[BUSYBOX_IMAGE, "sh", "-c", script]);
    wait_for_log(d, &c.name, "ready");
    d.ok(&["stop", "-t", "60", &c.name]);
    assert_eq!(d.inspect(&c.name, "{{.State.ExitCode}}"), "0", "the shell exits 0 on SIGTERM");
    let logs = d.output(&["logs", &c.name]);
    assert!(logs.status.success(), "docker logs: {}", describe(&logs));
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "ready\n", "docker logs' stdout");
    assert_eq!(String::from_utf8_lossy(&logs.stderr), "on-stderr\n", "docker logs' stderr");
}

/// `docker run -i`: stdin reaches the container, a few MiB of stdout come back whole, stderr
/// comes back apart.
fn stdin_stdout_stderr(d: &Dockerd, rt: Runtime) {
    let mut cmd = d.docker(&[]);
    cmd.arg("run").args(rt.flags());
    cmd.args(["-i", "--rm", BUSYBOX_IMAGE, "sh", "-c", "cat; seq 1 500000; echo on-stderr >&2"]);
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run docker");
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let mut expected = b"hi\n".to_vec();
    for n in 1..=500000 {
        expected.extend_from_slice(format!("{n}\n").as_bytes());
    }
    if out.stdout != expected {
        let at = out.stdout.iter().zip(&expected).position(|(a, b)| a != b);
        panic!(
            "stdout differs: {} bytes, expected {} (first difference at {at:?}); it starts {:?}",
            out.stdout.len(),
            expected.len(),
            String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(200)])
        );
    }
    assert_eq!(String::from_utf8_lossy(&out.stderr), "on-stderr\n", "stderr");
}

/// Wait until `stty size` in the shell on `pty` shows `size`: the client sends its terminal's
/// size (at start and on SIGWINCH) after the process has started, so it arrives a little later.
fn wait_for_size(pty: &mut Pty, size: &str, what: &str) {
    let deadline = Instant::now() + TTY_TIMEOUT;
    let mut seen = pty.query("stty size", TTY_TIMEOUT);
    while seen != size && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        seen = pty.query("stty size", TTY_TIMEOUT);
    }
    assert_eq!(seen, size, "{what}");
}

/// `tty` in the shell on `pty` names a terminal.
fn assert_a_terminal(pty: &mut Pty, what: &str) {
    let tty = pty.query("tty", TTY_TIMEOUT);
    assert!(tty.starts_with("/dev/pts/") || tty == "/dev/console", "tty in {what}: {tty:?}");
}

/// `docker run -it` and `docker exec -it` on a terminal: the container's process has a
/// terminal of the terminal's size, follows a resize, echoes what is typed, and its exit code
/// is the client's.
fn terminal_run_and_exec(d: &Dockerd, rt: Runtime) {
    let c = Named::container(d, rt, "tty");
    let mut pty = Pty::open(50, 132);
    let mut run = d.docker(&[]);
    run.arg("run").args(rt.flags()).args(["-it", "--name", &c.name, BUSYBOX_IMAGE, "sh"]);
    let mut client = pty.spawn(run);
    assert_a_terminal(&mut pty, "docker run -it");
    wait_for_size(&mut pty, "50 132", "the terminal's size");
    pty.resize(40, 100);
    wait_for_size(&mut pty, "40 100", "the size after a resize");
    pty.send("echo typed-$((6*7))\r");
    pty.expect("echo typed-$((6*7))", TTY_TIMEOUT);
    pty.expect("typed-42", TTY_TIMEOUT);

    let mut exec_pty = Pty::open(30, 90);
    let exec = d.docker(&["exec", "-it", &c.name, "sh"]);
    let mut exec_client = exec_pty.spawn(exec);
    assert_a_terminal(&mut exec_pty, "docker exec -it");
    wait_for_size(&mut exec_pty, "30 90", "the exec terminal's size");
    exec_pty.send("exit 5\r");
    assert_eq!(exec_pty.wait(&mut exec_client, TTY_TIMEOUT), 5, "docker exec -it's exit code");

    pty.send("exit 7\r");
    assert_eq!(pty.wait(&mut client, TTY_TIMEOUT), 7, "docker run -it's exit code");
}

/// `-e`, `-w`, `-u` and `--hostname` reach the container's process.
fn env_workdir_user_hostname(d: &Dockerd, rt: Runtime) {
    let script = "echo \"foo=$FOO\"; echo \"pwd=$(pwd)\"; id; echo \"hostname=$(hostname)\"";
    let out = d.run(
        rt,
        &[
            "--rm",
            "-e",
            "FOO=bar",
            "-w",
            "/tmp",
            "-u",
            "1000:1000",
            "--hostname",
            "h1",
            BUSYBOX_IMAGE,
            "sh",
            "-c",
            script,
        ],
    );
    let text = stdout_ok(&out, "env/workdir/user/hostname");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text:?}");
    assert_eq!(lines[0], "foo=bar", "-e FOO=bar");
    assert_eq!(lines[1], "pwd=/tmp", "-w /tmp");
    assert!(
        lines[2].starts_with("uid=1000(") && lines[2].contains(" gid=1000("),
        "id: {}",
        lines[2]
    );
    assert_eq!(lines[3], "hostname=h1", "--hostname h1");
}

/// `--read-only`: / cannot be written; `--tmpfs /scratch`: a writable tmpfs there.
fn read_only_root_and_tmpfs(d: &Dockerd, rt: Runtime) {
    let script = "if touch /probe; then echo root=writable; else echo root=read-only; fi; \
                  echo data > /scratch/f && echo scratch=$(cat /scratch/f); \
                  grep ' /scratch ' /proc/mounts";
    let out = d.run(
        rt,
        &["--rm", "--read-only", "--tmpfs", "/scratch", BUSYBOX_IMAGE, "sh", "-c", script],
    );
    let text = stdout_ok(&out, "read-only/tmpfs");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"root=read-only"), "writing / fails: {}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "touch /probe fails with EROFS: {}",
        describe(&out)
    );
    assert_eq!(lines.get(1), Some(&"scratch=data"), "/scratch is writable: {text:?}");
    let mount: Vec<&str> = lines.get(2).copied().unwrap_or_default().split(' ').collect();
    assert_eq!(mount.get(1..3), Some(&["/scratch", "tmpfs"][..]), "/scratch is a tmpfs: {text:?}");
}

/// `--memory 64m` and a shell that outgrows it: the container is OOM-killed, exit 137. Docker's
/// OOMKilled comes from the shim watching the container's cgroup on the host: true for runc;
/// for husk the OOM kill happens in the guest's cgroup, which the shim does not see, so the case
/// prints what Docker shows and asserts only the exit code.
fn memory_limit_oom(d: &Dockerd, rt: Runtime) {
    let c = Named::container(d, rt, "oom");
    let script = "x=aaaaaaaaaaaaaaaa; while :; do x=$x$x; done";
    let out = d.run(rt, &["--name", &c.name, "--memory", "64m", BUSYBOX_IMAGE, "sh", "-c", script]);
    assert_eq!(code(&out), 137, "a container over its memory limit is killed: {}", describe(&out));
    let oom_killed = d.inspect(&c.name, "{{.State.OOMKilled}}");
    match rt {
        Runtime::Runc => assert_eq!(oom_killed, "true", "docker inspect's OOMKilled"),
        Runtime::Husk => {
            eprintln!("husk::memory_limit_oom: docker inspect shows OOMKilled={oom_killed}")
        }
    }
}

/// A detached container: `docker exec` (exit codes, `-e`), its host process in its cgroup,
/// `docker stats`, `docker top`, `docker pause` and `unpause` (exec refused while paused),
/// `docker restart`, `docker rm -f` while it runs.
/// `docker top` lists the container's pid as Docker knows it (`.State.Pid`): runc's is the
/// container's `sleep`; husk's is the VM process on the host (the container's processes exist
/// only in the guest), as Kata's is.
fn exec_top_pause_restart_rm(d: &Dockerd, rt: Runtime) {
    let c = Named::container(d, rt, "lifecycle");
    run_detached(d, rt, &c, &[BUSYBOX_IMAGE, "sleep", "1d"]);
    let name = c.name.as_str();
    let out = d.output(&["exec", name, "sh", "-c", "exit 5"]);
    assert_eq!(code(&out), 5, "docker exec's exit code: {}", describe(&out));
    assert_eq!(d.ok(&["exec", "-e", "BAR=baz", name, "sh", "-c", "echo $BAR"]), "baz\n", "exec -e");

    let pid = d.inspect(name, "{{.State.Pid}}");
    // That process is in the container's host cgroup (Docker's cgroupfs parent), where the shim
    // reads `docker stats` and watches for OOM events.
    let id = d.inspect(name, "{{.Id}}");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    assert!(
        cgroup.lines().any(|l| l.ends_with(&format!("/docker/{id}"))),
        "process {pid} is in the cgroup /docker/{id}: {cgroup}"
    );
    // docker stats reads that cgroup: for husk the whole VM's host memory.
    let usage = d.ok(&["stats", "--no-stream", "--format", "{{.MemUsage}}", name]);
    let used = usage.split('/').next().unwrap_or_default().trim();
    let digits: String = used.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    assert!(
        digits.parse::<f64>().is_ok_and(|n| n > 0.0),
        "docker stats shows the container's memory use: {usage:?}"
    );
    let top = d.ok(&["top", name, "-o", "pid,args"]);
    let rows: Vec<Vec<&str>> =
        top.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert!(rows.iter().any(|r| r.first() == Some(&pid.as_str())), "docker top lists {pid}: {top}");
    if rt == Runtime::Runc {
        let sleep = rows.iter().any(|r| r.get(1..) == Some(&["sleep", "1d"][..]));
        assert!(sleep, "docker top lists sleep: {top}");
    }

    d.ok(&["pause", name]);
    assert_eq!(d.inspect(name, "{{.State.Paused}} {{.State.Status}}"), "true paused");
    let out = d.output(&["exec", name, "true"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("paused"),
        "exec into a paused container is refused: {}",
        describe(&out)
    );
    d.ok(&["unpause", name]);
    assert_eq!(d.inspect(name, "{{.State.Paused}} {{.State.Status}}"), "false running");
    d.ok(&["exec", name, "true"]);

    let started = d.inspect(name, "{{.State.StartedAt}}");
    d.ok(&["restart", "-t", "1", name]);
    assert_eq!(d.inspect(name, "{{.State.Running}}"), "true", "running after docker restart");
    assert_ne!(d.inspect(name, "{{.State.StartedAt}}"), started, "restart started it anew");
    d.ok(&["exec", name, "true"]);

    d.ok(&["rm", "-f", name]);
    let out = d.output(&["inspect", name]);
    assert!(!out.status.success(), "docker rm -f removed it: {}", describe(&out));
}

/// Answer one connection: read a line, reply `pong-from-host`. Gives up after `timeout`.
fn serve_once(listener: TcpListener, timeout: Duration) -> std::thread::JoinHandle<String> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        let (stream, _) = loop {
            match listener.accept() {
                Ok(conn) => break conn,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return format!("no connection: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(timeout)).unwrap();
        let mut line = String::new();
        let _ = BufReader::new(&stream).read_line(&mut line);
        let _ = (&stream).write_all(b"pong-from-host\n");
        line
    })
}

/// An HTTP GET of / from `addr`; the response.
fn http_get(addr: &str) -> String {
    let mut stream =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

/// Docker's default bridge: the container has the address `docker inspect` reports and the
/// daemon's DNS server; another container reaches its HTTP server; it reaches a server on the
/// host's bridge address; `-p` publishes its port 80 on the host's loopback and bridge address.
fn network_bridge(d: &Dockerd, rt: Runtime) {
    let c = Named::container(d, rt, "web");
    let port = format!("{PUBLISHED_PORT}:80");
    let script =
        "mkdir /www && echo hello-from-httpd > /www/index.html && exec httpd -f -p 80 -h /www";
    run_detached(d, rt, &c, &["-p", &port, BUSYBOX_IMAGE, "sh", "-c", script]);
    let ip = d.inspect(&c.name, "{{.NetworkSettings.IPAddress}}");
    let gateway = d.inspect(&c.name, "{{.NetworkSettings.Gateway}}");
    assert!(!ip.is_empty() && !gateway.is_empty(), "an address on the bridge: {ip:?} {gateway:?}");
    let addrs = d.ok(&["exec", &c.name, "ip", "-4", "-o", "addr", "show"]);
    assert!(addrs.contains(&format!("inet {ip}/")), "ip -4 addr shows {ip}: {addrs}");
    let resolv = d.ok(&["exec", &c.name, "cat", "/etc/resolv.conf"]);
    assert!(resolv.lines().any(|l| l.trim() == format!("nameserver {DNS}")), "{resolv}");

    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = listener.local_addr().unwrap().port();
    let server = serve_once(listener, TTY_TIMEOUT);
    // httpd may not listen yet when the client comes: it tries for a while.
    let client = format!(
        "for i in $(seq 1 60); do wget -qO- http://{ip}/ && break; sleep 1; done; \
         echo ping | nc {gateway} {host_port}"
    );
    let out = d.run(rt, &["--rm", BUSYBOX_IMAGE, "sh", "-c", &client]);
    let text = stdout_ok(&out, "the client container");
    assert!(text.contains("hello-from-httpd"), "container to container: {}", describe(&out));
    assert!(text.contains("pong-from-host"), "container to the host: {}", describe(&out));
    assert_eq!(server.join().unwrap(), "ping\n", "what the host's server received");

    for host in ["127.0.0.1", gateway.as_str()] {
        let response = http_get(&format!("{host}:{PUBLISHED_PORT}"));
        assert!(response.contains("hello-from-httpd"), "-p {port} on {host}: {response:?}");
    }
}

/// `--network none`: loopback only.
fn network_none(d: &Dockerd, rt: Runtime) {
    let out = d.run(rt, &["--rm", "--network", "none", BUSYBOX_IMAGE, "ip", "-o", "addr", "show"]);
    let text = stdout_ok(&out, "ip addr with --network none");
    let devices: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert!(!devices.is_empty(), "loopback has addresses: {text:?}");
    assert!(devices.iter().all(|dev| *dev == "lo"), "only loopback has addresses: {text}");
}

/// A file in a host directory, for the bind mount and volume cases.
const HOST_FILE: &str = "from-the-host";

/// husk cannot bind-mount a host directory (no shared file system yet): `docker run` must fail
/// and say so, never run the container on an empty directory.
fn assert_husk_refuses_mount(out: &std::process::Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("shared file system"),
        "husk must refuse a host directory bind mount, naming the missing shared file system: {}",
        describe(out)
    );
}

/// `-v <host dir>:/data`: runc shows the host's file; husk refuses.
fn bind_mount(d: &Dockerd, rt: Runtime) {
    let host_dir = TempDir::new("docker-bind");
    host_dir.write("hello.txt", HOST_FILE.as_bytes());
    let volume = format!("{}:/data", host_dir.path().display());
    let out = d.run(rt, &["--rm", "-v", &volume, BUSYBOX_IMAGE, "cat", "/data/hello.txt"]);
    match rt {
        Runtime::Runc => assert_eq!(stdout_ok(&out, "cat from a bind mount"), HOST_FILE),
        Runtime::Husk => assert_husk_refuses_mount(&out),
    }
}

/// `-v <volume>:/data`: runc shows a file put in the volume's directory on the host; husk
/// refuses (a volume is a host directory bind mount).
fn named_volume(d: &Dockerd, rt: Runtime) {
    let volume = Named::volume(d, rt, "vol");
    d.ok(&["volume", "create", &volume.name]);
    let dir = d.ok(&["volume", "inspect", "-f", "{{.Mountpoint}}", &volume.name]);
    std::fs::write(std::path::Path::new(dir.trim()).join("hello.txt"), HOST_FILE).unwrap();
    let mount = format!("{}:/data", volume.name);
    let out = d.run(rt, &["--rm", "-v", &mount, BUSYBOX_IMAGE, "cat", "/data/hello.txt"]);
    match rt {
        Runtime::Runc => assert_eq!(stdout_ok(&out, "cat from a volume"), HOST_FILE),
        Runtime::Husk => assert_husk_refuses_mount(&out),
    }
}

/// A Debian image runs: its /etc/debian_version is the tree's.
fn debian_image(d: &Dockerd, rt: Runtime) {
    let image = d.debian_image();
    let out = d.run(rt, &["--rm", image, "cat", "/etc/debian_version"]);
    let tree = std::path::PathBuf::from(std::env::var_os("HUSK_TEST_DEBIAN_ROOTFS").unwrap());
    let expected = std::fs::read_to_string(tree.join("etc/debian_version")).unwrap();
    assert_eq!(stdout_ok(&out, "cat /etc/debian_version"), expected);
}

/// The last panic's message and location, kept by the panic hook for the case's failure.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Run one case; on failure its message, with husk's logs of the containers it ran. A case
/// still running after [`CASE_TIMEOUT`] fails too: what the daemon was doing then is recorded
/// and its Docker clients are killed, so that the suite goes on.
fn run_case(d: &Dockerd, rt: Runtime, case: fn(&Dockerd, Runtime)) -> Result<(), Failed> {
    let since = SystemTime::now();
    let (done, finished) = mpsc::channel::<()>();
    let (passed, stuck) = std::thread::scope(|scope| {
        let watchdog = scope.spawn(move || match finished.recv_timeout(CASE_TIMEOUT) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let diagnostics = d.diagnostics();
                d.kill_clients();
                Some(diagnostics)
            }
            _ => None,
        });
        let passed = catch_unwind(AssertUnwindSafe(|| case(d, rt))).is_ok();
        drop(done);
        (passed, watchdog.join().unwrap())
    });
    if passed && stuck.is_none() {
        return Ok(());
    }
    let mut message = PANIC.lock().unwrap().take().unwrap_or_else(|| "the case panicked".into());
    if let Some(diagnostics) = stuck {
        message = format!(
            "still running after {CASE_TIMEOUT:?}: its Docker clients were killed, then: \
             {message}\n{diagnostics}"
        );
    }
    if rt == Runtime::Husk {
        message.push('\n');
        message.push_str(&d.husk_logs_since(since));
    }
    Err(message.into())
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One case at a time: they share the published port, and the test host's CPU.
    args.test_threads = Some(1);
    let names: Vec<(Runtime, Case)> = [Runtime::Husk, Runtime::Runc]
        .into_iter()
        .flat_map(|rt| CASES.iter().map(move |case| (rt, *case)))
        .collect();
    let trial_name = |rt: Runtime, name: &str| format!("{}::{name}", rt.name());
    let selected = |rt: Runtime, name: &str| {
        !args.is_filtered_out(&Trial::test(trial_name(rt, name), || Ok(())))
    };
    let any = names.iter().any(|(rt, (name, _))| selected(*rt, name));
    if args.list || !any {
        let trials =
            names.iter().map(|(rt, (name, _))| Trial::test(trial_name(*rt, name), || Ok(())));
        return libtest_mimic::run(&args, trials.collect()).exit_code();
    }
    let husk = names.iter().any(|(rt, (name, _))| *rt == Runtime::Husk && selected(*rt, name));

    let dockerd = Arc::new(Dockerd::start(husk));
    std::panic::set_hook(Box::new(|info| {
        *PANIC.lock().unwrap() = Some(info.to_string());
    }));
    let trials = names
        .iter()
        .map(|&(rt, (name, case))| {
            let d = Arc::clone(&dockerd);
            Trial::test(trial_name(rt, name), move || run_case(&d, rt, case))
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let _ = std::panic::take_hook();

    let dockerd = Arc::into_inner(dockerd).expect("the cases are done with dockerd");
    let problems = dockerd.stop();
    if !problems.is_empty() {
        eprintln!("\nleft behind after the Docker suite:\n{}", problems.join("\n"));
        return ExitCode::FAILURE;
    }
    conclusion.exit_code()
}
