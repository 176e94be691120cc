//! A micro-VM from configuration to end: [`MicroVm::new`] builds it (KVM VM, guest memory,
//! devices, kernel, vCPUs), or [`MicroVm::restore`] builds it from a snapshot (see
//! [`crate::snapshot`]), and [`MicroVm::run`] runs the vCPU threads and the device event loop
//! until the guest resets or powers itself off, or crashes. While it runs, a
//! [`SnapshotHandle`] saves it.

use std::fs::File;
use std::io::Write;
use std::ops::Deref;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vm_superio::serial::SerialState;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::*;
use crate::arch::{mptable, regs};
use crate::boot::{self, BootError};
use crate::config::{ConfigError, ConsoleOutput, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{
    BootTimer, ConsoleFile, EventFdTrigger, SerialConsole, SerialInput, I8042,
};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, NOTIFY_REG_OFFSET};
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::kvm_vm::{KvmError, KvmVm};
use crate::memory::{
    create_guest_memory_with_small_pages_below, GuestMemoryMmap, GuestRam, MemoryError,
    SMALL_BOOT_PAGES,
};
use crate::snapshot::{
    map_memory_file, region_layout, write_memory_file, SnapshotError, VmSnapshot, VmState,
    MEMORY_FILE,
};
use crate::vcpu::{kick, PauseGate, Vcpu, VcpuError, VcpuStop};
use crate::zero_pages::{ZeroPageReclaim, ZeroPageReclaimer};

/// What the VMM puts on every kernel command line: the serial console, reset through the
/// i8042 (which ends the VM), reboot at once on panic, no PCI bus to probe, and no ACPI tables
/// to look for (there are none: CPUs are in the MP table). Without `acpi=off` the kernel says
/// on the console that it found none, 75 bytes that cost a VM exit or two each.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off acpi=off";

/// How long to wait for vCPU threads to leave `KVM_RUN` once the VM stops.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the vCPUs may take to pause for a snapshot.
const SNAPSHOT_PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`SnapshotHandle::take`] waits for the VM to save itself (its memory included).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The event loop's subscribers.
type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The vCPU threads while they run: unjoined until the event loop ends.
type VcpuThreads = Arc<Mutex<Vec<JoinHandle<()>>>>;

/// Why a micro-VM could not be built or did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM failed or is missing.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initramfs or boot parameters.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The boot structures could not be written.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// A device could not be placed on a bus.
    #[error("cannot place a device")]
    Bus(#[from] BusError),
    /// The kernel command line is too long or invalid.
    #[error("invalid kernel command line")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    /// A disk could not be attached.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A network card could not be attached.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The vsock device could not be attached.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The console file cannot be opened.
    #[error("cannot open console output {path}")]
    Console {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An event fd or the event loop failed.
    #[error("VMM event loop: {0}")]
    EventLoop(String),
    /// A snapshot could not be restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The guest crashed (triple fault, crash event).
    #[error("guest crashed: {0}")]
    GuestCrash(String),
    /// KVM could not keep running the guest.
    #[error("vCPU {id} failed: {reason}")]
    VcpuFailed { id: u8, reason: String },
}

fn eventfd() -> Result<EventFd, VmmError> {
    EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| VmmError::EventLoop(format!("cannot create an eventfd: {e}")))
}

/// How the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset the machine (Linux's `reboot`, through the i8042).
    Reset,
    /// The guest powered off through KVM.
    PowerOff,
    /// The host stopped it through its [`MicroVm::stop_event`].
    Stopped,
}

/// The result of a VM that ended cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmOutcome {
    /// How it ended.
    pub exit: GuestExit,
    /// When the guest wrote the boot timer, counted from the start of [`MicroVm::new`].
    pub boot_time: Option<Duration>,
}

/// A built micro-VM, ready to run.
pub struct MicroVm {
    /// Held to keep the VM alive until the vCPUs are joined (the snapshotter holds it too);
    /// declared before `_mem` so that the VM, which maps guest memory, is dropped first.
    _vm: Arc<KvmVm>,
    vcpus: Vec<Vcpu>,
    event_manager: EventManager<Subscriber>,
    exit_monitor: Arc<Mutex<ExitMonitor>>,
    vcpu_stops: mpsc::Sender<(u8, VcpuStop)>,
    vcpu_stop_evt: EventFd,
    host_stop_evt: EventFd,
    stop: Arc<AtomicBool>,
    pause_gate: Arc<PauseGate>,
    vcpu_threads: VcpuThreads,
    zero_pages: Arc<Mutex<ZeroPageReclaimer>>,
    snapshotter: Arc<Mutex<Snapshotter>>,
    boot_time: Arc<Mutex<Option<Duration>>>,
    /// Held only to keep guest memory mapped while the vCPUs run; declared last, so that it
    /// is unmapped after everything that uses it is gone.
    _mem: GuestRam,
}

/// Everything a device needs while the VM is being built.
pub(crate) struct VmBuilder {
    vm: KvmVm,
    pio: Bus,
    mmio: Bus,
    event_manager: EventManager<Subscriber>,
    cmdline: Cmdline,
    virtio_devices: u32,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Declared last, so that on an error it is dropped after the devices that use it.
    mem: GuestRam,
}

impl VmBuilder {
    /// Put a virtio device on the next virtio-mmio window and interrupt line: its irqfd, its
    /// queues' ioeventfds, its transport on the MMIO bus, its event handler in the loop, and
    /// its declaration on the kernel command line. `make` builds the device around its
    /// interrupt.
    fn attach_virtio<D>(
        &mut self,
        make: impl FnOnce(Arc<Interrupt>) -> Result<D, VmmError>,
    ) -> Result<(), VmmError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let irq = FIRST_VIRTIO_IRQ + self.virtio_devices;
        if irq > LAST_VIRTIO_IRQ {
            return Err(ConfigError::TooManyDevices(self.virtio_devices as usize + 1).into());
        }
        let base = VIRTIO_MMIO_START + u64::from(self.virtio_devices) * MMIO_WINDOW_SIZE;
        let irq_evt = eventfd()?;
        self.vm.register_irqfd(&irq_evt, irq)?;
        let device = Arc::new(Mutex::new(make(Arc::new(Interrupt::new(irq_evt)))?));
        {
            let locked = device.lock().unwrap_or_else(|e| e.into_inner());
            for (index, evt) in locked.queue_events().iter().enumerate() {
                self.vm.register_mmio_ioevent(evt, base + NOTIFY_REG_OFFSET, index as u32)?;
            }
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(self.mem.clone(), device.clone())));
        self.mmio.insert(base, MMIO_WINDOW_SIZE, transport.clone())?;
        self.transports.push(transport);
        self.event_manager.add_subscriber(device);
        self.cmdline.add_virtio_mmio_device(MMIO_WINDOW_SIZE, GuestAddress(base), irq, None)?;
        self.virtio_devices += 1;
        Ok(())
    }
}

/// How a VM's guest starts: booting its kernel, or where a snapshot left it.
enum Start<'a> {
    Boot,
    Restore { snapshot: &'a VmSnapshot, memory: &'a File },
}

/// Where the vCPUs start: at the loaded kernel's entry point, or in their saved state.
#[derive(Clone, Copy)]
enum VcpuStart<'a> {
    Entry(GuestAddress),
    Saved(&'a VmSnapshot),
}

impl MicroVm {
    /// Build the VM described by `config`. Nothing runs yet.
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        Self::build(config, Start::Boot)
    }

    /// Build the VM saved in snapshot directory `dir` (see [`crate::snapshot`]) from the
    /// `config` it was built with, but for its devices' host side (disk images, taps, the
    /// vsock socket), which are this VM's own. Nothing runs yet.
    pub fn restore(config: &VmConfig, dir: &Path) -> Result<Self, VmmError> {
        let snapshot = VmSnapshot::read(dir)?;
        let path = dir.join(MEMORY_FILE);
        let memory = File::open(&path).map_err(|source| SnapshotError::File { path, source })?;
        Self::build(config, Start::Restore { snapshot: &snapshot, memory: &memory })
    }

    fn build(config: &VmConfig, how: Start<'_>) -> Result<Self, VmmError> {
        let start = Instant::now();
        config.validate()?;
        let vm = KvmVm::new()?;
        vm.check_vcpu_count(config.vcpus)?;
        let small_below = if config.small_boot_pages { SMALL_BOOT_PAGES } else { 0 };
        let mem = create_guest_memory_with_small_pages_below(
            &memory_regions(config.mem_bytes()),
            small_below,
        )?;
        let saved = match &how {
            Start::Boot => None,
            Start::Restore { snapshot, memory } => {
                map_memory_file(&mem, &snapshot.regions, memory)?;
                if snapshot.vcpus.len() != usize::from(config.vcpus) {
                    return Err(SnapshotError::Mismatch(format!(
                        "{} vCPUs, saved {}",
                        config.vcpus,
                        snapshot.vcpus.len()
                    ))
                    .into());
                }
                Some(*snapshot)
            }
        };
        vm.register_memory(&mem)?;

        let event_manager = EventManager::new()
            .map_err(|e| VmmError::EventLoop(format!("cannot create the event loop: {e:?}")))?;
        let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE)?;
        cmdline.insert_str(BASE_CMDLINE)?;
        let mut builder = VmBuilder {
            vm,
            pio: Bus::new(),
            mmio: Bus::new(),
            event_manager,
            cmdline,
            virtio_devices: 0,
            transports: Vec::new(),
            mem,
        };

        let stop = Arc::new(AtomicBool::new(false));
        let reset_evt = eventfd()?;
        let serial_state = saved.map(|s| &s.serial);
        let (boot_time, serial) =
            attach_legacy_devices(&mut builder, config, start, &stop, &reset_evt, serial_state)?;
        attach_virtio_devices(&mut builder, config)?;
        if config.share_boot_files && config.vcpus == 1 {
            // A kernel booting on one CPU rewrites every `lock` prefix of its text, which would
            // give each guest its own copy of most of the text pages it shares with the others.
            builder.cmdline.insert_str("noreplace-smp")?;
        }
        if config.share_boot_files && config.initrd.is_some() {
            // Linux fills the initramfs's pages with a poison byte as it frees them, which
            // would copy every page of the mapped file into the guest: it keeps them instead.
            builder.cmdline.insert_str("retain_initrd")?;
        }
        if !config.extra_cmdline.trim().is_empty() {
            builder.cmdline.insert_str(config.extra_cmdline.trim())?;
        }

        // `mem` first: bindings are dropped in reverse, so on an error it goes after the devices.
        let VmBuilder { mem, vm, pio, mmio, mut event_manager, cmdline, transports, .. } = builder;
        let vcpu_start = match saved {
            None => VcpuStart::Entry(load_guest(&mem, config, &cmdline)?),
            Some(saved) => VcpuStart::Saved(saved),
        };

        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
        let vcpus = (0..config.vcpus)
            .map(|id| {
                let vcpu = Vcpu::new(&vm, id, pio.clone(), mmio.clone())?;
                match vcpu_start {
                    VcpuStart::Entry(entry) => vcpu.configure(&vm, entry, config.vcpus)?,
                    VcpuStart::Saved(saved) => {
                        vcpu.restore(&vm, config.vcpus, &saved.vcpus[usize::from(id)])?
                    }
                }
                Ok(vcpu)
            })
            .collect::<Result<Vec<_>, VmmError>>()?;
        if let Some(saved) = saved {
            restore_devices(&vm, &transports, saved)?;
        }

        let (vcpu_stops, stops_rx) = mpsc::channel();
        let vcpu_stop_evt = eventfd()?;
        let host_stop_evt = eventfd()?;
        let clone = |evt: &EventFd| evt.try_clone().map_err(|e| VmmError::EventLoop(e.to_string()));
        let exit_monitor = Arc::new(Mutex::new(ExitMonitor {
            reset_evt,
            vcpu_stop_evt: clone(&vcpu_stop_evt)?,
            host_stop_evt: clone(&host_stop_evt)?,
            vcpu_stops: stops_rx,
            outcome: None,
        }));
        event_manager.add_subscriber(exit_monitor.clone());
        let pause_gate = Arc::new(PauseGate::default());
        let vcpu_threads = VcpuThreads::default();
        let zero_pages = Arc::new(Mutex::new(ZeroPageReclaimer::new(
            eventfd()?,
            mem.deref().clone(),
            small_below as u64,
            pause_gate.clone(),
            vcpu_threads.clone(),
        )));
        event_manager.add_subscriber(zero_pages.clone());
        let vm = Arc::new(vm);
        let snapshotter = Arc::new(Mutex::new(Snapshotter {
            trigger: eventfd()?,
            requests: mpsc::channel(),
            vm: vm.clone(),
            mem: mem.deref().clone(),
            vcpu_count: usize::from(config.vcpus),
            gate: pause_gate.clone(),
            vcpus: vcpu_threads.clone(),
            serial,
            transports,
        }));
        event_manager.add_subscriber(snapshotter.clone());
        log::debug!(
            "micro-VM {} in {:?}",
            if saved.is_some() { "restored" } else { "built" },
            start.elapsed()
        );
        Ok(MicroVm {
            _vm: vm,
            vcpus,
            event_manager,
            exit_monitor,
            vcpu_stops,
            vcpu_stop_evt,
            host_stop_evt,
            stop,
            pause_gate,
            vcpu_threads,
            zero_pages,
            snapshotter,
            boot_time,
            _mem: mem,
        })
    }

    /// The handle that saves this VM while it runs (see [`crate::snapshot`]).
    pub fn snapshot_handle(&self) -> std::io::Result<SnapshotHandle> {
        let snapshotter = self.snapshotter.lock().unwrap_or_else(|e| e.into_inner());
        Ok(SnapshotHandle {
            trigger: snapshotter.trigger.try_clone()?,
            requests: snapshotter.requests.0.clone(),
        })
    }

    /// An event that stops the VM when written (a write is async-signal-safe, so a signal
    /// handler may do it); [`MicroVm::run`] then returns [`GuestExit::Stopped`].
    pub fn stop_event(&self) -> std::io::Result<EventFd> {
        self.host_stop_evt.try_clone()
    }

    /// The handle that asks this VM to give its guest's zero pages back to the host (see
    /// [`crate::zero_pages`]).
    pub fn zero_page_reclaim(&self) -> std::io::Result<ZeroPageReclaim> {
        self.zero_pages.lock().unwrap_or_else(|e| e.into_inner()).handle()
    }

    /// Run until the guest ends; returns how it ended, or why it did not end cleanly.
    pub fn run(mut self) -> Result<VmOutcome, VmmError> {
        let mut start_error = None;
        for vcpu in std::mem::take(&mut self.vcpus) {
            let stops = self.vcpu_stops.clone();
            let evt =
                self.vcpu_stop_evt.try_clone().map_err(|e| VmmError::EventLoop(e.to_string()))?;
            match vcpu.start(self.stop.clone(), self.pause_gate.clone(), move |id, end| {
                let _ = stops.send((id, end));
                let _ = evt.write(1);
            }) {
                Ok(thread) => {
                    self.vcpu_threads.lock().unwrap_or_else(|e| e.into_inner()).push(thread)
                }
                Err(e) => {
                    start_error = Some(e.into());
                    break;
                }
            }
        }
        let result = match start_error {
            Some(e) => Err(e),
            None => self.run_event_loop(),
        };
        self.stop.store(true, Ordering::SeqCst);
        let threads =
            std::mem::take(&mut *self.vcpu_threads.lock().unwrap_or_else(|e| e.into_inner()));
        stop_vcpu_threads(threads);
        let boot_time = *self.boot_time.lock().unwrap_or_else(|e| e.into_inner());
        result.map(|exit| VmOutcome { exit, boot_time })
    }

    fn run_event_loop(&mut self) -> Result<GuestExit, VmmError> {
        loop {
            self.event_manager.run().map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
            if let Some(outcome) =
                self.exit_monitor.lock().unwrap_or_else(|e| e.into_inner()).outcome.take()
            {
                return outcome;
            }
        }
    }
}

/// The configured virtio devices, in a fixed order: disks, network cards, vsock.
fn attach_virtio_devices(builder: &mut VmBuilder, config: &VmConfig) -> Result<(), VmmError> {
    for disk in &config.disks {
        builder.attach_virtio(|interrupt| Ok(Block::new(disk.clone(), interrupt)?))?;
    }
    for net in &config.nets {
        builder.attach_virtio(|interrupt| Ok(Net::new(net.clone(), interrupt)?))?;
    }
    if let Some(vsock) = &config.vsock {
        builder.attach_virtio(|interrupt| Ok(Vsock::new(vsock.clone(), interrupt)?))?;
    }
    Ok(())
}

/// The VM-wide KVM state and the virtio devices of a restored VM, whose vCPUs are restored.
fn restore_devices(
    vm: &KvmVm,
    transports: &[Arc<Mutex<MmioTransport>>],
    saved: &VmSnapshot,
) -> Result<(), SnapshotError> {
    saved.vm.restore(vm.fd())?;
    if transports.len() != saved.virtio.len() {
        return Err(SnapshotError::Mismatch(format!(
            "{} virtio devices, saved {}",
            transports.len(),
            saved.virtio.len()
        )));
    }
    for (transport, state) in transports.iter().zip(&saved.virtio) {
        transport.lock().unwrap_or_else(|e| e.into_inner()).restore(state)?;
    }
    Ok(())
}

/// The serial console of a VM.
type Console = Arc<Mutex<SerialConsole>>;

/// When the guest wrote the boot timer, once it has.
type BootTime = Arc<Mutex<Option<Duration>>>;

/// Serial console on COM1 (with `saved` registers for a restored VM), i8042 for the reset
/// line, boot timer; returns the boot time cell and the console.
fn attach_legacy_devices(
    builder: &mut VmBuilder,
    config: &VmConfig,
    start: Instant,
    stop: &Arc<AtomicBool>,
    reset_evt: &EventFd,
    saved: Option<&SerialState>,
) -> Result<(BootTime, Console), VmmError> {
    let serial_irq = eventfd()?;
    builder.vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let fifo_drained = eventfd()?;
    let out = console_output(&config.console.output)?;
    let clone_err = |e: std::io::Error| VmmError::EventLoop(e.to_string());
    let irq = EventFdTrigger::new(serial_irq);
    let drained = fifo_drained.try_clone().map_err(clone_err)?;
    let console = Arc::new(Mutex::new(match saved {
        None => SerialConsole::new(irq, drained, out),
        Some(saved) => SerialConsole::restored(irq, drained, out, saved).map_err(clone_err)?,
    }));
    builder.pio.insert(0x3f8, 8, console.clone())?;
    if config.console.read_stdin {
        let stdin = std::io::stdin().as_fd().try_clone_to_owned().map_err(clone_err)?;
        let input = SerialInput::new(console.clone(), File::from(stdin), fifo_drained);
        builder.event_manager.add_subscriber(Arc::new(Mutex::new(input)));
    }

    let i8042 = I8042::new(stop.clone(), reset_evt.try_clone().map_err(clone_err)?);
    builder.pio.insert(0x60, 5, Arc::new(Mutex::new(i8042)))?;

    let timer = BootTimer::new(start);
    let boot_time = timer.boot_time();
    builder.mmio.insert(BOOT_TIMER_START, BOOT_TIMER_SIZE, Arc::new(Mutex::new(timer)))?;
    Ok((boot_time, console))
}

fn console_output(output: &ConsoleOutput) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match output {
        ConsoleOutput::Stdout => {
            // An unbuffered duplicate of stdout, so guest output appears as it is written.
            let fd = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| VmmError::EventLoop(format!("cannot duplicate stdout: {e}")))?;
            Box::new(File::from(fd))
        }
        ConsoleOutput::File(path) => Box::new(
            ConsoleFile::create(path)
                .map_err(|source| VmmError::Console { path: path.clone(), source })?,
        ),
        ConsoleOutput::Discard => Box::new(std::io::sink()),
    })
}

/// Kernel, initramfs, command line, zero page, MP table, GDT and page tables; returns the
/// kernel's entry point.
fn load_guest(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    cmdline: &Cmdline,
) -> Result<GuestAddress, VmmError> {
    let share = config.share_boot_files;
    let kernel = boot::load_kernel(mem, &config.kernel, share)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(mem, config.mem_bytes(), kernel.end, path, share)?),
        None => None,
    };
    let cmdline_len = boot::write_cmdline(mem, cmdline)?;
    boot::write_zero_page(mem, config.mem_bytes(), &kernel, cmdline_len, initrd)?;
    mptable::setup_mptable(mem, config.vcpus)?;
    regs::write_boot_structures(mem)?;
    Ok(kernel.entry)
}

/// Kick every vCPU thread out of `KVM_RUN` until it ends, then join it.
fn stop_vcpu_threads(threads: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    for thread in threads {
        while !thread.is_finished() && Instant::now() < deadline {
            kick(&thread);
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::error!("a vCPU thread did not stop; leaving it behind");
        }
    }
}

/// Decides how the VM ended, from the i8042 reset line and the vCPUs' ends.
struct ExitMonitor {
    reset_evt: EventFd,
    vcpu_stop_evt: EventFd,
    host_stop_evt: EventFd,
    vcpu_stops: mpsc::Receiver<(u8, VcpuStop)>,
    outcome: Option<Result<GuestExit, VmmError>>,
}

impl ExitMonitor {
    fn conclude(&mut self, outcome: Result<GuestExit, VmmError>) {
        // The first end wins: a guest that reset cleanly and then faulted while being stopped
        // still reset cleanly.
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
    }
}

impl MutEventSubscriber for ExitMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        for evt in [&self.reset_evt, &self.vcpu_stop_evt, &self.host_stop_evt] {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("cannot watch VM exit events: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.conclude(Ok(GuestExit::Reset));
            return;
        }
        if events.fd() == self.host_stop_evt.as_raw_fd() {
            let _ = self.host_stop_evt.read();
            self.conclude(Ok(GuestExit::Stopped));
            return;
        }
        let _ = self.vcpu_stop_evt.read();
        while let Ok((id, end)) = self.vcpu_stops.try_recv() {
            match end {
                // Only raised after the reset line or by the VMM itself.
                VcpuStop::Stopped => {}
                VcpuStop::GuestPowerOff => self.conclude(Ok(GuestExit::PowerOff)),
                VcpuStop::GuestCrash(reason) => self.conclude(Err(VmmError::GuestCrash(reason))),
                VcpuStop::Error(reason) => self.conclude(Err(VmmError::VcpuFailed { id, reason })),
            }
        }
    }
}

/// A request to save the VM into a directory, and where to answer it.
struct SnapshotRequest {
    dir: PathBuf,
    reply: mpsc::Sender<Result<(), SnapshotError>>,
}

/// Saves a running VM when asked through its [`SnapshotHandle`]: on the event loop's thread,
/// so that no device works meanwhile, with the vCPUs paused (each saving its own state).
struct Snapshotter {
    trigger: EventFd,
    requests: (mpsc::Sender<SnapshotRequest>, mpsc::Receiver<SnapshotRequest>),
    vm: Arc<KvmVm>,
    mem: GuestMemoryMmap,
    vcpu_count: usize,
    gate: Arc<PauseGate>,
    vcpus: VcpuThreads,
    serial: Console,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl Snapshotter {
    fn save(&self, dir: &Path) -> Result<(), SnapshotError> {
        let start = Instant::now();
        // Devices run on this thread: what they have now is what is saved.
        for transport in &self.transports {
            let device = transport.lock().unwrap_or_else(|e| e.into_inner()).device();
            let busy = device.lock().unwrap_or_else(|e| e.into_inner()).unsaved_state();
            if let Some(reason) = busy {
                return Err(SnapshotError::Busy(reason));
            }
        }
        // Asked for here, not at every VM's build: only VMs that are saved need it.
        let msr_indices = self.vm.msr_index_list()?;
        let threads = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        let (paused, mut saved) = self
            .gate
            .pause_and_save(&threads, SNAPSHOT_PAUSE_TIMEOUT, msr_indices)
            .ok_or(SnapshotError::NotPaused)?;
        if saved.len() != self.vcpu_count {
            return Err(SnapshotError::VcpusGone { running: saved.len(), wanted: self.vcpu_count });
        }
        saved.sort_by_key(|(id, _)| *id);
        let vcpus = saved.into_iter().map(|(_, state)| state).collect::<Result<Vec<_>, _>>()?;
        let vm = VmState::save(self.vm.fd())?;
        let serial = self.serial.lock().unwrap_or_else(|e| e.into_inner()).snapshot();
        let virtio = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).snapshot())
            .collect();
        write_memory_file(&self.mem, &dir.join(MEMORY_FILE), &paused)?;
        VmSnapshot::new(region_layout(&self.mem), vcpus, vm, serial, virtio).write(dir)?;
        drop(paused);
        log::debug!("VM saved to {} in {:?}", dir.display(), start.elapsed());
        Ok(())
    }
}

impl MutEventSubscriber for Snapshotter {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.trigger, EventSet::IN)) {
            log::error!("cannot watch the snapshot event: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.trigger.read();
        while let Ok(request) = self.requests.1.try_recv() {
            let _ = request.reply.send(self.save(&request.dir));
        }
    }
}

/// Saves a running VM into a snapshot directory (see [`crate::snapshot`]).
pub struct SnapshotHandle {
    trigger: EventFd,
    requests: mpsc::Sender<SnapshotRequest>,
}

impl SnapshotHandle {
    /// Pause the VM, save it into `dir` (an existing directory, whose snapshot files are
    /// replaced), and let it go on. [`SnapshotError::Busy`] while a device has host-side
    /// state the snapshot would lose (a vsock connection still closing).
    pub fn take(&self, dir: &Path) -> Result<(), SnapshotError> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .send(SnapshotRequest { dir: dir.to_path_buf(), reply })
            .map_err(|_| SnapshotError::VmGone)?;
        self.trigger.write(1).map_err(|_| SnapshotError::VmGone)?;
        answer.recv_timeout(SNAPSHOT_TIMEOUT).map_err(|_| SnapshotError::VmGone)?
    }
}
