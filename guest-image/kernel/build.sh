#!/bin/bash
# Build husk's guest kernel from a kernel source tree and husk-guest.fragment: an uncompressed
# ELF vmlinux (what husk boots fastest) and the same kernel as a bzImage.
#   usage: build.sh OUTPUT_DIR
#   KERNEL_SRC=DIR   use this source tree instead of Debian's linux-source package
#   KVER=6.12        the Debian linux-source version to fetch (from trixie when the running
#                    release lacks it, through a private apt configuration; /etc/apt untouched)
#   JOBS=N           parallel make jobs (default: all CPUs)
# Needs build-essential flex bison bc libelf-dev libssl-dev (installed when missing).
set -euo pipefail
out=$(realpath -m "${1:?usage: build.sh OUTPUT_DIR}")
here=$(cd "$(dirname "$0")" && pwd)
KVER=${KVER:-6.12}
JOBS=${JOBS:-$(nproc)}
work="$out/work"
mkdir -p "$work"

install_build_deps() {
	local missing=()
	for p in build-essential flex bison bc libelf-dev libssl-dev xz-utils; do
		dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
	fi
}

# Download Debian's linux-source-$KVER package into the current directory: with the system's
# apt sources when they have it, else from trixie through a private apt configuration.
download_source_package() {
	if apt-cache show "linux-source-$KVER" >/dev/null 2>&1; then
		apt-get download "linux-source-$KVER"
		return
	fi
	local apt="$work/apt"
	mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
		> "$apt/sources.list"
	local opts=(-o Dir::Etc::sourcelist="$apt/sources.list" -o Dir::Etc::sourceparts=/nonexistent
		-o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache")
	apt-get "${opts[@]}" update -qq
	apt-get "${opts[@]}" download "linux-source-$KVER"
}

# Unpack Debian's linux-source-$KVER into $work (once).
unpack_debian_source() {
	local src="$work/linux-source-$KVER"
	[ -f "$src/Makefile" ] && return
	local tarball=/usr/src/linux-source-$KVER.tar.xz
	if [ ! -f "$tarball" ]; then
		local pkg="$work/pkg"
		rm -rf "$pkg" && mkdir -p "$pkg"
		(cd "$pkg" && download_source_package)
		dpkg-deb -x "$pkg"/linux-source-"$KVER"_*_all.deb "$pkg/root"
		tarball="$pkg/root/usr/src/linux-source-$KVER.tar.xz"
	fi
	tar -C "$work" -xJf "$tarball"
}

install_build_deps
if [ -z "${KERNEL_SRC:-}" ]; then
	unpack_debian_source
fi
src=${KERNEL_SRC:-$work/linux-source-$KVER}
[ -f "$src/Makefile" ] || { echo "build.sh: $src is not a kernel source tree" >&2; exit 1; }
obj="$work/obj"
mkdir -p "$obj"
make -C "$src" O="$obj" ARCH=x86_64 -s allnoconfig
"$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$here/husk-guest.fragment" >/dev/null
make -C "$src" O="$obj" ARCH=x86_64 -s olddefconfig
# Every option the fragment turns on must survive olddefconfig (a missing dependency drops it).
dropped=0
while read -r opt; do
	grep -qx "$opt" "$obj/.config" || { echo "build.sh: $opt was dropped by olddefconfig" >&2; dropped=1; }
done < <(grep -E '^CONFIG_[A-Z0-9_]+=y' "$here/husk-guest.fragment")
[ "$dropped" = 0 ] || exit 1
start=$(date +%s)
make -C "$src" O="$obj" ARCH=x86_64 -j"$JOBS" vmlinux bzImage > "$work/build.log" 2>&1 \
	|| { tail -30 "$work/build.log" >&2; exit 1; }
cp "$obj/vmlinux" "$out/vmlinux"
cp "$obj/arch/x86/boot/bzImage" "$out/bzImage"
cp "$obj/.config" "$out/config"
echo "guest kernel: $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes) and $out/bzImage, built in $(( $(date +%s) - start )) s"
