//! One vCPU's architectural state as KVM holds it (registers, FPU and extended state, LAPIC,
//! MSRs, multiprocessing and pending-event state): read from a paused vCPU, written into a new
//! one in the order KVM needs (the LAPIC before the MSRs, since the TSC deadline is only
//! accepted once the LAPIC is in deadline mode; events last).

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::{ioctl, SnapshotError};

/// What a vCPU is, between two `KVM_RUN`s.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debug_regs: kvm_debugregs,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    msrs: Vec<kvm_msr_entry>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Read the state of `fd`, which must not be in `KVM_RUN`; `msr_indices` are the MSRs KVM
    /// saves (its `KVM_GET_MSR_INDEX_LIST`), of which those this vCPU cannot read are left out.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, SnapshotError> {
        Ok(VcpuState {
            mp_state: fd.get_mp_state().map_err(ioctl("get the MP state"))?,
            regs: fd.get_regs().map_err(ioctl("get the registers"))?,
            sregs: fd.get_sregs().map_err(ioctl("get the special registers"))?,
            xsave: fd.get_xsave().map_err(ioctl("get the XSAVE area"))?,
            xcrs: fd.get_xcrs().map_err(ioctl("get the XCRs"))?,
            debug_regs: fd.get_debug_regs().map_err(ioctl("get the debug registers"))?,
            lapic: fd.get_lapic().map_err(ioctl("get the LAPIC"))?,
            msrs: read_msrs(fd, msr_indices)?,
            events: fd.get_vcpu_events().map_err(ioctl("get the pending events"))?,
        })
    }

    /// Write this state into `fd`, a new vCPU whose CPUID is already set.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        fd.set_mp_state(self.mp_state).map_err(ioctl("set the MP state"))?;
        fd.set_regs(&self.regs).map_err(ioctl("set the registers"))?;
        fd.set_sregs(&self.sregs).map_err(ioctl("set the special registers"))?;
        // SAFETY: `self.xsave` is a whole `kvm_xsave` (4 KiB), as KVM_GET_XSAVE filled it on a
        // vCPU of the same CPUID: the kernel reads only that struct.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(ioctl("set the XSAVE area"))?;
        // A host without XSAVE reports no XCRs and refuses to set any.
        if self.xcrs.nr_xcrs > 0 {
            fd.set_xcrs(&self.xcrs).map_err(ioctl("set the XCRs"))?;
        }
        fd.set_debug_regs(&self.debug_regs).map_err(ioctl("set the debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(ioctl("set the LAPIC"))?;
        write_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.events).map_err(ioctl("set the pending events"))?;
        Ok(())
    }
}

/// The values of the MSRs of `indices` that `fd` can read. KVM stops a batch at the first MSR
/// it cannot read (one the host CPU lacks): that one is left out and the rest read again.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut wanted: Vec<u32> = indices.to_vec();
    let mut start = 0;
    let mut read = Vec::with_capacity(wanted.len());
    while start < wanted.len() {
        let entries: Vec<kvm_msr_entry> = wanted[start..]
            .iter()
            .map(|&index| kvm_msr_entry { index, ..Default::default() })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::TooManyMsrs)?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("get the MSRs"))?;
        read.extend_from_slice(&msrs.as_slice()[..n]);
        start += n;
        if start < wanted.len() {
            log::debug!("vCPU MSR {:#x} cannot be read; not saved", wanted[start]);
            wanted.remove(start);
        }
    }
    Ok(read)
}

/// Set `entries`; all must be taken, as they were read from a vCPU of the same kind.
fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), SnapshotError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| SnapshotError::TooManyMsrs)?;
    let n = fd.set_msrs(&msrs).map_err(ioctl("set the MSRs"))?;
    match entries.get(n) {
        None => Ok(()),
        Some(refused) => Err(SnapshotError::MsrRefused(refused.index)),
    }
}
