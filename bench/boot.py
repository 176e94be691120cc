#!/usr/bin/env python3
"""Boot benchmark: husk vs QEMU microvm, side by side in one run.

Both boot the same kernel, initramfs, memory size and kernel command line, interleaved round by
round. Per boot it records:
  - userspace: time from process start until the guest's init prints HUSK-GUEST-UP on the
    serial console (the same observation for both VMMs);
  - boot timer (husk only, when the kernel has /dev/mem): the VMM's own timestamp of the init's
    boot-timer write, counted from the start of VM construction;
  - exit: wall time until the VMM process exits after the guest's reboot.
Then, once per VMM, the host memory of an idle guest: VMM overhead = the process's RSS minus
the resident pages of the guest RAM mapping.

Prints a Markdown report (medians, ratios) on stdout; raw numbers as JSON with --json FILE.
"""
import argparse
import json
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time

MARKER = b"HUSK-GUEST-UP"
HUSK_BASE_CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off acpi=off"


# How long one boot may take before the run is given up (a hung guest or VMM).
BOOT_TIMEOUT_S = 120


def read_chunk(proc, deadline):
    """The next bytes of proc.stdout (b"" at EOF); kills proc and exits after the deadline."""
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            proc.wait()
            sys.exit(f"bench: no end after {BOOT_TIMEOUT_S} s, killed: {' '.join(proc.args)}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            return os.read(fd, 65536)


def read_until_marker(proc, start):
    """Seconds from start until MARKER appears on proc.stdout, or None if it never does."""
    seen = b""
    deadline = start + BOOT_TIMEOUT_S
    while True:
        chunk = read_chunk(proc, deadline)
        if not chunk:
            return None
        seen = (seen + chunk)[-4096:]
        if MARKER in seen:
            return time.monotonic() - start


def drain(proc, start):
    """Read the rest of stdout so the guest never blocks on a full pipe."""
    deadline = start + BOOT_TIMEOUT_S
    while read_chunk(proc, deadline):
        pass


def husk_cmd(a, cmdline):
    return [a.husk, "vm", "run", "--kernel", a.kernel, "--initrd", a.initrd, "--mem-mib",
            str(a.mem_mib), "--vcpus", "1", "--console", "stdio", "--cmdline", cmdline]


# QEMU's microvm has no i8042, so its documentation has the guest reboot by triple fault
# (`reboot=t`, the last reboot= wins) with -no-reboot turning that into QEMU's exit; with
# reboot=k the guest would first spin through the keyboard-controller timeouts.
QEMU_REBOOT = "reboot=t"


# qboot loads -kernel itself; microvm's default firmware since QEMU 8 is SeaBIOS, which without
# option ROMs finds no kernel and waits for a boot disk.
QBOOT = "/usr/share/qemu/qboot.rom"


def qemu_cmd(a, cmdline):
    return [a.qemu, "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on", "-bios", QBOOT,
            "-enable-kvm",
            "-cpu", "host", "-m", str(a.mem_mib), "-smp", "1", "-nodefaults", "-no-user-config",
            "-nographic", "-serial", "stdio", "-no-reboot", "-kernel", a.kernel, "-initrd",
            a.initrd, "-append", f"{HUSK_BASE_CMDLINE} {cmdline} {QEMU_REBOOT}"]


def boot_once(cmd, env):
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    userspace = read_until_marker(proc, start)
    drain(proc, start)
    stderr = proc.stderr.read().decode(errors="replace")
    proc.wait()
    exit_s = time.monotonic() - start
    if proc.returncode != 0 or userspace is None:
        sys.exit(f"boot failed (exit {proc.returncode}): {' '.join(cmd)}\n{stderr}")
    timer = re.search(r"boot-timer: guest userspace after (\d+) us", stderr)
    return {"userspace_ms": userspace * 1000, "exit_ms": exit_s * 1000,
            "boot_timer_ms": int(timer.group(1)) / 1000 if timer else None}


def rss_kib(pid, mem_mib):
    """(total RSS, RSS of the guest RAM mapping) of pid, in KiB."""
    total = guest = 0
    size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                size = hi - lo
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                total += kib
                # The guest RAM is the one mapping of exactly the guest's size.
                if size == mem_mib << 20:
                    guest += kib
    return total, guest


def idle_memory(cmd, env, mem_mib, settle_s):
    """Boot a guest that idles (init waits), measure its VMM's memory, then stop it."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    if read_until_marker(proc, time.monotonic()) is None:
        sys.exit(f"idle guest failed: {' '.join(cmd)}")
    time.sleep(settle_s)
    total, guest = rss_kib(proc.pid, mem_mib)
    proc.terminate()
    proc.wait()
    return {"rss_kib": total, "guest_kib": guest, "overhead_kib": total - guest}


def idle_initrd(base, directory):
    """The test initramfs plus a /test.sh that idles."""
    script = b"#!/bin/sh\nsleep 3600\n"
    name = b"test.sh\0"
    header = b"070701" + b"".join(b"%08x" % v for v in
                                   (1, 0o100755, 0, 0, 1, 0, len(script), 0, 0, 0, 0, len(name), 0))
    def pad(b):
        return b + b"\0" * (-len(b) % 4)
    trailer_name = b"TRAILER!!!\0"
    trailer = b"070701" + b"".join(b"%08x" % v for v in
                                   (2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(trailer_name), 0))
    archive = pad(pad(header + name) + script) + pad(trailer + trailer_name)
    path = os.path.join(directory, "idle.cpio")
    with open(base, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read() + archive)
    return path


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, unit="ms"):
    return "n/a" if v is None else f"{v:.1f} {unit}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--husk", required=True)
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--mem-mib", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--cmdline", default="", help="appended to the command line of both")
    p.add_argument("--where", required=True, help="where this runs, for the report")
    p.add_argument("--json", help="also write the raw numbers here")
    a = p.parse_args()

    env = dict(os.environ, HUSK_LOG="info")
    # QEMU gets exactly the command line husk builds for a VM with no devices.
    runs = {"husk": [], "qemu": []}
    for _ in range(a.rounds):
        runs["husk"].append(boot_once(husk_cmd(a, a.cmdline), env))
        runs["qemu"].append(boot_once(qemu_cmd(a, a.cmdline), env))

    with tempfile.TemporaryDirectory() as tmp:
        idle = idle_initrd(a.initrd, tmp)
        b = argparse.Namespace(**{**vars(a), "initrd": idle})
        memory = {"husk": idle_memory(husk_cmd(b, a.cmdline), env, a.mem_mib, 2.0),
                  "qemu": idle_memory(qemu_cmd(b, a.cmdline), env, a.mem_mib, 2.0)}

    med = {vmm: {k: median([r[k] for r in rs]) for k in ("userspace_ms", "exit_ms", "boot_timer_ms")}
           for vmm, rs in runs.items()}
    ratio_user = med["husk"]["userspace_ms"] / med["qemu"]["userspace_ms"]
    ratio_exit = med["husk"]["exit_ms"] / med["qemu"]["exit_ms"]
    print(f"### Boot: husk vs QEMU microvm ({a.where})\n")
    print(f"Kernel `{a.kernel}`, test initramfs, {a.mem_mib} MiB, 1 vCPU, median of {a.rounds} "
          f"boots each, interleaved. Command line: `{HUSK_BASE_CMDLINE} {a.cmdline}` "
          f"(QEMU: plus `{QEMU_REBOOT}`, as microvm has no i8042 to reset through).\n")
    print("| | husk | QEMU microvm | husk / QEMU |")
    print("|---|---|---|---|")
    print(f"| process start to userspace (console marker) | {fmt(med['husk']['userspace_ms'])} | "
          f"{fmt(med['qemu']['userspace_ms'])} | {ratio_user:.2f} |")
    print(f"| VM start to userspace (husk boot timer) | {fmt(med['husk']['boot_timer_ms'])} | n/a | |")
    print(f"| process start to exit after the guest's reboot | {fmt(med['husk']['exit_ms'])} | "
          f"{fmt(med['qemu']['exit_ms'])} | {ratio_exit:.2f} |")
    mib = lambda kib: kib / 1024
    print(f"| idle VMM process RSS | {fmt(mib(memory['husk']['rss_kib']), 'MiB')} | "
          f"{fmt(mib(memory['qemu']['rss_kib']), 'MiB')} | |")
    print(f"| of which guest RAM touched | {fmt(mib(memory['husk']['guest_kib']), 'MiB')} | "
          f"{fmt(mib(memory['qemu']['guest_kib']), 'MiB')} | |")
    print(f"| VMM overhead (RSS minus guest RAM) | {fmt(mib(memory['husk']['overhead_kib']), 'MiB')} | "
          f"{fmt(mib(memory['qemu']['overhead_kib']), 'MiB')} | "
          f"{memory['husk']['overhead_kib'] / memory['qemu']['overhead_kib']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": runs, "memory": memory, "medians": med}, f, indent=2)


if __name__ == "__main__":
    main()
