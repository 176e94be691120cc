//! A vCPU: its boot-time state (CPUID, MSRs, registers, FPU, LAPIC), and the run loop that
//! serves its I/O and MMIO exits from the buses on its own thread until the VM stops.
//!
//! Stopping: the VM's stop flag is checked after every exit; a vCPU blocked in `KVM_RUN` is
//! kicked out with a signal (see [`kick`]), retried until its thread ends, since a signal that
//! lands just before `KVM_RUN` starts is not seen by it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;

use crate::arch::{cpuid, lapic, msr, regs};
use crate::devices::bus::Bus;
use crate::kvm_vm::{KvmError, KvmVm};

/// Why a vCPU's boot state could not be set.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM call failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Setting registers failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// A vCPU ioctl failed.
    #[error("cannot set vCPU {id} {what}")]
    Ioctl {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than given.
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
    /// The vCPU thread could not be started.
    #[error("cannot start the vCPU {id} thread")]
    Spawn {
        id: u8,
        #[source]
        source: std::io::Error,
    },
}

/// How a vCPU's run loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The VM's stop flag was raised (the guest reset through the i8042, or the VMM stops).
    Stopped,
    /// The guest asked KVM to power off or reset (`KVM_SYSTEM_EVENT`).
    GuestPowerOff,
    /// The guest triple-faulted or asked for a crash event.
    GuestCrash(String),
    /// KVM failed to run the guest.
    Error(String),
}

/// The stack of a vCPU thread, which only runs `KVM_RUN` and the bus handlers of its exits.
/// Under 2 MiB on purpose: where transparent huge pages are always on, a 2 MiB stack (Rust's
/// default) can land on a huge page boundary and cost 2 MiB of memory from its first use.
const VCPU_STACK_SIZE: usize = 512 << 10;

/// One virtual CPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

impl Vcpu {
    /// Create vCPU `id` serving its exits from `pio` and `mmio`.
    pub fn new(vm: &KvmVm, id: u8, pio: Arc<Bus>, mmio: Arc<Bus>) -> Result<Self, VcpuError> {
        Ok(Vcpu { id, fd: vm.create_vcpu(id)?, pio, mmio })
    }

    fn ioctl_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Ioctl { id, what, source }
    }

    /// Set the state Linux's 64-bit boot protocol expects, entering at `entry`, for a VM of
    /// `count` vCPUs. The GDT and page tables must already be in guest memory.
    pub fn configure(&self, vm: &KvmVm, entry: GuestAddress, count: u8) -> Result<(), VcpuError> {
        let mut cpuid = vm.supported_cpuid()?;
        cpuid::filter_cpuid(&mut cpuid, self.id, count, vm.has_tsc_deadline_timer());
        self.fd.set_cpuid2(&cpuid).map_err(self.ioctl_err("CPUID"))?;

        let msrs = msr::boot_msrs();
        let set = self.fd.set_msrs(&msrs).map_err(self.ioctl_err("MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs { set, wanted: msrs.as_slice().len() });
        }
        regs::setup_regs(&self.fd, entry)?;
        regs::setup_fpu(&self.fd)?;
        regs::setup_sregs(&self.fd)?;

        let mut lapic_state = self.fd.get_lapic().map_err(self.ioctl_err("LAPIC"))?;
        lapic::set_lint(&mut lapic_state);
        self.fd.set_lapic(&lapic_state).map_err(self.ioctl_err("LAPIC"))?;
        Ok(())
    }

    /// Run the guest until `stop` is raised or the guest ends.
    pub fn run(&mut self, stop: &AtomicBool) -> VcpuStop {
        loop {
            if stop.load(Ordering::SeqCst) {
                return VcpuStop::Stopped;
            }
            if let Some(end) = self.run_once() {
                return end;
            }
        }
    }

    /// One `KVM_RUN`; `Some` when the loop must end.
    fn run_once(&mut self) -> Option<VcpuStop> {
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    log::debug!("vCPU {}: read of unmapped MMIO {addr:#x}", self.id);
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio.write(addr, data) {
                    log::debug!("vCPU {}: write to unmapped MMIO {addr:#x}", self.id);
                }
            }
            Ok(VcpuExit::Shutdown) => return Some(VcpuStop::GuestCrash("triple fault".into())),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => VcpuStop::GuestPowerOff,
                    KVM_SYSTEM_EVENT_CRASH => VcpuStop::GuestCrash("guest crash event".into()),
                    other => VcpuStop::Error(format!("unknown system event {other}")),
                })
            }
            Ok(VcpuExit::Hlt) => {
                return Some(VcpuStop::Error("vCPU halted outside the irqchip".into()))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(VcpuStop::Error(format!(
                    "KVM entry failed: reason {reason:#x} on CPU {cpu}"
                )))
            }
            Ok(VcpuExit::InternalError) => {
                return Some(VcpuStop::Error("KVM internal error".into()))
            }
            Ok(other) => return Some(VcpuStop::Error(format!("unexpected exit {other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Some(VcpuStop::Error(format!("KVM_RUN failed: {e}"))),
        }
        None
    }

    /// Run on a new thread; `on_stop` is called with how the loop ended.
    pub fn start(
        mut self,
        stop: Arc<AtomicBool>,
        on_stop: impl FnOnce(u8, VcpuStop) + Send + 'static,
    ) -> Result<JoinHandle<()>, VcpuError> {
        install_kick_handler();
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(VCPU_STACK_SIZE)
            .spawn(move || {
                let end = self.run(&stop);
                on_stop(id, end);
            })
            .map_err(|source| VcpuError::Spawn { id, source })
    }
}

/// The signal that interrupts `KVM_RUN`.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // The handler does nothing: its only job is to make KVM_RUN return EINTR.
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            log::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Interrupt the vCPU thread `thread` if it is inside `KVM_RUN`.
pub fn kick(thread: &JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: the pthread is alive (the handle has not been joined) and the kick signal has a
    // handler installed (installed before any vCPU thread starts), so it only interrupts KVM_RUN.
    unsafe {
        libc::pthread_kill(thread.as_pthread_t(), kick_signal());
    }
}
