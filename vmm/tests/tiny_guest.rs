//! The VMM's KVM plumbing on a real /dev/kvm, with tiny guests the tests assemble: long-mode
//! entry as the VMM sets it up, the zero page and command line it writes, serial output, the
//! boot timer, MMIO exits, ioeventfd and irqfd, and the i8042 reset and triple fault as ends.
//! These run on any KVM, including a PVM host that cannot run Linux.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use husk_tests::tiny_guest::{elf_image, Asm, TempDir, COM1, LOAD_ADDR};
use vm_memory::{Bytes, GuestAddress};
use vmm::arch::layout::{BOOT_TIMER_START, ZERO_PAGE_START};
use vmm::config::{ConsoleConfig, ConsoleOutput, VmConfig};
use vmm::micro_vm::{GuestExit, MicroVm, VmmError};

fn require_kvm() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (any KVM, nested or PVM, will do)"
    );
}

fn config(dir: &TempDir, code: &[u8]) -> VmConfig {
    VmConfig {
        kernel: dir.write("tiny.elf", &elf_image(code)),
        share_boot_files: false,
        small_boot_pages: false,
        initrd: None,
        extra_cmdline: "husk.test=tiny".into(),
        mem_mib: 32,
        vcpus: 1,
        console: ConsoleConfig {
            output: ConsoleOutput::File(dir.path().join("console")),
            read_stdin: false,
        },
        disks: vec![],
        nets: vec![],
        vsock: None,
    }
}

fn run(config: &VmConfig) -> Result<vmm::micro_vm::VmOutcome, VmmError> {
    MicroVm::new(config)?.run()
}

fn console(dir: &TempDir) -> String {
    String::from_utf8_lossy(&std::fs::read(dir.path().join("console")).unwrap()).into_owned()
}

/// Checks long mode (EFER.LMA, CR0.PE|PG) and rsi = zero page, prints the kernel command line
/// found through the zero page, writes the boot timer and resets.
fn boot_checks_program() -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_ecx(0xc000_0080).rdmsr().and_eax(1 << 10).cmp_eax(1 << 10);
    let not_long_mode = a.jnz();
    a.mov_rax_cr0().and_eax(0x8000_0001).cmp_eax(0x8000_0001);
    let no_paging = a.jnz();
    a.cmp_rsi(ZERO_PAGE_START as u32);
    let no_zero_page = a.jnz();
    // rdmsr wrote edx: select the serial port only now.
    a.mov_dx(COM1).print(b"LONG MODE OK\ncmdline: ");
    // The command line pointer is at offset 0x228 of boot_params.
    a.mov_ebx_rsi_disp(0x228);
    let top = a.here();
    a.mov_al_at_rbx().test_al();
    let end_of_string = a.jz();
    a.out_dx_al().inc_rbx().jmp_back(top);
    a.bind(end_of_string);
    a.print(b"\n");
    a.mov_rbx(BOOT_TIMER_START).mov_at_rbx_byte(123);
    a.i8042_reset();
    a.bind(not_long_mode).bind(no_paging).bind(no_zero_page);
    a.mov_dx(COM1).print(b"BAD ENTRY STATE\n").i8042_reset();
    a.code().to_vec()
}

#[test]
fn boots_in_long_mode_prints_and_resets() {
    require_kvm();
    let dir = TempDir::new("long-mode");
    let outcome = run(&config(&dir, &boot_checks_program())).expect("tiny guest runs");
    assert_eq!(outcome.exit, GuestExit::Reset);
    let out = console(&dir);
    assert!(out.contains("LONG MODE OK\n"), "console: {out:?}");
    let cmdline = out.lines().find_map(|l| l.strip_prefix("cmdline: ")).expect("cmdline printed");
    assert!(cmdline.starts_with("console=ttyS0 reboot=k"), "{cmdline}");
    assert!(cmdline.ends_with("husk.test=tiny"), "the extra command line is appended: {cmdline}");
    assert!(outcome.boot_time.is_some(), "the boot timer write was recorded");
}

/// With `share_boot_files`, the guest runs code straight from the kernel file's pages (its first
/// page holds the whole program), with `noreplace-smp` on the command line of a 1-vCPU guest
/// and `retain_initrd` where it has a (mapped) initramfs; in small boot pages, as containers.
#[test]
fn a_kernel_mapped_from_its_file_runs() {
    require_kvm();
    let dir = TempDir::new("shared-kernel");
    let mut code = boot_checks_program();
    assert!(code.len() < 4096);
    code.resize(8192, 0);
    let mut config = config(&dir, &code);
    config.share_boot_files = true;
    config.small_boot_pages = true;
    config.initrd = Some(dir.write("initrd", &[0x5a; 3 * 4096 + 100]));
    let outcome = run(&config).expect("tiny guest runs");
    assert_eq!(outcome.exit, GuestExit::Reset);
    let out = console(&dir);
    assert!(out.contains("LONG MODE OK\n"), "console: {out:?}");
    let cmdline = out.lines().find_map(|l| l.strip_prefix("cmdline: ")).expect("cmdline printed");
    assert!(cmdline.contains(" noreplace-smp retain_initrd husk.test=tiny"), "{cmdline}");
}

#[test]
fn boot_timer_stays_empty_without_the_write() {
    require_kvm();
    let dir = TempDir::new("no-boot-timer");
    let mut a = Asm::new();
    a.i8042_reset();
    let outcome = run(&config(&dir, a.code())).expect("tiny guest runs");
    assert_eq!(outcome.exit, GuestExit::Reset);
    assert_eq!(outcome.boot_time, None);
}

#[test]
fn triple_fault_is_a_guest_crash() {
    require_kvm();
    let dir = TempDir::new("triple-fault");
    let mut a = Asm::new();
    // ud2 rather than int3: this machine's PVM cannot emulate int3.
    a.lidt_empty().ud2().halt_forever();
    let err = run(&config(&dir, a.code())).expect_err("a triple fault is not a clean end");
    assert!(matches!(err, VmmError::GuestCrash(_)), "{err}");
}

#[test]
fn two_vcpus_boot_and_reset() {
    require_kvm();
    let dir = TempDir::new("two-vcpus");
    let mut a = Asm::new();
    a.mov_dx(COM1).print(b"BSP\n").i8042_reset();
    let mut cfg = config(&dir, a.code());
    cfg.vcpus = 2;
    let outcome = run(&cfg).expect("two-vCPU tiny guest runs");
    assert_eq!(outcome.exit, GuestExit::Reset);
    assert_eq!(console(&dir), "BSP\n");
}

#[test]
fn stop_event_ends_a_running_guest() {
    require_kvm();
    let dir = TempDir::new("stop-event");
    let mut a = Asm::new();
    let top = a.here();
    a.jmp_back(top);
    let vm = MicroVm::new(&config(&dir, a.code())).unwrap();
    let stop = vm.stop_event().unwrap();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        stop.write(1).unwrap();
    });
    let outcome = vm.run().expect("a stopped VM is a clean end");
    stopper.join().unwrap();
    assert_eq!(outcome.exit, GuestExit::Stopped);
}

/// A guest that wrote zeros over 1 MiB gets those pages taken back when the host asks, while
/// it runs; the page it wrote a value to stays, and it keeps reading the value there. Two
/// vCPUs: the reclaim pauses the one spinning in the guest and the one KVM holds waiting for
/// its startup IPI.
#[test]
fn zero_pages_go_back_to_the_host_while_the_guest_runs_on() {
    require_kvm();
    let dir = TempDir::new("zero-pages");
    let (zeros, value_at, value) = (0x40_0000u32, 0x50_0000u32, 0x1234_5678u32);
    let mut a = Asm::new();
    a.mov_rbx(zeros.into());
    let zero_loop = a.here();
    a.mov_at_rbx_dword(0, 0).add_rbx(4096).cmp_rbx(zeros + (1 << 20));
    let zeroed = a.jz();
    a.jmp_back(zero_loop).bind(zeroed);
    a.mov_rbx(value_at.into()).mov_at_rbx_dword(0, value).mov_dx(COM1).print(b"ready\n");
    let check = a.here();
    a.mov_eax_at_rbx(0).cmp_eax(value);
    let changed = a.jnz();
    a.jmp_back(check).bind(changed).print(b"value lost\n").i8042_reset();
    let mut cfg = config(&dir, a.code());
    cfg.small_boot_pages = true;
    cfg.vcpus = 2;
    let vm = MicroVm::new(&cfg).unwrap();
    let reclaim = vm.zero_page_reclaim().unwrap();
    let stop = vm.stop_event().unwrap();
    let runner = std::thread::spawn(move || vm.run());

    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}; console: {}", console(&dir));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    wait("the guest zeroes its pages", &|| console(&dir) == "ready\n");
    reclaim.request().unwrap();
    wait("the reclaim ends", &|| reclaim.reclaimed_bytes() > 0);
    let bytes = reclaim.reclaimed_bytes();
    // The guest's other pages (code, boot structures, the value) are the VMM's writes, not
    // zeros; a few of those may be whole pages of zeros.
    assert!((1 << 20..(1 << 20) + (64 << 10)).contains(&bytes), "{bytes} bytes given back");
    std::thread::sleep(std::time::Duration::from_millis(100));
    stop.write(1).unwrap();
    let outcome = runner.join().unwrap().expect("a stopped VM is a clean end");
    assert_eq!(outcome.exit, GuestExit::Stopped);
    assert_eq!(console(&dir), "ready\n", "the guest still reads its value");
}

/// A guest printing without end fills no more than twice the console file's limit on the host:
/// the full file becomes `console.1` and a new one starts.
#[test]
fn a_guest_flooding_its_console_is_bounded_on_the_host() {
    require_kvm();
    let dir = TempDir::new("console-flood");
    let mut a = Asm::new();
    a.mov_dx(COM1).mov_al(b'x');
    let top = a.here();
    a.out_dx_al().jmp_back(top);
    let vm = MicroVm::new(&config(&dir, a.code())).unwrap();
    let stop = vm.stop_event().unwrap();
    let rotated = dir.path().join("console.1");
    let watcher = {
        let rotated = rotated.clone();
        std::thread::spawn(move || {
            // Until the file has been rotated and refilled a little (or two minutes).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while std::time::Instant::now() < deadline
                && std::fs::metadata(&rotated).map_or(true, |m| m.len() == 0)
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            stop.write(1).unwrap();
        })
    };
    let outcome = vm.run().expect("a stopped VM is a clean end");
    watcher.join().unwrap();
    assert_eq!(outcome.exit, GuestExit::Stopped);
    let limit = vmm::devices::legacy::console_file::CONSOLE_FILE_LIMIT;
    let full = std::fs::read(&rotated).expect("the full console file was rotated");
    assert_eq!(full.len() as u64, limit);
    assert!(full.iter().all(|&b| b == b'x'));
    let current = std::fs::metadata(dir.path().join("console")).unwrap().len();
    assert!(current > 0 && current <= limit, "the new console file: {current} bytes");
}

#[test]
fn guest_reads_the_virtio_mmio_registers_of_a_disk() {
    require_kvm();
    let dir = TempDir::new("virtio-mmio");
    let disk = dir.write("disk.img", &vec![0u8; 1 << 20]);
    let mut a = Asm::new();
    a.mov_dx(COM1).mov_rbx(vmm::arch::layout::VIRTIO_MMIO_START);
    // Magic value ("virt"), one byte at a time, then the version and device id as digits.
    a.mov_eax_at_rbx(0);
    for _ in 0..4 {
        a.out_dx_al().shr_eax(8);
    }
    a.mov_eax_at_rbx(0x04).and_eax(0xff).add_al(b'0').out_dx_al();
    a.mov_eax_at_rbx(0x08).and_eax(0xff).add_al(b'0').out_dx_al();
    a.i8042_reset();
    let mut cfg = config(&dir, a.code());
    cfg.disks =
        vec![vmm::devices::virtio::block::BlockConfig { path: disk, read_only: true, id: None }];
    let outcome = run(&cfg).expect("tiny guest runs");
    assert_eq!(outcome.exit, GuestExit::Reset);
    assert_eq!(console(&dir), "virt22", "magic, version 2, device id 2 (block)");
}

/// A KVM VM assembled from the VMM's parts, with `code` loaded at the entry point.
fn bare_vm(code: &[u8]) -> (vmm::kvm_vm::KvmVm, vmm::memory::GuestRam) {
    require_kvm();
    let vm = vmm::kvm_vm::KvmVm::new().expect("KVM VM");
    let mem = vmm::memory::create_guest_memory(&[(GuestAddress(0), 8 << 20)]).unwrap();
    vm.register_memory(&mem).unwrap();
    vmm::arch::regs::write_boot_structures(&mem).unwrap();
    mem.write_slice(code, GuestAddress(LOAD_ADDR)).unwrap();
    (vm, mem)
}

/// Run vCPU 0 of `vm` until the guest pulses the i8042 reset line.
fn run_until_reset(vm: &vmm::kvm_vm::KvmVm, mmio: vmm::devices::bus::Bus) {
    let stop = Arc::new(AtomicBool::new(false));
    let reset_evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut pio = vmm::devices::bus::Bus::new();
    pio.insert(
        0x60,
        5,
        Arc::new(Mutex::new(vmm::devices::legacy::I8042::new(stop.clone(), reset_evt))),
    )
    .unwrap();
    let mut vcpu = vmm::vcpu::Vcpu::new(vm, 0, Arc::new(pio), Arc::new(mmio)).unwrap();
    vcpu.configure(vm, GuestAddress(LOAD_ADDR), 1).unwrap();
    let gate = vmm::vcpu::PauseGate::default();
    assert_eq!(vcpu.run(&stop, &gate), vmm::vcpu::VcpuStop::Stopped);
}

#[derive(Default)]
struct MmioLog(Vec<(u64, Vec<u8>)>);

impl vmm::devices::bus::BusDevice for MmioLog {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.copy_from_slice(&0x7472_6976u32.to_le_bytes()[..data.len()]);
        self.0.push((offset, vec![]));
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.push((offset, data.to_vec()));
    }
}

#[test]
fn mmio_exits_reach_the_bus_and_ioeventfd_short_circuits_them() {
    const DEV: u64 = 0xd000_1000;
    let mut a = Asm::new();
    a.mov_rbx(DEV).mov_eax_at_rbx(0); // read: an exit to the bus
    a.mov_at_rbx_dword(0x50, 0); // matches the ioeventfd: no exit
    a.mov_at_rbx_dword(0x50, 1); // does not match: an exit to the bus
    a.mov_dx(COM1).out_dx_al().i8042_reset();
    let (vm, _mem) = bare_vm(a.code());
    let notify = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_mmio_ioevent(&notify, DEV + 0x50, 0).unwrap();

    let log = Arc::new(Mutex::new(MmioLog::default()));
    let mut mmio = vmm::devices::bus::Bus::new();
    mmio.insert(DEV, 0x1000, log.clone()).unwrap();
    run_until_reset(&vm, mmio);

    assert_eq!(notify.read().unwrap(), 1, "the matching write signalled the ioeventfd");
    assert_eq!(log.lock().unwrap().0, vec![(0, vec![]), (0x50, 1u32.to_le_bytes().to_vec())]);
}

#[test]
fn irqfd_raises_the_interrupt_line() {
    let mut a = Asm::new();
    a.i8042_reset();
    let (vm, _mem) = bare_vm(a.code());
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&irq, 4).unwrap();
    irq.write(1).unwrap();

    // KVM may inject from a workqueue: give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let irr = loop {
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        vm.fd().get_irqchip(&mut chip).unwrap();
        // SAFETY: chip_id selects the PIC member of the union, which KVM filled in.
        let irr = unsafe { chip.chip.pic.irr };
        if irr & (1 << 4) != 0 || std::time::Instant::now() > deadline {
            break irr;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert_ne!(irr & (1 << 4), 0, "IRQ 4 is pending in the PIC: {irr:#x}");
}

/// Where [`wait_for_flag_program`]'s guest waits for a word other than zero.
const FLAG_AT: u64 = 0x40_0000;

/// A guest that prints "ready", waits for the word at [`FLAG_AT`] (pointed to by `rbx`) to be
/// set, and then prints "done" through the port its `dx` still holds.
fn wait_for_flag_program() -> Vec<u8> {
    let mut a = Asm::new();
    a.mov_dx(COM1).print(b"ready\n").mov_rbx(FLAG_AT);
    let top = a.here();
    a.mov_eax_at_rbx(0).cmp_eax(0);
    let set = a.jnz();
    a.jmp_back(top).bind(set);
    a.print(b"done\n").i8042_reset();
    a.code().to_vec()
}

/// A running guest saved to a snapshot (two vCPUs: one waiting in a loop, one waiting for its
/// startup IPI) goes on in a VM restored from it, from the saved memory (where the test sets
/// the flag it waits for), with its registers (the flag's address in `rbx`, the port in `dx`)
/// and the serial port's: it does not start over. The memory file is sparse, and a VM of
/// another size is refused.
#[test]
fn a_saved_guest_goes_on_where_it_was_in_a_new_vm() {
    require_kvm();
    let dir = TempDir::new("snapshot");
    let mut cfg = config(&dir, &wait_for_flag_program());
    cfg.vcpus = 2;
    let vm = MicroVm::new(&cfg).unwrap();
    let snapshot = vm.snapshot_handle().unwrap();
    let stop = vm.stop_event().unwrap();
    let runner = std::thread::spawn(move || vm.run());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while console(&dir) != "ready\n" {
        assert!(std::time::Instant::now() < deadline, "console: {}", console(&dir));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let saved = dir.path().join("saved");
    std::fs::create_dir(&saved).unwrap();
    snapshot.take(&saved).expect("the running guest is saved");
    stop.write(1).unwrap();
    let outcome = runner.join().unwrap().expect("a stopped VM is a clean end");
    assert_eq!(outcome.exit, GuestExit::Stopped);
    assert_eq!(console(&dir), "ready\n");

    let memory_file = saved.join(vmm::snapshot::MEMORY_FILE);
    let memory = std::fs::metadata(&memory_file).unwrap();
    assert_eq!(memory.len(), 32 << 20, "the file holds all of guest memory");
    use std::os::unix::fs::{FileExt, MetadataExt};
    assert!(memory.blocks() * 512 < 1 << 20, "but only the pages written: {}", memory.blocks());
    let file = std::fs::OpenOptions::new().write(true).open(&memory_file).unwrap();
    file.write_all_at(&1u32.to_le_bytes(), FLAG_AT).unwrap();

    let mut restored = cfg.clone();
    restored.console.output = ConsoleOutput::File(dir.path().join("console.restored"));
    let vm = MicroVm::restore(&restored, &saved).expect("restored");
    let stop = vm.stop_event().unwrap();
    let runner = std::thread::spawn(move || vm.run());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !runner.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    stop.write(1).unwrap();
    let outcome = runner.join().unwrap().expect("a clean end");
    let text = std::fs::read_to_string(dir.path().join("console.restored")).unwrap();
    assert_eq!(outcome.exit, GuestExit::Reset, "console: {text:?}");
    assert_eq!(text, "done\n", "it went on from the saved loop, through the saved port");

    restored.mem_mib = 64;
    let err = MicroVm::restore(&restored, &saved).err().expect("another memory size");
    assert!(err.to_string().contains("does not fit the VM"), "{err}");
}
