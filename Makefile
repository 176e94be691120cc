# husk: build, run and test.
#   make run     run a busybox container in a husk micro-VM (`husk run` on an OCI bundle)
#   make test    unit tests, KVM plumbing tests, then the end-to-end suites (nested test host)
#   make bench   benchmarks (results: docs/benchmarks.md)

CARGO ?= cargo
BUILD := build
# The guest kernel: the prebuilt one next to the repository unless given.
KERNEL ?= $(abspath ../shared/guest-kernel/vmlinux)
TEST_INITRAMFS := $(BUILD)/test-initramfs.cpio.gz
GUEST_IMAGE := $(BUILD)/guest-image.cpio.gz
# A minimal Debian tree for the Docker suite's Debian image (the nested test host has no network,
# so it is made here, once).
DEBIAN_ROOTFS := $(BUILD)/debian-rootfs
DEBIAN_MIRROR ?= http://deb.debian.org/debian
# `make run`'s OCI bundle (busybox-static) and the state and cache of its husk.
DEMO_BUNDLE := $(BUILD)/demo-bundle
DEMO_ENV = HUSK_KERNEL=$(KERNEL) HUSK_INITRD=$(CURDIR)/$(GUEST_IMAGE) HUSK_CONFIG=/nonexistent \
	HUSK_CACHE_DIR=/tmp/husk-demo-cache
AGENT_MUSL := target/x86_64-unknown-linux-musl/guest/husk-agent
HUSK := target/release/husk
NESTED := $(CURDIR)/tests/nested/run
# Guests inside the nested test host run at emulation speed: skip PIT calibration.
NESTED_CMDLINE := quiet lpj=5000000 tsc_early_khz=2600000 no_timer_check
# Whether this machine's /dev/kvm is hardware KVM (VMX or SVM), else use the nested test host.
HAVE_HW_KVM := $(shell grep -qwE 'vmx|svm' /proc/cpuinfo && [ -e /dev/kvm ] && echo yes)
# Whether this machine's cgroup v2 has the memory controller (the agent's cgroup limit tests).
HAVE_CGROUP2_MEMORY := $(shell grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null && echo yes)


.PHONY: deps all build husk test-initramfs guest-image debian-rootfs check-kernel run test test-unit test-e2e \
	test-agent-cgroups kernel install uninstall bench clean

all: build

# Debian packages and Rust targets (installs only what is missing).
deps:
	.ci/install-deps

build: husk test-initramfs

husk:
	$(CARGO) build --release -p husk

test-initramfs: $(TEST_INITRAMFS)

$(TEST_INITRAMFS): guest-image/build-test-initramfs.sh guest-image/test-initramfs/init
	guest-image/build-test-initramfs.sh $@

# The guest image: the static husk-agent as /init (cargo decides what to rebuild).
guest-image:
	$(CARGO) build --profile guest --target x86_64-unknown-linux-musl -p husk-agent
	guest-image/build-guest-image.sh $(AGENT_MUSL) $(GUEST_IMAGE)

# debootstrap into a temporary directory and rename it at the end, so that an interrupted run
# leaves no half tree that later runs would take for done.
debian-rootfs: $(DEBIAN_ROOTFS)/etc/debian_version

$(DEBIAN_ROOTFS)/etc/debian_version:
	rm -rf $(DEBIAN_ROOTFS).tmp
	mkdir -p $(BUILD)
	debootstrap --variant=minbase bookworm $(abspath $(DEBIAN_ROOTFS)).tmp $(DEBIAN_MIRROR)
	rm -rf $(DEBIAN_ROOTFS)
	mv $(DEBIAN_ROOTFS).tmp $(DEBIAN_ROOTFS)

check-kernel:
	@test -f "$(KERNEL)" || { echo "guest kernel $(KERNEL) is missing (set KERNEL=...)" >&2; exit 1; }

# Run a busybox container in a micro-VM with `husk run`, as runc runs a bundle: it prints its
# kernel (the guest's), CPUs and memory (the VM's). Without hardware KVM here, inside the nested
# test host (QEMU with emulated SVM).
run: deps husk guest-image check-kernel
	tests/busybox-bundle.sh $(DEMO_BUNDLE)
ifeq ($(HAVE_HW_KVM),yes)
	env $(DEMO_ENV) $(HUSK) --root /run/husk-demo run --bundle $(DEMO_BUNDLE) demo-$$$$ </dev/null
else
	@echo "make run: no hardware KVM on this machine; running inside the nested test host" >&2
	$(NESTED) -- env $(DEMO_ENV) HUSK_KERNEL_CMDLINE="$(NESTED_CMDLINE)" \
		$(CURDIR)/$(HUSK) --root /run/husk-demo run --bundle $(CURDIR)/$(DEMO_BUNDLE) demo </dev/null
endif

test: deps
	$(MAKE) test-unit test-e2e test-agent-cgroups

# Device models with no guest, the KVM plumbing with tiny guests (any /dev/kvm), the CLI.
test-unit:
	$(CARGO) test --workspace --exclude husk-e2e

# Real Linux guests: each suite's test binary runs inside the nested test host (the runner,
# one CPU: test hosts with two are not reliable, tests/nested/README.md), or directly where
# this machine has hardware KVM. The Docker suite (tests/e2e/docker) also needs the Debian tree.
E2E_ENV := HUSK_TEST_KERNEL=$(KERNEL) HUSK_TEST_DEBIAN_ROOTFS=$(abspath $(DEBIAN_ROOTFS))
test-e2e: build guest-image check-kernel debian-rootfs
ifeq ($(HAVE_HW_KVM),yes)
	$(E2E_ENV) $(CARGO) test -p husk-e2e -- --test-threads=1
else
	$(E2E_ENV) CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$(NESTED) --" \
		$(CARGO) test -p husk-e2e -- --test-threads=1
endif

# The agent's cgroup v2 limit and OOM tests, ignored by test-unit where cgroup v2 lacks the
# memory controller (cgroup v1 machines): run here if it has it, else in the nested test host.
test-agent-cgroups:
ifeq ($(HAVE_CGROUP2_MEMORY),yes)
	$(CARGO) test -p husk-agent --test cgroup_limits -- --ignored
else
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$(NESTED) --" \
		$(CARGO) test -p husk-agent --test cgroup_limits -- --ignored --test-threads=1
endif

# The project's own guest kernel (Debian's linux-source by default, KERNEL_SRC=DIR for another
# tree): build/kernel/vmlinux. A user's step; tests use the prebuilt kernel.
kernel:
	guest-image/kernel/build.sh $(BUILD)/kernel

# Install husk and its guest assets where the installed husk finds them with no flags:
# $(PREFIX)/bin/husk, $(PREFIX)/share/husk/{vmlinux,husk-guest.cpio.gz}.
PREFIX ?= /usr/local
install: husk guest-image check-kernel
	install -D -m 0755 $(HUSK) $(DESTDIR)$(PREFIX)/bin/husk
	install -D -m 0644 $(KERNEL) $(DESTDIR)$(PREFIX)/share/husk/vmlinux
	install -D -m 0644 $(GUEST_IMAGE) $(DESTDIR)$(PREFIX)/share/husk/husk-guest.cpio.gz

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/husk $(DESTDIR)$(PREFIX)/share/husk/vmlinux \
		$(DESTDIR)$(PREFIX)/share/husk/husk-guest.cpio.gz
	-rmdir $(DESTDIR)$(PREFIX)/share/husk

bench: deps build guest-image check-kernel
	$(CARGO) build --release -p husk-bench-agent
	bench/run

clean:
	$(CARGO) clean
	rm -rf $(BUILD)
