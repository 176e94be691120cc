//! COM1: a vm-superio 16550A UART at 0x3f8 whose output goes to the console sink (stdout or a
//! file) and whose input comes, when asked, from a host file descriptor (stdin), fed into the
//! UART's FIFO from the event loop with back-pressure: bytes the FIFO cannot take wait until the
//! guest has drained it. Input that epoll cannot watch (a regular file, /dev/null) is always
//! readable, so it is read directly, one chunk each time the guest drains the FIFO.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::trigger::EventFdTrigger;
use crate::devices::bus::BusDevice;

/// Raised by the UART when the guest has emptied its receive FIFO.
pub struct InputEvents {
    fifo_drained: EventFd,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.fifo_drained.write(1) {
            log::error!("serial: cannot signal drained input FIFO: {e}");
        }
    }
}

/// vm-superio's `SerialState` (which has no serde) as a snapshot stores it: a field of type
/// `SerialState` takes `#[serde(with = "SerialSnapshot")]`.
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
pub struct SerialSnapshot {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The UART on the port-I/O bus.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, InputEvents, Box<dyn Write + Send>>,
    output_failed: bool,
}

impl SerialConsole {
    /// A UART raising `irq` and writing what the guest prints to `out`; `fifo_drained` is
    /// written whenever the guest empties the receive FIFO.
    pub fn new(irq: EventFdTrigger, fifo_drained: EventFd, out: Box<dyn Write + Send>) -> Self {
        let uart = Serial::with_events(irq, InputEvents { fifo_drained }, out);
        SerialConsole { uart, output_failed: false }
    }

    /// [`SerialConsole::new`] with the registers and receive FIFO of a snapshot; raises the
    /// interrupt the saved state has pending.
    pub fn restored(
        irq: EventFdTrigger,
        fifo_drained: EventFd,
        out: Box<dyn Write + Send>,
        saved: &SerialState,
    ) -> std::io::Result<Self> {
        let uart = Serial::from_state(saved, irq, InputEvents { fifo_drained }, out)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        Ok(SerialConsole { uart, output_failed: false })
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn snapshot(&self) -> SerialState {
        self.uart.state()
    }

    /// Queue host input for the guest; returns how many bytes the FIFO took.
    fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or_else(|e| {
            log::error!("serial input: {e}");
            0
        })
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] => *byte = self.uart.read(offset as u8),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else { return };
        if let Err(e) = self.uart.write(offset as u8, *byte) {
            // A console that went away (closed pipe, full disk) must not stop the guest; say it
            // once.
            if !self.output_failed {
                log::warn!("serial console output: {e}");
                self.output_failed = true;
            }
        }
    }
}

/// Feeds host input into the UART from the event loop.
pub struct SerialInput {
    console: Arc<Mutex<SerialConsole>>,
    input: File,
    fifo_drained: EventFd,
    pending: VecDeque<u8>,
    input_registered: bool,
    /// Input epoll refuses (always readable): read on every drained FIFO instead.
    unpollable: bool,
    eof: bool,
}

const INPUT_CHUNK: usize = 64;

impl SerialInput {
    /// Forward `input` into `console`; `fifo_drained` must be the event given to the console.
    pub fn new(console: Arc<Mutex<SerialConsole>>, input: File, fifo_drained: EventFd) -> Self {
        SerialInput {
            console,
            input,
            fifo_drained,
            pending: VecDeque::new(),
            input_registered: false,
            unpollable: false,
            eof: false,
        }
    }

    /// Move pending bytes into the FIFO; returns whether all went.
    fn flush_pending(&mut self) -> bool {
        let mut console = self.console.lock().unwrap_or_else(|e| e.into_inner());
        let (front, _) = self.pending.as_slices();
        let taken = console.enqueue_input(front);
        self.pending.drain(..taken);
        if self.pending.is_empty() {
            return true;
        }
        let (front, _) = self.pending.as_slices();
        let taken = console.enqueue_input(front);
        self.pending.drain(..taken);
        self.pending.is_empty()
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; INPUT_CHUNK];
        match self.input.read(&mut buf) {
            Ok(0) => {
                self.eof = true;
                self.stop_reading(ops);
            }
            Ok(n) => {
                self.pending.extend(&buf[..n]);
                if !self.flush_pending() {
                    // Wait for the guest to drain the FIFO before reading more.
                    self.stop_reading(ops);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("serial input: {e}");
                self.eof = true;
                self.stop_reading(ops);
            }
        }
    }

    fn stop_reading(&mut self, ops: &mut EventOps) {
        if self.input_registered {
            let _ = ops.remove(Events::new(&self.input, EventSet::IN));
            self.input_registered = false;
        }
    }

    fn start_reading(&mut self, ops: &mut EventOps) {
        if self.eof {
            return;
        }
        if self.unpollable {
            self.read_input(ops);
            return;
        }
        if self.input_registered {
            return;
        }
        match ops.add(Events::new(&self.input, EventSet::IN)) {
            Ok(()) => self.input_registered = true,
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EPERM => {
                self.unpollable = true;
                self.read_input(ops);
            }
            Err(e) => log::warn!("serial input cannot be watched, ignoring it: {e:?}"),
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fifo_drained, EventSet::IN)) {
            log::error!("serial: cannot watch the input FIFO: {e:?}");
        }
        self.start_reading(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.fifo_drained.as_raw_fd() {
            let _ = self.fifo_drained.read();
            if self.flush_pending() {
                self.start_reading(ops);
            }
        } else if events.fd() == self.input.as_raw_fd() {
            if events.event_set().contains(EventSet::IN) {
                self.read_input(ops);
            } else {
                // Hang-up or error without data.
                self.stop_reading(ops);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::SubscriberOps;
    use std::os::unix::net::UnixStream;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console(out: SharedBuf) -> (Arc<Mutex<SerialConsole>>, EventFd, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let c = SerialConsole::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            drained.try_clone().unwrap(),
            Box::new(out),
        );
        (Arc::new(Mutex::new(c)), irq, drained)
    }

    #[test]
    fn guest_output_reaches_the_sink() {
        let out = SharedBuf::default();
        let (c, _, _) = console(out.clone());
        for b in b"hello" {
            c.lock().unwrap().write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello");
    }

    /// Let the event loop run while a "guest" drains the FIFO, until `want` bytes arrived.
    fn drain_guest_fifo(
        em: &mut event_manager::EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
        c: &Arc<Mutex<SerialConsole>>,
        want: usize,
    ) -> Vec<u8> {
        let mut received = Vec::new();
        for _ in 0..100 {
            em.run_with_timeout(50).unwrap();
            // The guest drains the FIFO: read RBR while LSR says data ready.
            let mut uart = c.lock().unwrap();
            let mut lsr = [0u8];
            loop {
                uart.read(5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    break;
                }
                let mut byte = [0u8];
                uart.read(0, &mut byte);
                received.push(byte[0]);
            }
            if received.len() >= want {
                break;
            }
        }
        received
    }

    #[test]
    fn regular_file_input_is_read_without_epoll() {
        let (c, _irq, drained) = console(SharedBuf::default());
        let path = std::env::temp_dir().join(format!("husk-serial-input-{}", std::process::id()));
        let sent: Vec<u8> = (0..150u32).map(|i| (i * 7 % 256) as u8).collect();
        std::fs::write(&path, &sent).unwrap();
        let input = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let sub = Arc::new(Mutex::new(SerialInput::new(c.clone(), input, drained)));
        let mut em =
            event_manager::EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                .unwrap();
        em.add_subscriber(sub);
        assert_eq!(drain_guest_fifo(&mut em, &c, sent.len()), sent);
    }

    #[test]
    fn host_input_is_delivered_with_back_pressure() {
        let (c, _irq, drained) = console(SharedBuf::default());
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        guest_side.set_nonblocking(true).unwrap();
        let input = File::from(std::os::fd::OwnedFd::from(guest_side));
        let sub = Arc::new(Mutex::new(SerialInput::new(c.clone(), input, drained)));
        let mut em =
            event_manager::EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                .unwrap();
        em.add_subscriber(sub);

        // More than the 64-byte FIFO holds.
        let sent: Vec<u8> = (0..200u32).map(|i| (i % 251) as u8).collect();
        host.write_all(&sent).unwrap();
        drop(host);

        assert_eq!(drain_guest_fifo(&mut em, &c, sent.len()), sent);
    }
}
