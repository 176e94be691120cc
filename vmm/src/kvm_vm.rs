//! The KVM side of a micro-VM: opening /dev/kvm with clear errors, checking the capabilities
//! husk relies on, registering guest memory, the in-kernel irqchip and PIT, irqfds and
//! ioeventfds.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::GuestMemoryMmap;

/// The capabilities the VMM cannot work without.
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::Irqfd, "irqfd"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::ExtCpuid, "extended CPUID"),
    (Cap::Pit2, "in-kernel PIT"),
];

/// What went wrong with KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm does not exist.
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualization)")]
    NoKvm,
    /// /dev/kvm exists but cannot be opened.
    #[error("permission denied opening /dev/kvm: run as root or add the user to the group owning /dev/kvm")]
    KvmPermission,
    /// Any other failure to open /dev/kvm.
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// The host's KVM lacks a capability.
    #[error("the host's KVM lacks the {0} capability")]
    MissingCap(&'static str),
    /// More vCPUs than KVM allows.
    #[error("{requested} vCPUs requested, but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
    /// A KVM ioctl failed.
    #[error("KVM cannot {what}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

/// A KVM VM with its irqchip and PIT.
pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
}

impl KvmVm {
    /// Open /dev/kvm, check its capabilities, create a VM with an in-kernel irqchip and PIT.
    pub fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT => KvmError::NoKvm,
            libc::EACCES | libc::EPERM => KvmError::KvmPermission,
            _ => KvmError::KvmOpen(e),
        })?;
        if let Some((_, name)) = REQUIRED_CAPS.iter().find(|(cap, _)| !kvm.check_extension(*cap)) {
            return Err(KvmError::MissingCap(name));
        }
        let fd = kvm.create_vm().map_err(ioctl_err("create a VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(ioctl_err("set the TSS address"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl_err("set the identity map address"))?;
        fd.create_irq_chip().map_err(ioctl_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(ioctl_err("create the in-kernel PIT"))?;
        Ok(KvmVm { kvm, fd })
    }

    /// Check that KVM can run `count` vCPUs.
    pub fn check_vcpu_count(&self, count: u8) -> Result<(), KvmError> {
        let max = self.kvm.get_max_vcpus();
        if usize::from(count) > max {
            return Err(KvmError::TooManyVcpus { requested: count, max });
        }
        Ok(())
    }

    /// Give the guest `mem`, one memory slot per region.
    ///
    /// The caller keeps `mem` alive (and mapped) for as long as this VM exists.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), KvmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host_addr =
                mem.get_host_address(region.start_addr()).map_err(|_| KvmError::Ioctl {
                    what: "find a memory region",
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let slot_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
            };
            // SAFETY: the region is a live anonymous mapping of `memory_size` bytes at
            // `userspace_addr`, owned by `mem`, which the caller keeps mapped for the VM's life.
            unsafe { self.fd.set_user_memory_region(slot_desc) }
                .map_err(ioctl_err("register guest memory"))?;
        }
        Ok(())
    }

    /// Make writes to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.fd.register_irqfd(evt, gsi).map_err(ioctl_err("register an irqfd"))
    }

    /// Make guest writes of `datamatch` (32 bits) to MMIO address `addr` signal `evt` without an
    /// exit to the VMM.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), KvmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(ioctl_err("register an ioeventfd"))
    }

    /// Create vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, KvmError> {
        self.fd.create_vcpu(u64::from(id)).map_err(ioctl_err("create a vCPU"))
    }

    /// The CPUID entries KVM supports on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, KvmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("report supported CPUID"))
    }

    /// The MSRs KVM saves and restores for a vCPU (`KVM_GET_MSR_INDEX_LIST`).
    pub fn msr_index_list(&self) -> Result<Vec<u32>, KvmError> {
        let list = self.kvm.get_msr_index_list().map_err(ioctl_err("list the MSRs"))?;
        Ok(list.as_slice().to_vec())
    }

    /// Whether the in-kernel LAPIC emulates the TSC-deadline timer mode. KVM does not report it
    /// in the supported CPUID (the bit belongs to the LAPIC, not the CPU), so the VMM sets it.
    pub fn has_tsc_deadline_timer(&self) -> bool {
        self.kvm.check_extension(Cap::TscDeadlineTimer)
    }

    /// The VM file descriptor, for tests and diagnostics that need raw ioctls.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
