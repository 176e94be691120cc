//! The agent's log: env_logger's lines on stderr (the console, as PID 1) and, with `--log-to`
//! (`HUSK_AGENT_LOG_TO=vsock:PORT` on the kernel command line), a copy of each line sent to a
//! socket: for `vsock:PORT` a connection to the host's (CID 2) vsock port PORT, which husk's
//! VMM hands to the host's Unix socket `<vsock uds>_PORT`.
//!
//! The copy must never hurt the agent, so a logging call only offers the line to a bounded
//! queue and never waits: a writer thread connects and sends what is queued. When the reader
//! is slow and the queue is full, lines are lost for the copy (the console still has them), and
//! the writer tells the reader how many once it has caught up. When the connection cannot be
//! made or breaks, the copy ends for good (no reconnecting) and the console alone goes on.

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

/// The log filter unless `HUSK_AGENT_LOG` gives one: the agent's info lines, and ttrpc's
/// warnings only (its info lines say that its server started, on a serial console that the
/// guest's boot waits on, one VM exit per byte).
const DEFAULT_FILTER: &str = "info,ttrpc=warn";

/// Install the logger (filter from `HUSK_AGENT_LOG`, default [`DEFAULT_FILTER`]); the returned
/// handle starts the copy once the agent knows where it goes.
pub fn init() -> Log {
    let copy = Arc::new(LogCopy::default());
    env_logger::Builder::from_env(
        env_logger::Env::new().filter_or("HUSK_AGENT_LOG", DEFAULT_FILTER),
    )
    .format_timestamp_millis()
    // The same bytes go to the console and the copy: no terminal colours in the copy.
    .write_style(env_logger::WriteStyle::Never)
    .target(env_logger::Target::Pipe(Box::new(Tee {
        console: Box::new(io::stderr()),
        copy: copy.clone(),
    })))
    .init();
    Log { copy }
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

/// env_logger's target: each record, whole, to the console (stderr) and offered to the copy.
struct Tee {
    console: Box<dyn Write + Send>,
    copy: Arc<LogCopy>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.console.write_all(buf);
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
        written.map(|()| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.console.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::{Duration, Instant};

    use husk_tests::tiny_guest::TempDir;

    /// A copy with its writer connected to the returned Unix socket's peer.
    fn copy_to_socket(dir: &TempDir) -> (Arc<LogCopy>, Tee, UnixStream) {
        let path = dir.path().join("log.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let log = Log { copy: Arc::new(LogCopy::default()) };
        log.copy_to(Addr::Unix(path)).unwrap();
        let (peer, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (log.copy.clone(), tee(&log), peer)
    }

    /// A Tee like the logger's, with no console.
    fn tee(log: &Log) -> Tee {
        Tee { console: Box::new(io::sink()), copy: log.copy.clone() }
    }

    #[test]
    fn lines_reach_the_copy_in_order() {
        let dir = TempDir::new("agent-logging");
        let (_copy, mut tee, peer) = copy_to_socket(&dir);
        for i in 0..100 {
            tee.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        let mut lines = BufReader::new(peer).lines();
        for i in 0..100 {
            assert_eq!(lines.next().unwrap().unwrap(), format!("line {i}"));
        }
    }

    #[test]
    fn a_stuck_reader_costs_lines_not_time_and_hears_how_many() {
        let dir = TempDir::new("agent-logging");
        let (copy, mut tee, mut peer) = copy_to_socket(&dir);
        // Nobody reads: the socket buffer and then the queue fill up, and the rest is dropped.
        let line = format!("{}\n", "x".repeat(1000));
        let start = Instant::now();
        let n = 20_000;
        for _ in 0..n {
            tee.write_all(line.as_bytes()).unwrap();
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
        let (copy, mut tee, peer) = copy_to_socket(&dir);
        drop(peer);
        let deadline = Instant::now() + Duration::from_secs(10);
        // The writer fails on a write and closes the queue; the next line finds it closed.
        while lock(&copy.queue).is_some() {
            assert!(Instant::now() < deadline, "the copy was never dropped");
            tee.write_all(b"after the reader left\n").unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        tee.write_all(b"still logging\n").unwrap();
    }

    #[test]
    fn no_listener_ends_the_copy() {
        let dir = TempDir::new("agent-logging");
        let log = Log { copy: Arc::new(LogCopy::default()) };
        log.copy_to(Addr::Unix(dir.path().join("nobody"))).unwrap();
        let mut tee = tee(&log);
        let deadline = Instant::now() + Duration::from_secs(10);
        while lock(&log.copy.queue).is_some() {
            assert!(Instant::now() < deadline, "the copy was never dropped");
            tee.write_all(b"nobody listens\n").unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
