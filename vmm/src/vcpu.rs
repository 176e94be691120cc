//! A vCPU: its boot-time state (CPUID, MSRs, registers, FPU, LAPIC), and the run loop that
//! serves its I/O and MMIO exits from the buses on its own thread until the VM stops.
//!
//! Stopping: the VM's stop flag is checked after every exit; a vCPU blocked in `KVM_RUN` is
//! kicked out with a signal (see [`kick`]), retried until its thread ends, since a signal that
//! lands just before `KVM_RUN` starts is not seen by it. Pausing ([`PauseGate`]) works the same
//! way: the vCPUs are kicked until every running one waits at the gate, between two exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;

use crate::arch::{cpuid, lapic, msr, regs};
use crate::devices::bus::Bus;
use crate::kvm_vm::{KvmError, KvmVm};
use crate::snapshot::{SnapshotError, VcpuState};

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
    /// A saved state could not be set.
    #[error("cannot restore vCPU {id}")]
    Restore {
        id: u8,
        #[source]
        source: SnapshotError,
    },
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
        self.set_cpuid(vm, count)?;
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

    /// Give the vCPU the CPUID of vCPU `self.id` of `count`: what the host supports, filtered.
    fn set_cpuid(&self, vm: &KvmVm, count: u8) -> Result<(), VcpuError> {
        let mut cpuid = vm.supported_cpuid()?;
        cpuid::filter_cpuid(&mut cpuid, self.id, count, vm.has_tsc_deadline_timer());
        self.fd.set_cpuid2(&cpuid).map_err(self.ioctl_err("CPUID"))
    }

    /// Set a saved state (see [`crate::snapshot`]) on this new vCPU of a VM of `count`.
    pub fn restore(&self, vm: &KvmVm, count: u8, state: &VcpuState) -> Result<(), VcpuError> {
        self.set_cpuid(vm, count)?;
        state.restore(&self.fd).map_err(|e| VcpuError::Restore { id: self.id, source: e })
    }

    /// This vCPU's state, for a snapshot: first a `KVM_RUN` that returns at once
    /// (`immediate_exit`), which completes the port or MMIO read the last exit left for KVM to
    /// finish (its data is in the shared run area, not in any state KVM reports).
    fn save(&mut self, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
        self.fd.set_kvm_immediate_exit(1);
        let completed = self.fd.run().map(drop);
        self.fd.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => {
                return Err(SnapshotError::Ioctl { what: "complete the last exit", source: e })
            }
            Ok(()) => return Err(SnapshotError::ExitWhileSaving),
        }
        VcpuState::save(&self.fd, msr_indices)
    }

    /// Run the guest until `stop` is raised or the guest ends, waiting at `gate` whenever a
    /// pause is asked for (saving its state first when the pause is for a snapshot).
    pub fn run(&mut self, stop: &AtomicBool, gate: &PauseGate) -> VcpuStop {
        loop {
            if stop.load(Ordering::SeqCst) {
                return VcpuStop::Stopped;
            }
            gate.wait_while_paused(self.id, |msr_indices| self.save(msr_indices));
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

    /// Run on a new thread, counted by `gate` as running until its loop ends; `on_stop` is
    /// called with how the loop ended.
    pub fn start(
        mut self,
        stop: Arc<AtomicBool>,
        gate: Arc<PauseGate>,
        on_stop: impl FnOnce(u8, VcpuStop) + Send + 'static,
    ) -> Result<JoinHandle<()>, VcpuError> {
        install_kick_handler();
        let id = self.id;
        gate.enter();
        let thread_gate = gate.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(VCPU_STACK_SIZE)
            .spawn(move || {
                let end = self.run(&stop, &thread_gate);
                thread_gate.leave();
                on_stop(id, end);
            })
            .inspect_err(|_| gate.leave())
            .map_err(|source| VcpuError::Spawn { id, source })
    }
}

/// Where vCPU threads wait, outside `KVM_RUN`, while the VMM works on guest memory that the
/// guest must not touch meanwhile (see [`PauseGate::pause`]).
#[derive(Default)]
pub struct PauseGate {
    /// A pause is asked for: read without the lock by every vCPU after every exit, changed
    /// only with `state` locked, so that a vCPU waiting on `changed` cannot miss the change.
    requested: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    /// vCPU threads whose run loop has not ended.
    running: usize,
    /// vCPU threads waiting at the gate.
    waiting: usize,
    /// While a pause for a snapshot is asked for: the MSRs to save, and each vCPU's state,
    /// saved once all of them wait at the gate.
    saving: Option<(Vec<u32>, SavedVcpus)>,
}

/// The states of a VM's vCPUs, by id, or why one could not be saved.
pub type SavedVcpus = Vec<(u8, Result<VcpuState, SnapshotError>)>;

/// While this lives, no vCPU of its gate runs the guest; dropping it lets them go on.
#[must_use]
pub struct Paused<'a> {
    gate: &'a PauseGate,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let _state = self.gate.lock();
        self.gate.requested.store(false, Ordering::SeqCst);
        self.gate.changed.notify_all();
    }
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A vCPU thread is about to start: from now on a pause waits for it.
    fn enter(&self) {
        self.lock().running += 1;
    }

    /// A vCPU thread's loop has ended (or it never started).
    fn leave(&self) {
        self.lock().running -= 1;
        self.changed.notify_all();
    }

    /// Called by vCPU `id`'s thread between two `KVM_RUN`s: wait as long as a pause is asked
    /// for; if the pause is for a snapshot, save its state with `save` (given the MSRs to save)
    /// once every vCPU waits here. Without a pause (nearly always) it takes no lock.
    ///
    /// A vCPU is saved only when no other still runs the guest: one that runs can still change
    /// it (an IPI lands in its LAPIC), and a change made after its save would be lost from the
    /// snapshot: every guest restored from it would wait for that IPI for ever.
    fn wait_while_paused(
        &self,
        id: u8,
        save: impl FnOnce(&[u32]) -> Result<VcpuState, SnapshotError>,
    ) {
        if !self.requested.load(Ordering::SeqCst) {
            return;
        }
        let mut state = self.lock();
        state.waiting += 1;
        self.changed.notify_all();
        while state.saving.is_some() && state.waiting < state.running {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if let Some((msrs, saved)) = &mut state.saving {
            saved.push((id, save(msrs)));
            self.changed.notify_all();
        }
        while self.requested.load(Ordering::SeqCst) {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.waiting -= 1;
    }

    /// Hold every running vCPU out of `KVM_RUN`, kicking `threads` (the vCPU threads) out of
    /// it until they all wait at the gate; `None` if they did not within `timeout` (one is
    /// stuck in a device's handler), and then they go on.
    pub fn pause(&self, threads: &[JoinHandle<()>], timeout: Duration) -> Option<Paused<'_>> {
        self.pause_with(threads, timeout, None).map(|(paused, _)| paused)
    }

    /// [`PauseGate::pause`], each vCPU saving its state (with the MSRs of `msr_indices`) once
    /// all of them wait at the gate; the states come back with the pause.
    pub fn pause_and_save(
        &self,
        threads: &[JoinHandle<()>],
        timeout: Duration,
        msr_indices: Vec<u32>,
    ) -> Option<(Paused<'_>, SavedVcpus)> {
        self.pause_with(threads, timeout, Some(msr_indices))
    }

    fn pause_with(
        &self,
        threads: &[JoinHandle<()>],
        timeout: Duration,
        save_msrs: Option<Vec<u32>>,
    ) -> Option<(Paused<'_>, SavedVcpus)> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        state.saving = save_msrs.map(|msrs| (msrs, Vec::new()));
        self.requested.store(true, Ordering::SeqCst);
        let paused = Paused { gate: self };
        loop {
            let all_out = state.waiting >= state.running;
            let all_saved = state.saving.as_ref().is_none_or(|(_, s)| s.len() >= state.running);
            if all_out && all_saved {
                break;
            }
            if Instant::now() >= deadline {
                state.saving = None;
                drop(state);
                return None;
            }
            if !all_out {
                threads.iter().for_each(kick);
            }
            // A kick that lands just before `KVM_RUN` starts is lost: kick again soon.
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let saved = state.saving.take().map(|(_, saved)| saved).unwrap_or_default();
        Some((paused, saved))
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
    // SAFETY: the pthread is valid (alive, or ended but not yet reaped: the handle has not been
    // joined) and the kick signal has a handler installed (installed before any vCPU thread
    // starts), so it only interrupts KVM_RUN.
    unsafe {
        libc::pthread_kill(thread.as_pthread_t(), kick_signal());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize};

    /// What [`vcpu_like_threads`] started: the threads, how often they passed the gate, and
    /// how many of them were "in the guest" at each save.
    struct VcpuLike {
        threads: Vec<JoinHandle<()>>,
        count: Arc<AtomicU64>,
        inside_at_save: Arc<Mutex<Vec<usize>>>,
    }

    /// Two threads that count as vCPUs at `gate` until `stop`: after each pass through the
    /// gate, thread `i` spends `in_guest[i]` "in the guest" (counted in `inside`, which a save
    /// records).
    fn vcpu_like_threads(
        gate: &Arc<PauseGate>,
        stop: &Arc<AtomicBool>,
        in_guest: [Duration; 2],
    ) -> VcpuLike {
        install_kick_handler();
        let count = Arc::new(AtomicU64::new(0));
        let inside = Arc::new(AtomicUsize::new(0));
        let inside_at_save = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..2u8)
            .map(|id| {
                let (gate, stop, count) = (gate.clone(), stop.clone(), count.clone());
                let (inside, inside_at_save) = (inside.clone(), inside_at_save.clone());
                gate.enter();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        gate.wait_while_paused(id, |_| {
                            inside_at_save.lock().unwrap().push(inside.load(Ordering::SeqCst));
                            Err(SnapshotError::ExitWhileSaving)
                        });
                        inside.fetch_add(1, Ordering::SeqCst);
                        count.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(in_guest[usize::from(id)]);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                    gate.leave();
                })
            })
            .collect();
        VcpuLike { threads, count, inside_at_save }
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_pause_holds_every_vcpu_until_it_is_dropped() {
        let (gate, stop) = (Arc::default(), Arc::default());
        let VcpuLike { threads, count, .. } = vcpu_like_threads(&gate, &stop, [Duration::ZERO; 2]);
        wait_for("the threads run", || count.load(Ordering::SeqCst) > 0);
        let paused = gate.pause(&threads, Duration::from_secs(5)).expect("both pause");
        let held = count.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count.load(Ordering::SeqCst), held, "nothing runs while paused");
        drop(paused);
        wait_for("the threads go on", || count.load(Ordering::SeqCst) > held);
        stop.store(true, Ordering::SeqCst);
        threads.into_iter().for_each(|t| t.join().unwrap());
        let paused = gate.pause(&[], Duration::from_millis(10));
        assert!(paused.is_some(), "ended threads are not waited for");
    }

    #[test]
    fn a_pause_that_does_not_come_in_time_is_given_up() {
        let (gate, stop) = (Arc::default(), Arc::default());
        let second = Duration::from_secs(1);
        let VcpuLike { threads, count, .. } = vcpu_like_threads(&gate, &stop, [second; 2]);
        wait_for("the threads run", || count.load(Ordering::SeqCst) == 2);
        assert!(gate.pause(&threads, Duration::from_millis(50)).is_none(), "they sleep");
        stop.store(true, Ordering::SeqCst);
        // Given up, the pause is no longer asked for: the threads pass the gate and end.
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn no_vcpu_is_saved_while_another_still_runs_the_guest() {
        let (gate, stop) = (Arc::default(), Arc::default());
        // The second "vCPU" stays in the guest for 300 ms at a time (a kick is no signal here:
        // its sleep goes on), so the first reaches the gate well before it.
        let in_guest = [Duration::ZERO, Duration::from_millis(300)];
        let VcpuLike { threads, count, inside_at_save } = vcpu_like_threads(&gate, &stop, in_guest);
        wait_for("the threads run", || count.load(Ordering::SeqCst) > 2);
        let (paused, saved) =
            gate.pause_and_save(&threads, Duration::from_secs(5), vec![]).expect("both pause");
        let mut ids: Vec<u8> = saved.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [0, 1], "each vCPU saved once");
        assert_eq!(*inside_at_save.lock().unwrap(), [0, 0], "vCPUs inside at each save");
        drop(paused);
        stop.store(true, Ordering::SeqCst);
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}
