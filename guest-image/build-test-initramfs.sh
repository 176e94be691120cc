#!/bin/bash
# Build husk's test initramfs (gzip-compressed newc cpio): static busybox as the tool box,
# socat with its shared libraries (vsock and TCP for the tests), and test-initramfs/init.
#   usage: build-test-initramfs.sh OUTPUT
# Needs Debian's busybox-static, socat and cpio.
set -euo pipefail
out=${1:?usage: build-test-initramfs.sh OUTPUT}
here=$(cd "$(dirname "$0")" && pwd)

need() { command -v "$1" >/dev/null || { echo "build-test-initramfs: $1 is missing (apt-get install $2)" >&2; exit 1; }; }
need cpio cpio
need socat socat
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' \
	|| { echo "build-test-initramfs: a static /bin/busybox is missing (apt-get install busybox-static)" >&2; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib64,usr/lib/x86_64-linux-gnu}
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$here/test-initramfs/init" "$root/init"
chmod 755 "$root/init"

# socat and every library it loads, at the same paths.
cp "$(command -v socat)" "$root/bin/socat"
for lib in $(ldd "$(command -v socat)" | grep -o '/[^ ]*'); do
	mkdir -p "$root$(dirname "$lib")"
	cp -L "$lib" "$root$lib"
done

mkdir -p "$(dirname "$out")"
(cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -9 > "$out.tmp"
# Pad to a multiple of 4 bytes: tests append uncompressed cpio archives (their /test.sh), which
# the kernel only recognises at 4-byte-aligned offsets; it skips the zero padding.
size=$(stat -c %s "$out.tmp")
head -c $(( (4 - size % 4) % 4 )) /dev/zero >> "$out.tmp"
mv "$out.tmp" "$out"
echo "test initramfs: $out ($(stat -c %s "$out") bytes)"
