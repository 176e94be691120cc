//! Snapshots of a running micro-VM, and VMs restored from them (as Firecracker's snapshots and
//! Kata's VM templates do): a guest booted once, paused and saved, then started again as many
//! times as wanted without booting, each restored VM mapping the saved memory privately so
//! that the pages none of them writes stay shared in the host's page cache.
//!
//! A snapshot is a directory of two files: [`STATE_FILE`], the state of the vCPUs, of the
//! VM's in-kernel irqchip, PIT and clock, and of the devices (the serial port and each
//! virtio-mmio device's transport and queues), as JSON; and [`MEMORY_FILE`], guest memory,
//! region after region, written sparse (only the pages the guest touched and did not leave
//! zero). It is taken by [`crate::micro_vm::SnapshotHandle::take`] and restored by
//! [`crate::micro_vm::MicroVm::restore`], which takes the same [`VmConfig`] the VM was built
//! from, but for the devices' host side: disk images, taps and the vsock socket are the
//! restored VM's own. A VM is saved only while no device has host-side state a snapshot
//! would lose (a vsock connection: [`SnapshotError::Busy`]); a restored disk tells the guest
//! to read its capacity again, so that a VM saved with an empty disk can be given its real one.
//!
//! The snapshot is trusted as the host's own file (the cache directory it lives in is the
//! host's); what the guest put in it, like queue addresses, is checked where it is used, as
//! it is in a VM that booted.

mod memory_file;
mod vcpu_state;
mod vm_state;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use memory_file::{map_memory_file, region_layout, write_memory_file};
pub use vcpu_state::VcpuState;
pub use vm_state::VmState;

use vm_superio::serial::SerialState;

use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::state::VirtioSnapshot;

/// The snapshot's state file in its directory.
pub const STATE_FILE: &str = "vm.json";
/// The snapshot's guest memory file in its directory.
pub const MEMORY_FILE: &str = "memory";
/// The layout of the state this VMM writes; a snapshot of another is refused.
const FORMAT: u32 = 1;

/// Why a snapshot could not be taken or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A KVM call failed.
    #[error("cannot {what}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM could not list the MSRs to save.
    #[error(transparent)]
    Kvm(#[from] crate::kvm_vm::KvmError),
    /// More MSRs than KVM takes in one call.
    #[error("too many MSRs to save")]
    TooManyMsrs,
    /// KVM refused a saved MSR.
    #[error("KVM refused the saved MSR {0:#x}")]
    MsrRefused(u32),
    /// The vCPU had an exit to serve when it should only have completed its last one.
    #[error("the vCPU exited while its state was being saved")]
    ExitWhileSaving,
    /// A device has state the snapshot would lose; try again once it is gone.
    #[error("a device cannot be saved now: {0}")]
    Busy(String),
    /// The vCPUs did not pause in time.
    #[error("the vCPUs did not pause for the snapshot")]
    NotPaused,
    /// A vCPU thread is gone (the VM ended).
    #[error("the VM has {running} running vCPUs of {wanted}")]
    VcpusGone { running: usize, wanted: usize },
    /// The VM is not running (or stopped before answering).
    #[error("the VM is not running")]
    VmGone,
    /// A file of the snapshot could not be written or read.
    #[error("snapshot file {}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The state file is not a snapshot this VMM wrote.
    #[error("snapshot state {}: {reason}", .path.display())]
    Format { path: PathBuf, reason: String },
    /// The snapshot was taken of another VM than the one to restore.
    #[error("the snapshot does not fit the VM: {0}")]
    Mismatch(String),
    /// A virtio queue's saved state is refused.
    #[error("saved virtio queue refused: {0:?}")]
    Queue(virtio_queue::Error),
    /// A restored virtio device could not be activated.
    #[error("cannot activate a restored virtio device: {0}")]
    Activate(String),
}

/// The error of the KVM call that did `what`.
fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Ioctl { what, source }
}

/// Everything of a VM but its memory.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    format: u32,
    /// Guest memory regions, (guest address, bytes), as they follow one another in the
    /// memory file.
    pub(crate) regions: Vec<(u64, u64)>,
    pub(crate) vcpus: Vec<VcpuState>,
    pub(crate) vm: VmState,
    #[serde(with = "SerialSnapshot")]
    pub(crate) serial: SerialState,
    pub(crate) virtio: Vec<VirtioSnapshot>,
}

impl VmSnapshot {
    pub(crate) fn new(
        regions: Vec<(u64, u64)>,
        vcpus: Vec<VcpuState>,
        vm: VmState,
        serial: SerialState,
        virtio: Vec<VirtioSnapshot>,
    ) -> Self {
        VmSnapshot { format: FORMAT, regions, vcpus, vm, serial, virtio }
    }

    /// Write the state file into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> Result<(), SnapshotError> {
        let path = dir.join(STATE_FILE);
        let file_err = |source| SnapshotError::File { path: path.clone(), source };
        let file = File::create(&path).map_err(file_err)?;
        serde_json::to_writer(io::BufWriter::new(file), self)
            .map_err(|e| file_err(io::Error::other(e)))
    }

    /// Read the state file of the snapshot in `dir`.
    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path)
            .map_err(|source| SnapshotError::File { path: path.clone(), source })?;
        let snapshot: VmSnapshot = serde_json::from_slice(&bytes)
            .map_err(|e| SnapshotError::Format { path: path.clone(), reason: e.to_string() })?;
        if snapshot.format != FORMAT {
            return Err(SnapshotError::Format {
                path,
                reason: format!("format {} where this husk writes {FORMAT}", snapshot.format),
            });
        }
        Ok(snapshot)
    }
}
