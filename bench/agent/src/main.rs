//! Benchmark of the guest agent in a husk micro-VM, with runc on the same busybox rootfs as the
//! reference for stdio throughput. Prints a Markdown report (medians) for docs/benchmarks.md.
//!
//!   husk-bench-agent --where TEXT [--rounds N] [--execs N] [--stdout-mib N]
//!
//! Needs the husk binary on PATH (or target/release), the guest kernel (`HUSK_TEST_KERNEL`),
//! `make guest-image`, runc, and real KVM: `bench/run` runs it inside the nested test host
//! where this machine has no hardware KVM.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Instant;

use husk_agent_protocol::agent as pb;
use husk_agent_protocol::stream::StreamKind;
use husk_tests::agent_vm::{ctx, AgentVm};
use husk_tests::oci::{process, spec};
use husk_tests::rootfs::busybox_rootfs;
use husk_tests::tiny_guest::TempDir;

struct Args {
    place: String,
    rounds: usize,
    execs: usize,
    stdout_mib: u64,
}

fn parse_args() -> Args {
    let mut args = Args { place: String::new(), rounds: 5, execs: 30, stdout_mib: 256 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| fail(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--where" => args.place = value(),
            "--rounds" => args.rounds = value().parse().unwrap_or_else(|_| fail("bad --rounds")),
            "--execs" => args.execs = value().parse().unwrap_or_else(|_| fail("bad --execs")),
            "--stdout-mib" => {
                args.stdout_mib = value().parse().unwrap_or_else(|_| fail("bad --stdout-mib"))
            }
            _ => fail(&format!("unknown argument {flag}")),
        }
    }
    if args.place.is_empty() {
        fail("--where is required (where this runs, for the report)");
    }
    args
}

fn fail(msg: &str) -> ! {
    eprintln!("husk-bench-agent: {msg}");
    std::process::exit(2);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes read from `r` to EOF and the seconds it took.
fn drain(mut r: impl Read) -> (u64, f64) {
    let start = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => fail(&format!("reading stdout: {e}")),
        }
    }
    (total, start.elapsed().as_secs_f64())
}

/// husk start to the agent's first health answer, and the agent's own report of how long
/// after /init started it was ready (on the guest's boot clock); then Shutdown. Milliseconds.
fn boot_to_health() -> (f64, f64) {
    let start = Instant::now();
    let vm = AgentVm::boot();
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    // The serial console may still be printing the line when the vsock answer is back.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let ready = loop {
        let console = vm.console();
        let ready = console.lines().find_map(|l| {
            l.strip_prefix("husk-agent: ready ")?.split(' ').next()?.parse::<f64>().ok()
        });
        match ready {
            Some(ms) => break ms,
            None if Instant::now() > deadline => {
                fail(&format!("no ready line on the console:\n{console}"))
            }
            None => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    };
    vm.shutdown();
    (ms, ready)
}

/// Median milliseconds of ExecProcess + WaitProcess + RemoveProcess of `true`.
fn exec_round_trip(vm: &AgentVm, execs: usize) -> f64 {
    let times = (0..execs)
        .map(|i| {
            let id = format!("true{i}");
            let start = Instant::now();
            vm.exec("box", &id, &process(&["true"]), (false, false, false));
            let status = vm.wait("box", &id);
            let mut req = pb::RemoveProcessRequest::new();
            req.container_id = "box".into();
            req.exec_id = id;
            vm.client.remove_process(ctx(), &req).expect("RemoveProcess");
            assert_eq!(status.exit_status, 0);
            start.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    median(times)
}

/// MiB/s of `head -c N /dev/zero` in a husk container, read from its stdout stream.
fn husk_stdout(vm: &AgentVm, mib: u64) -> f64 {
    let args = ["head", "-c", &format!("{}", mib << 20), "/dev/zero"];
    vm.create("writer", &spec(process(&args)), (false, true, false)).expect("CreateContainer");
    let out = vm.stream("writer", "", StreamKind::Stdout);
    vm.start("writer");
    let (bytes, secs) = drain(out);
    assert_eq!(bytes, mib << 20, "all of stdout arrived");
    assert_eq!(vm.wait("writer", "").exit_status, 0);
    vm.remove("writer");
    mib as f64 / secs
}

/// MiB/s of the same under `runc run`, its stdout a pipe to this process.
fn runc_stdout(mib: u64) -> f64 {
    let bundle = TempDir::new("bench-runc");
    let rootfs = busybox_rootfs();
    let mut config = spec(process(&["head", "-c", &format!("{}", mib << 20), "/dev/zero"]));
    config["root"]["path"] = rootfs.path().display().to_string().into();
    std::fs::write(bundle.path().join("config.json"), config.to_string()).unwrap();
    let state = TempDir::new("bench-runc-state");
    let mut runc = Command::new("runc")
        .arg("--root")
        .arg(state.path())
        .args(["run", "--bundle"])
        .arg(bundle.path())
        .arg("husk-bench")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("runc: {e} (apt-get install runc)")));
    let (bytes, secs) = drain(runc.stdout.take().unwrap());
    let status = runc.wait().unwrap();
    assert!(status.success() && bytes == mib << 20, "runc run: {status}, {bytes} bytes");
    mib as f64 / secs
}

fn main() {
    let args = parse_args();
    let (boots, ready): (Vec<f64>, Vec<f64>) = (0..args.rounds).map(|_| boot_to_health()).unzip();

    let vm = AgentVm::boot();
    vm.create("box", &spec(process(&["sleep", "100000"])), (false, false, false)).unwrap();
    vm.start("box");
    let exec_ms = exec_round_trip(&vm, args.execs);
    let husk_mibs = median((0..3).map(|_| husk_stdout(&vm, args.stdout_mib)).collect());
    vm.signal("box", 9);
    vm.wait("box", "");
    vm.remove("box");
    vm.shutdown();
    let runc_mibs = median((0..3).map(|_| runc_stdout(args.stdout_mib)).collect());

    println!("### Guest agent ({})\n", args.place);
    println!(
        "Shared guest kernel, `make guest-image` (husk-agent as /init), 256 MiB, 1 vCPU, busybox \
         rootfs as an ext4 disk (overlay). Medians.\n"
    );
    println!("| | husk | runc | husk / runc |");
    println!("|---|---|---|---|");
    println!(
        "| husk start to the agent's first health answer ({} boots) | {:.0} ms | | |",
        args.rounds,
        median(boots)
    );
    println!(
        "| /init starting to the agent ready (its own report) | {:.1} ms | | |",
        median(ready)
    );
    println!("| exec round trip, `true` ({} execs) | {exec_ms:.1} ms | | |", args.execs);
    println!(
        "| stdout throughput, `head -c {} MiB /dev/zero` (3 runs) | {husk_mibs:.1} MiB/s | \
         {runc_mibs:.1} MiB/s | {:.2} |",
        args.stdout_mib,
        husk_mibs / runc_mibs
    );
}
