//! Tests of the virtio-mmio transport against a dummy device.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::device::{ActivateError, Interrupt, VirtioDevice};
use crate::devices::virtio::test_utils::*;

struct Dummy {
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    acked: u64,
    config: [u8; 8],
    activations: usize,
    resets: usize,
    fail_activation: bool,
}

impl Dummy {
    fn new() -> Self {
        Dummy {
            queues: vec![Queue::new(16).unwrap(), Queue::new(16).unwrap()],
            queue_evts: (0..2).map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap()).collect(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            acked: 0,
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            activations: 0,
            resets: 0,
            fail_activation: false,
        }
    }
}

const OFFERED: u64 = (1 << 32) | 0b101;

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn avail_features(&self) -> u64 {
        OFFERED
    }
    fn acked_features(&self) -> u64 {
        self.acked
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn queues(&self) -> &[Queue] {
        &self.queues
    }
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }
    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::device::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = self.config.get_mut(offset as usize) {
            *b = data[0];
        }
    }
    fn activate(&mut self, _mem: GuestMemoryMmap) -> Result<(), ActivateError> {
        if self.fail_activation {
            return Err(ActivateError::Device("refused".into()));
        }
        self.activations += 1;
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.activations > 0
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.activations = 0;
        self.acked = 0;
        self.queues.iter_mut().for_each(|q| q.reset());
    }
}

fn setup() -> (GuestMemoryMmap, Arc<Mutex<Dummy>>, MmioTransport) {
    let mem = guest_memory(1 << 20);
    let dummy = Arc::new(Mutex::new(Dummy::new()));
    let transport = MmioTransport::new(mem.clone(), dummy.clone());
    (mem, dummy, transport)
}

#[test]
fn identifies_as_modern_virtio_mmio() {
    let (_, _, mut t) = setup();
    assert_eq!(read_reg(&mut t, 0x00), 0x7472_6976);
    assert_eq!(read_reg(&mut t, 0x04), 2);
    assert_eq!(read_reg(&mut t, 0x08), 42);
    assert_eq!(read_reg(&mut t, 0x34), 16, "QueueNumMax of queue 0");
    write_reg(&mut t, 0x30, 7);
    assert_eq!(read_reg(&mut t, 0x34), 0, "a queue that does not exist reads as size 0");
    write_reg(&mut t, 0x14, 1);
    assert_eq!(read_reg(&mut t, 0x10), 1);
    write_reg(&mut t, 0x14, 0);
    assert_eq!(read_reg(&mut t, 0x10), 0b101);
}

#[test]
fn full_initialisation_activates_the_device() {
    let (mem, dummy, mut t) = setup();
    let q0 = QueueDriver::new(&mem, 0x1000, 16);
    let q1 = QueueDriver::new(&mem, 0x4000, 16);
    let status = activate_through_mmio(&mut t, (1 << 32) | 0b111, &[&q0, &q1]);
    assert_eq!(
        status,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
    let d = dummy.lock().unwrap();
    assert_eq!(d.activations, 1);
    assert_eq!(d.acked, OFFERED, "the unoffered bit 1 is dropped");
    assert!(d.queues[0].ready() && d.queues[1].ready());
    assert_eq!(d.queues[1].desc_table(), 0x4000);
}

#[test]
fn out_of_order_status_is_refused() {
    let (_, dummy, mut t) = setup();
    write_reg(&mut t, 0x70, status::DRIVER_OK);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    write_reg(&mut t, 0x70, status::ACKNOWLEDGE);
    write_reg(&mut t, 0x70, status::ACKNOWLEDGE | status::FEATURES_OK);
    assert_eq!(read_reg(&mut t, 0x70), status::ACKNOWLEDGE);
    write_reg(
        &mut t,
        0x70,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert_eq!(read_reg(&mut t, 0x70), status::ACKNOWLEDGE);
    assert_eq!(dummy.lock().unwrap().activations, 0);
}

#[test]
fn queues_cannot_be_programmed_outside_features_ok() {
    let (_, dummy, mut t) = setup();
    write_reg(&mut t, 0x38, 8);
    write_reg(&mut t, 0x80, 0x1000);
    assert_eq!(dummy.lock().unwrap().queues[0].desc_table(), 0);
    assert_eq!(dummy.lock().unwrap().queues[0].size(), 16);
}

#[test]
fn invalid_queue_sets_needs_reset_instead_of_activating() {
    let (_, dummy, mut t) = setup();
    let fok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write_reg(&mut t, 0x70, status::ACKNOWLEDGE);
    write_reg(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    write_reg(&mut t, 0x70, fok);
    write_reg(&mut t, 0x30, 0);
    // The descriptor table lies far outside the 1 MiB of guest memory.
    write_reg(&mut t, 0x80, 0xfff0_0000);
    write_reg(&mut t, 0x44, 1);
    write_reg(&mut t, 0x70, fok | status::DRIVER_OK);
    let status = read_reg(&mut t, 0x70);
    assert_ne!(status & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(dummy.lock().unwrap().activations, 0);
    assert_ne!(read_reg(&mut t, 0x60) & 2, 0, "config-change interrupt raised");
}

#[test]
fn failed_activation_sets_needs_reset() {
    let (mem, dummy, mut t) = setup();
    dummy.lock().unwrap().fail_activation = true;
    let q = QueueDriver::new(&mem, 0x1000, 16);
    let status = activate_through_mmio(&mut t, 0, &[&q]);
    assert_ne!(status & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn reset_clears_device_and_transport() {
    let (mem, dummy, mut t) = setup();
    let q = QueueDriver::new(&mem, 0x1000, 16);
    activate_through_mmio(&mut t, 0b1, &[&q]);
    dummy.lock().unwrap().interrupt.signal_used_queue().unwrap();
    write_reg(&mut t, 0x70, 0);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    assert_eq!(read_reg(&mut t, 0x60), 0);
    let d = dummy.lock().unwrap();
    assert!(!d.is_activated());
    assert!(!d.queues[0].ready());
}

#[test]
fn notify_register_signals_the_queue_event() {
    let (_, dummy, mut t) = setup();
    write_reg(&mut t, 0x50, 1);
    write_reg(&mut t, 0x50, 9);
    let d = dummy.lock().unwrap();
    assert_eq!(d.queue_evts[1].read().unwrap(), 1);
    assert!(d.queue_evts[0].read().is_err(), "queue 0 was not notified");
}

#[test]
fn interrupt_ack_clears_status_bits() {
    let (_, dummy, mut t) = setup();
    dummy.lock().unwrap().interrupt.signal_used_queue().unwrap();
    assert_eq!(read_reg(&mut t, 0x60), 1);
    write_reg(&mut t, 0x64, 1);
    assert_eq!(read_reg(&mut t, 0x60), 0);
}

#[test]
fn config_space_access_is_bounded_and_gated() {
    let (_, _, mut t) = setup();
    let mut data = [0u8; 4];
    t.read(0x104, &mut data);
    assert_eq!(data, [5, 6, 7, 8]);
    t.read(0x106, &mut data);
    assert_eq!(data, [7, 8, 0, 0]);
    t.read(0xfff, &mut data[..1]);
    assert_eq!(data[0], 0);
    t.write(0x100, &[9]);
    t.read(0x100, &mut data[..1]);
    assert_eq!(data[0], 1, "config is read-only before DRIVER");
    write_reg(&mut t, 0x70, status::ACKNOWLEDGE);
    write_reg(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
    let generation = read_reg(&mut t, 0xfc);
    t.write(0x100, &[9]);
    t.read(0x100, &mut data[..1]);
    assert_eq!(data[0], 9);
    assert_ne!(read_reg(&mut t, 0xfc), generation);
}

#[test]
fn bad_register_accesses_are_ignored() {
    let (_, _, mut t) = setup();
    let mut two = [0xffu8; 2];
    t.read(0x00, &mut two);
    assert_eq!(two, [0, 0]);
    t.write(0x70, &[1, 0]);
    assert_eq!(read_reg(&mut t, 0x70), 0);
    write_reg(&mut t, 0x0e0, 5);
    assert_eq!(read_reg(&mut t, 0x0e0), 0);
    let mut eight = [0u8; 8];
    t.read(0x70, &mut eight);
    t.write(0x72, &[1, 0, 0, 0]);
    assert_eq!(read_reg(&mut t, 0x70), 0);
}
