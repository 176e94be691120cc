//! What a micro-VM is made of, as the front ends (`husk vm run`, later the runtime) describe it,
//! and its validation.

use std::path::PathBuf;

use crate::arch::layout::{FIRST_VIRTIO_IRQ, LAST_VIRTIO_IRQ, MAX_VCPUS};
use crate::devices::virtio::block::BlockConfig;
use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::vsock::VsockConfig;

/// Smallest guest the VMM builds: room for a small kernel and initramfs.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest: far below what the host's address space and KVM's slots allow.
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated; at 1 MiB it becomes `<file>.1` and a new one starts
    /// (`devices::legacy::console_file`): the guest cannot grow it without bound.
    File(PathBuf),
    /// Nowhere.
    Discard,
}

/// The serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Where guest output goes.
    pub output: ConsoleOutput,
    /// Whether the VMM's standard input is fed to the guest.
    pub read_stdin: bool,
}

/// A whole micro-VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image: ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Map an ELF kernel's pages and the initramfs's into guest memory (private, copy on
    /// write) instead of copying them: VMs that boot the same files then share the page cache
    /// pages their guests only read (most of the kernel's text, all of the initramfs, which the
    /// guest keeps rather than frees: `retain_initrd`), and pages no guest touches cost
    /// nothing. The files must not change while the VM runs, as a rewritten file would change
    /// the guest's kernel under it: husk's runtime hands over copies in its cache that nothing
    /// writes.
    pub share_boot_files: bool,
    /// Back the first 64 MiB of guest memory, where the kernel and its boot-time allocations
    /// lie, with small pages and only the rest with huge pages ([`crate::memory`]): an idle
    /// guest then costs the host about the memory it uses. For VMs that idle side by side
    /// (containers), with `share_boot_files`: a kernel copied into small pages rather than
    /// mapped makes the guest take a nested page fault per 4 KiB of it (a `husk vm run` boot
    /// went from 1.2 to 1.7 s in the nested test host).
    pub small_boot_pages: bool,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Appended to the command line the VMM builds (console, devices, reboot method).
    pub extra_cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The serial console.
    pub console: ConsoleConfig,
    /// Block devices, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<BlockConfig>,
    /// Network cards, each backed by a host tap (`eth0`, `eth1`, ... in the guest).
    pub nets: Vec<NetConfig>,
    /// The vsock device, reached from the host through a Unix socket.
    pub vsock: Option<VsockConfig>,
}

/// A configuration the VMM refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Memory size out of range.
    #[error("guest memory of {0} MiB is out of range ({MIN_MEM_MIB} to {MAX_MEM_MIB} MiB)")]
    MemorySize(u64),
    /// vCPU count out of range.
    #[error("{0} vCPUs is out of range (1 to {MAX_VCPUS})")]
    VcpuCount(u8),
    /// More virtio devices than interrupt lines.
    #[error("{0} virtio devices requested, at most {max} fit", max = LAST_VIRTIO_IRQ - FIRST_VIRTIO_IRQ + 1)]
    TooManyDevices(usize),
}

impl VmConfig {
    /// How many virtio devices the VM gets.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len() + self.nets.len() + usize::from(self.vsock.is_some())
    }

    /// Check the sizes and counts before anything is built.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let virtio_devices = self.virtio_device_count();
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::MemorySize(self.mem_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpus));
        }
        if virtio_devices > (LAST_VIRTIO_IRQ - FIRST_VIRTIO_IRQ + 1) as usize {
            return Err(ConfigError::TooManyDevices(virtio_devices));
        }
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}
