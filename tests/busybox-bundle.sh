#!/bin/bash
# Make an OCI bundle whose rootfs is busybox-static, for `make run`:
#   tests/busybox-bundle.sh DIR
# The container prints where it runs (its kernel, CPUs and memory: the micro-VM's) and exits 0.
set -euo pipefail
dir=${1:?usage: busybox-bundle.sh DIR}
busybox=/bin/busybox
[ -x "$busybox" ] && "$busybox" --list >/dev/null 2>&1 \
	|| { echo "busybox-bundle: $busybox is missing (apt-get install busybox-static)" >&2; exit 1; }
rm -rf "$dir.tmp"
mkdir -p "$dir.tmp/rootfs/bin" "$dir.tmp/rootfs/proc" "$dir.tmp/rootfs/dev" "$dir.tmp/rootfs/sys" \
	"$dir.tmp/rootfs/tmp" "$dir.tmp/rootfs/etc"
cp "$busybox" "$dir.tmp/rootfs/bin/busybox"
for applet in $("$busybox" --list); do
	[ "$applet" = busybox ] || ln -s busybox "$dir.tmp/rootfs/bin/$applet"
done
script='echo "hello from a container in a husk micro-VM"; echo "kernel: $(uname -r)"; '
script+='echo "cpus: $(nproc)"; grep MemTotal /proc/meminfo'
cat > "$dir.tmp/config.json" <<JSON
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": {"uid": 0, "gid": 0},
    "args": ["sh", "-c", "$(printf '%s' "$script" | sed 's/\\/\\\\/g; s/"/\\"/g')"],
    "env": ["PATH=/bin"],
    "cwd": "/"
  },
  "root": {"path": "rootfs", "readonly": true},
  "hostname": "husk-demo",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
  ],
  "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}
}
JSON
rm -rf "$dir"
mv "$dir.tmp" "$dir"
