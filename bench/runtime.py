#!/usr/bin/env python3
"""Runtime benchmark: `husk run` against `runc run` and `runsc run` (gVisor), side by side in one
run on the same busybox bundle.

  - run `true`: wall time of `<runtime> run` of a container running `true`, create to exit and
    delete, interleaved round by round (median, and husk's ratio to each peer); and the CPU time
    of all the processes of that run and its delete, split into the time vCPU threads spent in
    the guest (KVM's guest time) and the rest, the host side, which runs at the host's speed
    wherever the guest runs;
  - idle memory and CPU: the PSS summed over every host process of an idle container (`sleep`)
    once it has settled (husk: its VM process, which holds the guest's memory; runc: the
    container's process; runsc: the sandbox, gofer and their children), then the CPU time those
    processes use in the next seconds: one container alone, and each of --idle-count side by
    side (what they share, such as a kernel's or a binary's page cache pages, is then split
    between them, as PSS does);
  - start rate: N containers started with `run --detach`, 10 at a time, then deleted: containers
    per second, and per host core.

Prints a Markdown report on stdout; raw numbers as JSON with --json FILE.
"""
import argparse
import concurrent.futures
import ctypes
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

def busybox_bundle(top, name, args, rootfs):
    """A bundle directory whose config.json runs args on the shared rootfs."""
    bundle = os.path.join(top, name)
    os.makedirs(bundle, exist_ok=True)
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID",
            "CAP_SETUID", "CAP_NET_BIND_SERVICE"]
    config = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin"], "cwd": "/",
                    "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
                    "noNewPrivileges": True},
        "root": {"path": rootfs, "readonly": False},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")]},
    }
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    return bundle


def make_rootfs(top, busybox):
    """A busybox root file system from the static busybox binary at busybox."""
    rootfs = os.path.join(top, "rootfs")
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    shutil.copy(busybox, os.path.join(rootfs, "bin/busybox"))
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True).stdout.split()
    for a in applets:
        if a != "busybox":
            os.symlink("busybox", os.path.join(rootfs, "bin", a))
    return rootfs


class Runtime:
    def __init__(self, name, argv, root):
        self.name, self.argv, self.root = name, argv, root
        os.makedirs(root, exist_ok=True)

    def cmd(self, *args):
        return self.argv + ["--root", self.root] + list(args)

    def run(self, *args, check=True, **kw):
        p = subprocess.run(self.cmd(*args), stdin=subprocess.DEVNULL, capture_output=True, **kw)
        if check and p.returncode != 0:
            sys.exit(f"bench: {self.name} {' '.join(args)} failed ({p.returncode}): "
                     f"{p.stderr.decode(errors='replace')}")
        return p


def run_detached(rt, *args):
    """`run --detach`: the container keeps the stdio it is given, so it gets no pipe (whose
    reader would wait for the container's end) but a file for stderr, read back here."""
    with tempfile.TemporaryFile() as err:
        p = subprocess.run(rt.cmd("run", "--detach", *args), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=err)
        err.seek(0)
        p.stderr = err.read().decode(errors="replace")
    return p


def stat_fields(pid, *ns):
    """Fields ns (numbered from 1, as proc(5) does) of one read of /proc/PID/stat, as integers.
    The fields from the third on follow the command name's closing parenthesis."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return [int(fields[n - 3]) for n in ns]


def stat_field(pid, n):
    return stat_fields(pid, n)[0]


def children_cpu_s():
    """(user + system, guest) CPU seconds of this process's reaped descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    guest_ticks = stat_field("self", 44)  # cguest_time
    return usage.ru_utime + usage.ru_stime, guest_ticks / os.sysconf("SC_CLK_TCK")


def reap_all(timeout_s=10.0):
    """Reap every child left (the orphans this subreaper inherited), waiting for them to end."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.01)
    sys.exit(f"bench: processes of a container still run {timeout_s:.0f} s after its delete")


def time_run_true(rt, bundle, cid):
    """Wall seconds of `run`, and the CPU seconds (host side, guest) of it and its delete."""
    cpu_before, guest_before = children_cpu_s()
    start = time.monotonic()
    p = rt.run("run", "--bundle", bundle, cid, check=False)
    took = time.monotonic() - start
    if p.returncode != 0:
        sys.exit(f"bench: {rt.name} run failed ({p.returncode}): {p.stderr.decode(errors='replace')}")
    rt.run("delete", "--force", cid, check=False)
    reap_all()
    cpu_after, guest_after = children_cpu_s()
    guest = guest_after - guest_before
    # User time includes guest time.
    return took, cpu_after - cpu_before - guest, guest


def set_child_subreaper(on):
    """Make orphaned descendants this process's children, so that their CPU time is counted."""
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        sys.exit(f"bench: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid):
    """pid and every process below it."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = stat_field(entry, 4)
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def processes_mentioning(needle):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    found.append(int(entry))
        except OSError:
            pass
    return found


def cpu_ticks(pids):
    """User and system clock ticks of the processes `pids` (all their threads; a vCPU thread's
    guest time is part of its user time)."""
    total = 0
    for p in pids:
        try:
            total += sum(stat_fields(p, 14, 15))
        except (OSError, IndexError, ValueError):
            pass
    return total


def idle_memory_mib(rt, bundle, count, settle_s, cpu_window_s):
    """PSS of the host processes of `count` idle containers side by side, per container, the
    number of processes, and the CPU they use while idle, per container (ms per second,
    measured over `cpu_window_s` after the PSS)."""
    ids = [f"idle-{i}" for i in range(count)]
    pid_files = [os.path.join(os.path.dirname(bundle), f"{rt.name}-{cid}.pid") for cid in ids]
    try:
        for cid, pid_file in zip(ids, pid_files):
            p = run_detached(rt, "--bundle", bundle, "--pid-file", pid_file, cid)
            if p.returncode != 0:
                sys.exit(f"bench: {rt.name} run --detach failed: {p.stderr}")
        time.sleep(settle_s)
        pids = set()
        for pid_file in pid_files:
            pids |= set(descendants(int(open(pid_file).read().strip())))
        if rt.name == "runsc":
            # The sandboxes and gofers are not below the containers' pids on the host.
            pids |= {q for p in processes_mentioning(rt.root) for q in descendants(p)}
        total = sum(pss_kib(p) for p in pids) / 1024
        ticks = cpu_ticks(pids)
        time.sleep(cpu_window_s)
        idle_cpu_ms = (cpu_ticks(pids) - ticks) * 1000 / os.sysconf("SC_CLK_TCK")
    finally:
        for cid in ids:
            rt.run("delete", "--force", cid, check=False)
    return total / count, len(pids), idle_cpu_ms / cpu_window_s / count


def start_rate(rt, bundle, count, parallel):
    ids = [f"rate-{i}" for i in range(count)]

    def start(cid):
        p = run_detached(rt, "--bundle", bundle, cid)
        if p.returncode != 0:
            raise RuntimeError(f"{rt.name} run --detach {cid}: {p.stderr}")

    begin = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(start, ids))
    took = time.monotonic() - begin
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda cid: rt.run("delete", "--force", cid, check=False), ids))
    return count / took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--husk", required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--rate-count", type=int, default=20)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--idle-count", type=int, default=10)
    ap.add_argument("--idle-cpu-window", type=float, default=5.0)
    ap.add_argument("--where", required=True)
    ap.add_argument("--json")
    ap.add_argument("--busybox", default="/bin/busybox", help="a static busybox for the rootfs")
    a = ap.parse_args()

    for tool in ("runc", "runsc"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is missing (apt-get install {tool}; .ci/install-deps has it)")
    top = tempfile.mkdtemp(prefix="husk-bench-runtime-")
    try:
        rootfs = make_rootfs(top, a.busybox)
        true_bundle = busybox_bundle(top, "true", ["true"], rootfs)
        sleep_bundle = busybox_bundle(top, "sleep", ["sleep", "100000"], rootfs)
        runtimes = [
            Runtime("husk", [a.husk], os.path.join(top, "root-husk")),
            Runtime("runc", ["runc"], os.path.join(top, "root-runc")),
            Runtime("runsc", ["runsc", "--network=none", "--ignore-cgroups"],
                    os.path.join(top, "root-runsc")),
        ]
        # One warm-up each (husk builds and caches the rootfs image and makes the VM template;
        # page cache for all), timed on its own.
        set_child_subreaper(True)
        first = {rt.name: time_run_true(rt, true_bundle, "warmup")[0] * 1000 for rt in runtimes}
        runs = {rt.name: [] for rt in runtimes}
        cpu = {rt.name: [] for rt in runtimes}
        for r in range(a.rounds):
            for rt in runtimes:
                took, host_s, guest_s = time_run_true(rt, true_bundle, f"true-{r}")
                runs[rt.name].append(took)
                cpu[rt.name].append((host_s, guest_s))
        set_child_subreaper(False)
        memory = {rt.name: idle_memory_mib(rt, sleep_bundle, 1, a.settle, a.idle_cpu_window)
                  for rt in runtimes}
        many = {rt.name: idle_memory_mib(rt, sleep_bundle, a.idle_count, a.settle,
                                         a.idle_cpu_window)
                for rt in runtimes}
        rates = {rt.name: start_rate(rt, sleep_bundle, a.rate_count, 10) for rt in runtimes}
    finally:
        shutil.rmtree(top, ignore_errors=True)

    cores = os.cpu_count() or 1
    med = {k: statistics.median(v) * 1000 for k, v in runs.items()}
    host_ms = {k: statistics.median(h for h, _ in v) * 1000 for k, v in cpu.items()}
    guest_ms = {k: statistics.median(g for _, g in v) * 1000 for k, v in cpu.items()}
    print(f"### Runtime: husk vs runc vs runsc ({a.where})\n")
    print(f"{a.rounds} interleaved rounds of `run` of a busybox container "
          f"running `true` (create to exit, then delete); one warm-up each first.\n")
    print("| | husk | runc | runsc | husk / runc | husk / runsc |")
    print("|---|---|---|---|---|---|")
    print(f"| `run true`, median (ms) | {med['husk']:.0f} | {med['runc']:.0f} | "
          f"{med['runsc']:.0f} | {med['husk'] / med['runc']:.2f} | "
          f"{med['husk'] / med['runsc']:.2f} |")
    print(f"| first `run true` on an empty cache, one run (ms) | {first['husk']:.0f} | "
          f"{first['runc']:.0f} | {first['runsc']:.0f} | | |")
    print(f"| CPU of `run true` and delete, host side, median (ms) | {host_ms['husk']:.0f} | "
          f"{host_ms['runc']:.0f} | {host_ms['runsc']:.0f} | "
          f"{host_ms['husk'] / max(host_ms['runc'], 1):.2f} | "
          f"{host_ms['husk'] / max(host_ms['runsc'], 1):.2f} |")
    print(f"| CPU of `run true`, in the guest (KVM guest time), median (ms) | "
          f"{guest_ms['husk']:.0f} | {guest_ms['runc']:.0f} | {guest_ms['runsc']:.0f} | | |")
    for label, m in (("idle container alone", memory),
                     (f"each of {a.idle_count} idle containers", many)):
        print(f"| {label}, host PSS (MiB) | {m['husk'][0]:.1f} | "
              f"{m['runc'][0]:.1f} | {m['runsc'][0]:.1f} | "
              f"{m['husk'][0] / max(m['runc'][0], 0.01):.1f} | "
              f"{m['husk'][0] / max(m['runsc'][0], 0.01):.2f} |")
    for label, m in (("an idle container alone", memory),
                     (f"each of {a.idle_count} idle containers", many)):
        print(f"| host CPU of {label} (ms per s) | {m['husk'][2]:.2f} | {m['runc'][2]:.2f} | "
              f"{m['runsc'][2]:.2f} | | |")
    print(f"| start rate, 10 at a time (containers/s) | {rates['husk']:.2f} | "
          f"{rates['runc']:.2f} | {rates['runsc']:.2f} | "
          f"{rates['husk'] / rates['runc']:.2f} | {rates['husk'] / rates['runsc']:.2f} |")
    print(f"| start rate per host core ({cores} cores) | {rates['husk'] / cores:.2f} | "
          f"{rates['runc'] / cores:.2f} | {rates['runsc'] / cores:.2f} | | |")
    print(f"\nIdle memory counts {memory['husk'][1]} husk, {memory['runc'][1]} runc and "
          f"{memory['runsc'][1]} runsc host processes for one container "
          f"({many['husk'][1]}, {many['runc'][1]} and {many['runsc'][1]} for "
          f"{a.idle_count}), {a.settle:.0f} s after start; their CPU (user and system time "
          f"of all their threads, a vCPU's guest time included) over the {a.idle_cpu_window:.0f} s "
          f"after that; "
          f"start rate: {a.rate_count} containers with `run --detach`. husk's first run builds "
          f"the bundle's rootfs image and the VM template (a guest booted to its agent and "
          f"saved) that the others are restored from.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"first_run_ms": first, "runs_s": runs, "cpu_host_guest_s": cpu,
                       "idle_pss_mib_procs_cpu_ms_per_s": memory,
                       f"idle_each_of_{a.idle_count}_pss_mib_procs_cpu_ms_per_s": many,
                       "rate_per_s": rates}, f)


if __name__ == "__main__":
    main()
