//! The agent's log: env_logger's lines on stderr (the console, as PID 1) and, with `--log-to`
//! (`HUSK_AGENT_LOG_TO=vsock:PORT` on the kernel command line), a copy of the lines sent to a
//! socket: for `vsock:PORT` a connection to the host's (CID 2) vsock port PORT, which husk's
//! VMM hands to the host's Unix socket `<vsock uds>_PORT`.
//!
//! The two have their own filters: the console shows warnings and errors, the copy the
//! agent's info lines too (`HUSK_AGENT_LOG`, when set, is the filter of both). A serial console
//! costs the guest a VM exit or two per byte, and the info lines (a container created, started,
//! each exec, ...) made most of its bytes: 1388 against 173 for a container with seven execs.
//!
//! The copy must never hurt the agent, so a logging call only offers the line to a bounded
//! queue and never waits: a writer thread connects and sends what is queued. When the reader
//! is slow and the queue is full, lines are lost for the copy, and the writer tells the reader
//! how many once it has caught up. When the connection cannot be made or breaks, the copy ends
//! for good (no reconnecting) and the console alone goes on.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};

use crate::listen::Addr;
use crate::sync::lock;

/// How many lines may wait for a slow reader before new ones are dropped.
const QUEUE_LINES: usize = 1024;

/// Where the log goes besides stderr.
#[derive(Default)]
struct LogCopy {
    /// The writer thread's queue, while there is a copy.
    queue: Mutex<Option<SyncSender<Vec<u8>>>>,
    /// Lines dropped since the writer last reported them.
    dropped: AtomicU64,
}

/// The console's filter unless `HUSK_AGENT_LOG` gives one.
const CONSOLE_FILTER: &str = "warn";
/// The copy's filter unless `HUSK_AGENT_LOG` gives one: the agent's info lines, and ttrpc's
/// warnings only (its info lines say that its server started).
const COPY_FILTER: &str = "info,ttrpc=warn";

/// Install the logger (filters from `HUSK_AGENT_LOG`, else [`CONSOLE_FILTER`] and
/// [`COPY_FILTER`]); the returned handle starts the copy once the agent knows where it goes.
pub fn init() -> Log {
    let copy = Arc::new(LogCopy::default());
    let given = std::env::var("HUSK_AGENT_LOG").ok().filter(|f| !f.is_empty());
    let console = logger(given.as_deref().unwrap_or(CONSOLE_FILTER), Box::new(io::stderr()));
    let to_copy = logger(
        given.as_deref().unwrap_or(COPY_FILTER),
        Box::new(CopyWriter { copy: copy.clone() }),
    );
    let max_level = console.filter().max(to_copy.filter());
    // Only fails when a logger is already installed, which only `init` does, once.
    if log::set_boxed_logger(Box::new(Split { console, to_copy, copy: copy.clone() })).is_ok() {
        log::set_max_level(max_level);
    }
    Log { copy }
}

/// One of the two loggers: env_logger's lines (millisecond timestamps, no terminal colours)
/// through `filter` to `out`.
fn logger(filter: &str, out: Box<dyn Write + Send>) -> env_logger::Logger {
    env_logger::Builder::new()
        .parse_filters(filter)
        .format_timestamp_millis()
        .write_style(env_logger::WriteStyle::Never)
        .target(env_logger::Target::Pipe(out))
        .build()
}

/// The installed logger: each record to the console and, while there is a copy, to the copy,
/// through each one's filter.
struct Split {
    console: env_logger::Logger,
    to_copy: env_logger::Logger,
    copy: Arc<LogCopy>,
}

impl log::Log for Split {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.console.enabled(metadata) || self.to_copy.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        self.console.log(record);
        let copying = lock(&self.copy.queue).is_some();
        if copying {
            self.to_copy.log(record);
        }
    }

    fn flush(&self) {
        self.console.flush();
    }
}

/// The installed logger's copy.
pub struct Log {
    copy: Arc<LogCopy>,
}

impl Log {
    /// Also send each log line from now on to `addr` (see the module docs). Connecting happens
    /// in the writer thread, so this never waits for the peer.
    pub fn copy_to(&self, addr: Addr) -> io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
        let copy = self.copy.clone();
        std::thread::Builder::new()
            .name("log-copy".into())
            .spawn(move || write_copies(&addr, rx, &copy))?;
        *lock(&self.copy.queue) = Some(tx);
        Ok(())
    }
}

/// The writer thread: connect, then send the queued lines until the connection breaks.
fn write_copies(addr: &Addr, rx: Receiver<Vec<u8>>, copy: &LogCopy) {
    let result = addr.connect().and_then(|mut conn| send_lines(&mut conn, &rx, copy));
    // Closing the queue first ends the copy (the next line finds it closed), so that this
    // warning goes to the console only.
    drop(rx);
    if let Err(e) = result {
        log::warn!("log copy to {addr}: {e}; logging on the console only");
    }
}

fn send_lines(conn: &mut impl Write, rx: &Receiver<Vec<u8>>, copy: &LogCopy) -> io::Result<()> {
    loop {
        let line = match rx.try_recv() {
            Ok(line) => line,
            Err(TryRecvError::Empty) => {
                // Caught up: now is where the dropped lines were missed.
                let lost = copy.dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let note = format!("husk-agent: {lost} log lines lost (the reader was slow)\n");
                    conn.write_all(note.as_bytes())?;
                }
                match rx.recv() {
                    Ok(line) => line,
                    // The logger is gone (only in tests: the agent's lives as long as it).
                    Err(mpsc::RecvError) => return Ok(()),
                }
            }
            Err(TryRecvError::Disconnected) => return Ok(()),
        };
        conn.write_all(&line)?;
    }
}

/// The copy's env_logger target: each record, whole, offered to the copy's queue.
struct CopyWriter {
    copy: Arc<LogCopy>,
}

impl Write for CopyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut queue = lock(&self.copy.queue);
        if let Some(tx) = queue.as_ref() {
            match tx.try_send(buf.to_vec()) {
                Ok(()) => {}
                // A slow reader: this line is lost for the copy rather than the agent waiting.
                Err(TrySendError::Full(_)) => {
                    self.copy.dropped.fetch_add(1, Ordering::Relaxed);
                }
                // The writer gave up (see write_copies).
                Err(TrySendError::Disconnected(_)) => *queue = None,
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Log as _;
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::{Duration, Instant};

    use husk_tests::tiny_guest::TempDir;

    /// A copy with its writer connected to the returned Unix socket's peer.
    fn copy_to_socket(dir: &TempDir) -> (Arc<LogCopy>, CopyWriter, UnixStream) {
        let path = dir.path().join("log.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let log = Log { copy: Arc::new(LogCopy::default()) };
        log.copy_to(Addr::Unix(path)).unwrap();
        let (peer, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (log.copy.clone(), CopyWriter { copy: log.copy.clone() }, peer)
    }

    /// A console that keeps what it is given.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>);

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn info_lines_go_to_the_copy_and_warnings_to_both() {
        let dir = TempDir::new("agent-logging");
        let (copy, writer, peer) = copy_to_socket(&dir);
        let console = Kept::default();
        let split = Split {
            console: logger(CONSOLE_FILTER, Box::new(console.clone())),
            to_copy: logger(COPY_FILTER, Box::new(writer)),
            copy,
        };
        let mut record = log::Record::builder();
        record.target("husk_agent");
        split
            .log(&record.level(log::Level::Info).args(format_args!("container c created")).build());
        split.log(&record.level(log::Level::Warn).args(format_args!("something odd")).build());
        let mut lines = BufReader::new(peer).lines();
        assert!(lines.next().unwrap().unwrap().ends_with("INFO  husk_agent] container c created"));
        assert!(lines.next().unwrap().unwrap().ends_with("WARN  husk_agent] something odd"));
        let console = String::from_utf8(lock(&console.0).clone()).unwrap();
        assert!(console.ends_with("WARN  husk_agent] something odd\n"), "{console:?}");
        assert_eq!(console.lines().count(), 1, "{console:?}");
    }

    #[test]
    fn lines_reach_the_copy_in_order() {
        let dir = TempDir::new("agent-logging");
        let (_copy, mut writer, peer) = copy_to_socket(&dir);
        for i in 0..100 {
            writer.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        let mut lines = BufReader::new(peer).lines();
        for i in 0..100 {
            assert_eq!(lines.next().unwrap().unwrap(), format!("line {i}"));
        }
    }

    #[test]
    fn a_stuck_reader_costs_lines_not_time_and_hears_how_many() {
        let dir = TempDir::new("agent-logging");
        let (copy, mut writer, mut peer) = copy_to_socket(&dir);
        // Nobody reads: the socket buffer and then the queue fill up, and the rest is dropped.
        let line = format!("{}\n", "x".repeat(1000));
        let start = Instant::now();
        let n = 20_000;
        for _ in 0..n {
            writer.write_all(line.as_bytes()).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "logging waited for the reader");
        let dropped = copy.dropped.load(Ordering::Relaxed);
        assert!(dropped > 0, "nothing was dropped: the buffers cannot hold {n} lines");
        // The reader catches up: what was sent, then the note of how many were lost.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let note = format!("husk-agent: {dropped} log lines lost (the reader was slow)\n");
        while !got.ends_with(note.as_bytes()) {
            let k = peer.read(&mut buf).unwrap();
            assert!(k > 0, "EOF before the note");
            got.extend_from_slice(&buf[..k]);
        }
        let sent = (got.len() - note.len()) / line.len();
        assert_eq!(sent as u64 + dropped, n, "every line either sent or counted as lost");
    }

    #[test]
    fn a_broken_connection_ends_the_copy_and_logging_goes_on() {
        let dir = TempDir::new("agent-logging");
        let (copy, mut writer, peer) = copy_to_socket(&dir);
        drop(peer);
        let deadline = Instant::now() + Duration::from_secs(10);
        // The writer fails on a write and closes the queue; the next line finds it closed.
        while lock(&copy.queue).is_some() {
            assert!(Instant::now() < deadline, "the copy was never dropped");
            writer.write_all(b"after the reader left\n").unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        writer.write_all(b"still logging\n").unwrap();
    }

    #[test]
    fn no_listener_ends_the_copy() {
        let dir = TempDir::new("agent-logging");
        let log = Log { copy: Arc::new(LogCopy::default()) };
        log.copy_to(Addr::Unix(dir.path().join("nobody"))).unwrap();
        let mut writer = CopyWriter { copy: log.copy.clone() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&log.copy.queue).is_some() {
            assert!(Instant::now() < deadline, "the copy was never dropped");
            writer.write_all(b"nobody listens\n").unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
