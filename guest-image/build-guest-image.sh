#!/bin/bash
# Build husk's guest image: a gzip-compressed newc cpio whose /init is the static husk-agent
# (the guest's PID 1), with the directories it mounts on. Nothing else: the agent mounts
# devtmpfs, proc, sysfs, devpts, /run and cgroup2 itself, and containers bring their own
# root file systems on disks.
#   usage: build-guest-image.sh AGENT_BINARY OUTPUT
# Needs cpio and gzip; strips the binary with strip(1) when binutils are there.
set -euo pipefail
agent=${1:?usage: build-guest-image.sh AGENT_BINARY OUTPUT}
out=${2:?usage: build-guest-image.sh AGENT_BINARY OUTPUT}

command -v cpio >/dev/null || { echo "build-guest-image: cpio is missing (apt-get install cpio)" >&2; exit 1; }
[ -x "$agent" ] || { echo "build-guest-image: $agent is missing (cargo build --profile guest --target x86_64-unknown-linux-musl -p husk-agent)" >&2; exit 1; }
file -L "$agent" 2>/dev/null | grep -qE 'statically linked|static-pie linked' \
	|| { echo "build-guest-image: $agent is not a static binary (build it for x86_64-unknown-linux-musl)" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
chmod 755 "$root"
mkdir -p "$root"/{dev,proc,sys,run,tmp}
chmod 1777 "$root/tmp"
cp "$agent" "$root/init"
if command -v strip >/dev/null; then
	strip "$root/init"
fi
chmod 755 "$root/init"

mkdir -p "$(dirname "$out")"
(cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -9 > "$out.tmp"
mv "$out.tmp" "$out"
echo "guest image: $out ($(stat -c %s "$out") bytes; /init $(stat -c %s "$root/init") bytes)"
