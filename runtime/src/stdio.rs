//! A process's stdio between the host and the guest: the host descriptors the caller handed to
//! husk (or a terminal) on one side, the agent's stdio streams (one vsock connection each) on
//! the other, copied by one thread per direction, EOF passed on both ways.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use husk_agent_protocol::hybrid_vsock;
use husk_agent_protocol::stream::{StreamHeader, StreamKind};

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error(transparent)]
    Open(#[from] hybrid_vsock::OpenStreamError),
    #[error("duplicating a host descriptor: {0}")]
    Dup(std::io::Error),
}

/// Open the `kind` stream of process `exec` (empty: the container's own) of `container`.
pub fn open_stream(
    vsock: &Path,
    container: &str,
    exec: &str,
    kind: StreamKind,
) -> Result<UnixStream, StdioError> {
    let header = StreamHeader { container_id: container.into(), exec_id: exec.into(), kind };
    Ok(hybrid_vsock::open_stream(vsock, &header)?)
}

/// A copy of a host descriptor as a file (the original stays open for its owner).
pub fn dup(fd: BorrowedFd<'_>) -> Result<File, StdioError> {
    let owned: OwnedFd = fd.try_clone_to_owned().map_err(StdioError::Dup)?;
    Ok(File::from(owned))
}

/// Copy `from` to `to` until EOF or an error on either side.
fn copy(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Host input to a guest stream. At the input's EOF the stream's write side is shut down, which
/// the guest process reads as EOF. The thread may stay blocked on an input that never ends.
pub fn host_to_guest(
    mut input: impl Read + Send + 'static,
    mut stream: UnixStream,
) -> JoinHandle<()> {
    crate::threads::spawn("stdin", move || {
        copy(&mut input, &mut stream);
        let _ = stream.shutdown(Shutdown::Write);
    })
}

/// What a process's output copies have been doing: whether one is writing to the host now (a
/// slow reader holds it there) and how many bytes they moved so far. Tells an output that is
/// still being taken apart from one that stopped.
#[derive(Debug, Default)]
pub struct OutputActivity {
    writing: AtomicUsize,
    moved: AtomicU64,
}

impl OutputActivity {
    /// A copy is blocked on host output now, or bytes moved since `moved_before` (an earlier
    /// [`Self::moved`]).
    pub fn busy_since(&self, moved_before: u64) -> bool {
        self.writing.load(Ordering::SeqCst) > 0 || self.moved() != moved_before
    }

    /// Bytes written to host outputs so far.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::SeqCst)
    }
}

/// Host output that reports its writes to an [`OutputActivity`].
struct Tracked<W> {
    inner: W,
    activity: Arc<OutputActivity>,
}

impl<W: Write> Write for Tracked<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.activity.writing.fetch_add(1, Ordering::SeqCst);
        let written = self.inner.write(buf);
        if let Ok(n) = written {
            self.activity.moved.fetch_add(n as u64, Ordering::SeqCst);
        }
        self.activity.writing.fetch_sub(1, Ordering::SeqCst);
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A guest stream to host output, until the guest ends the stream (the last byte is then
/// written) or the host output fails (the stream is then closed, so the guest process sees a
/// broken pipe as it would on a host). The copy reports to `activity`.
pub fn guest_to_host(
    mut stream: UnixStream,
    output: impl Write + Send + 'static,
    activity: &Arc<OutputActivity>,
) -> JoinHandle<()> {
    let mut output = Tracked { inner: output, activity: activity.clone() };
    crate::threads::spawn("output", move || {
        copy(&mut stream, &mut output);
        let _ = output.flush();
    })
}

/// The three non-terminal streams of a process attached to three host descriptors; the
/// returned threads end once the process's stdout and stderr have reached EOF.
pub fn attach_pipes(
    vsock: &Path,
    container: &str,
    exec: &str,
    fds: [BorrowedFd<'_>; 3],
    activity: &Arc<OutputActivity>,
) -> Result<Vec<JoinHandle<()>>, StdioError> {
    let stdin = open_stream(vsock, container, exec, StreamKind::Stdin)?;
    let stdout = open_stream(vsock, container, exec, StreamKind::Stdout)?;
    let stderr = open_stream(vsock, container, exec, StreamKind::Stderr)?;
    host_to_guest(dup(fds[0])?, stdin);
    Ok(vec![
        guest_to_host(stdout, dup(fds[1])?, activity),
        guest_to_host(stderr, dup(fds[2])?, activity),
    ])
}

/// The standard descriptors of this process.
pub fn std_fds() -> [BorrowedFd<'static>; 3] {
    // SAFETY: descriptors 0, 1 and 2 belong to the process for its whole life; husk never
    // closes them.
    unsafe { [BorrowedFd::borrow_raw(0), BorrowedFd::borrow_raw(1), BorrowedFd::borrow_raw(2)] }
}

/// Point descriptors 0, 1 and 2 at /dev/null.
pub fn release_std_fds() -> std::io::Result<()> {
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto a standard descriptor; `null` stays open for the call.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// `activity.moved()` once it has stopped changing.
    fn settled(activity: &OutputActivity) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = activity.moved();
            std::thread::sleep(Duration::from_millis(100));
            if activity.moved() == before && before > 0 {
                return before;
            }
            assert!(Instant::now() < deadline, "the copy never settled");
        }
    }

    #[test]
    fn output_held_back_by_a_slow_reader_is_busy_and_a_quiet_stream_is_not() {
        let activity = Arc::new(OutputActivity::default());
        let (stream, mut guest) = UnixStream::pair().unwrap();
        let (output, mut reader) = UnixStream::pair().unwrap();
        let copier = guest_to_host(stream, output, &activity);
        std::thread::sleep(Duration::from_millis(100));
        assert!(!activity.busy_since(0), "nothing arrived, nothing is written");

        // Far more than the sockets buffer: the copy ends up blocked on the unread output.
        let data = vec![7u8; 8 << 20];
        let sender = std::thread::spawn(move || {
            guest.write_all(&data).unwrap();
        });
        let moved = settled(&activity);
        assert!(moved < 8 << 20, "all of it went through an unread socket");
        assert!(activity.busy_since(moved), "a copy blocked on its reader is busy");

        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        while got < 8 << 20 {
            got += reader.read(&mut buf).unwrap();
        }
        sender.join().unwrap();
        copier.join().unwrap();
        assert_eq!(activity.moved(), 8 << 20);
        assert!(!activity.busy_since(8 << 20), "a finished copy is not busy");
    }
}
