#!/usr/bin/env python3
"""Docker benchmark: `docker run` with husk against runc and runsc (gVisor) as the runtime, side
by side in one run, on one private dockerd that has all three registered.

  - `docker run --rm IMG true`: wall time of the docker client, interleaved round by round
    (median, and husk's ratio to each peer);
  - idle memory: N `docker run -d IMG sleep 1d` per runtime, all running at once; the PSS summed
    over each container's host processes (husk: its VM process; runc: the container's
    processes; runsc: the sandbox and gofer), the containerd shims left out (the same for all
    three). Reported as the total for N and per container.

The image is busybox-static imported from a rootfs tarball (there is no registry here). The
husk runtime is given as an executable (a wrapper that sets husk's guest kernel and image).
Prints a Markdown report on stdout; raw numbers as JSON with --json FILE.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runtime import descendants, processes_mentioning, pss_kib  # noqa: E402

DOCKER = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"
IMAGE = "husk-bench-busybox"
RUNTIMES = ("husk", "runc", "runsc")


class Dockerd:
    """A private dockerd under `top`, with husk (the default), runc and runsc."""

    def __init__(self, top, husk):
        self.top = top
        self.sock = os.path.join(top, "docker.sock")
        config = {
            "runtimes": {"husk": {"path": husk}, "runsc": {"path": shutil.which("runsc")}},
            "default-runtime": "husk",
        }
        with open(os.path.join(top, "daemon.json"), "w") as f:
            json.dump(config, f)
        self.log = open(os.path.join(top, "dockerd.log"), "w")
        self.proc = subprocess.Popen(
            [DOCKERD, "--config-file", os.path.join(top, "daemon.json"),
             "--data-root", os.path.join(top, "data"), "--exec-root", os.path.join(top, "exec"),
             "--pidfile", os.path.join(top, "docker.pid"), "-H", f"unix://{self.sock}"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while self.docker("info", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench: dockerd did not start (see {self.log.name})")
            time.sleep(0.5)

    def docker(self, *args, check=True, **kw):
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.run([DOCKER, "-H", f"unix://{self.sock}", *args], **kw)
        if check and p.returncode != 0:
            sys.exit(f"bench: docker {' '.join(args)} failed: {p.stderr.decode(errors='replace')}")
        return p

    def stop(self):
        ids = self.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", *[i.decode() for i in ids], check=False)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["umount", "-R", os.path.join(self.top, "data")], stderr=subprocess.DEVNULL)
        subprocess.run(["umount", "-R", os.path.join(self.top, "exec")], stderr=subprocess.DEVNULL)


def import_busybox(d, top):
    """The busybox-static image: /bin/busybox and its applets as links."""
    tar = os.path.join(top, "busybox.tar")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    with tarfile.open(tar, "w") as t:
        for d_ in ("bin", "dev", "proc", "sys", "tmp", "etc"):
            info = tarfile.TarInfo(d_)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        t.add("/bin/busybox", "bin/busybox")
        for a in applets:
            if a != "busybox":
                info = tarfile.TarInfo(f"bin/{a}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                t.addfile(info)
    d.docker("import", tar, IMAGE)


def time_run_true(d, runtime):
    begin = time.monotonic()
    d.docker("run", "--rm", "--runtime", runtime, IMAGE, "true")
    return time.monotonic() - begin


def container_pids(d, cid):
    """The host processes of one container, the shims left out."""
    pid = int(d.docker("inspect", "-f", "{{.State.Pid}}", cid).stdout.strip())
    pids = set(descendants(pid)) | set(processes_mentioning(cid))
    shims = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip().startswith("containerd-shim"):
                    shims.add(p)
        except OSError:
            shims.add(p)
    return pids - shims


def idle_memory(d, runtime, count, settle_s):
    """(total PSS MiB of `count` idle containers, processes counted)."""
    ids = []
    for i in range(count):
        out = d.docker("run", "-d", "--runtime", runtime, IMAGE, "sleep", "1d").stdout
        ids.append(out.decode().strip())
    time.sleep(settle_s)
    pids = set()
    for cid in ids:
        pids |= container_pids(d, cid)
    total = sum(pss_kib(p) for p in pids) / 1024
    d.docker("rm", "-f", *ids)
    return total, len(pids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--husk", required=True, help="the husk runtime executable for dockerd")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--idle", type=int, default=20)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--where", required=True)
    ap.add_argument("--json")
    a = ap.parse_args()
    for tool in (DOCKER, DOCKERD, shutil.which("runc"), shutil.which("runsc")):
        if not tool or not os.path.exists(tool):
            sys.exit("bench: docker.io, runc and runsc are needed (.ci/install-deps has them)")
    top = tempfile.mkdtemp(prefix="husk-bench-docker-", dir="/tmp")
    d = Dockerd(top, a.husk)
    try:
        import_busybox(d, top)
        for runtime in RUNTIMES:  # warm-up: image layers, caches
            time_run_true(d, runtime)
        runs = {r: [] for r in RUNTIMES}
        for _ in range(a.rounds):
            for runtime in RUNTIMES:
                runs[runtime].append(time_run_true(d, runtime))
        memory = {r: idle_memory(d, r, a.idle, a.settle) for r in RUNTIMES}
    finally:
        d.stop()
        shutil.rmtree(top, ignore_errors=True)

    med = {r: statistics.median(v) * 1000 for r, v in runs.items()}
    print(f"### Docker ({a.where})")
    print()
    print(f"`docker run --rm IMG true`, {a.rounds} interleaved rounds (busybox-static image, "
          "one private dockerd 20.10 with the three runtimes):")
    print()
    print("| runtime | median | min | max | husk / this |")
    print("| --- | --- | --- | --- | --- |")
    for r in RUNTIMES:
        v = runs[r]
        print(f"| {r} | {med[r]:.0f} ms | {min(v) * 1000:.0f} ms | {max(v) * 1000:.0f} ms "
              f"| {med['husk'] / med[r]:.2f} |")
    print()
    print(f"Host memory of {a.idle} idle `docker run -d IMG sleep 1d` containers per runtime "
          f"(PSS of their host processes, shims left out, after {a.settle:.0f} s):")
    print()
    print("| runtime | total | per container | processes |")
    print("| --- | --- | --- | --- |")
    for r in RUNTIMES:
        total, n = memory[r]
        print(f"| {r} | {total:.1f} MiB | {total / a.idle:.1f} MiB | {n} |")
    print()
    print(f"Target: husk within 1.5x of runc's `docker run` time: "
          f"{med['husk'] / med['runc']:.2f}x, "
          f"{'met' if med['husk'] <= 1.5 * med['runc'] else 'not met'}.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs_s": runs, "idle_pss_mib": memory}, f)


if __name__ == "__main__":
    main()
