//! A process's stdio between the host and the guest: the host descriptors the caller handed to
//! husk (or a terminal) on one side, the agent's stdio streams (one vsock connection each) on
//! the other, copied by one thread per direction, EOF passed on both ways.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
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
    std::thread::spawn(move || {
        copy(&mut input, &mut stream);
        let _ = stream.shutdown(Shutdown::Write);
    })
}

/// A guest stream to host output, until the guest ends the stream (the last byte is then
/// written) or the host output fails (the stream is then closed, so the guest process sees a
/// broken pipe as it would on a host).
pub fn guest_to_host(
    mut stream: UnixStream,
    mut output: impl Write + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
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
) -> Result<Vec<JoinHandle<()>>, StdioError> {
    let stdin = open_stream(vsock, container, exec, StreamKind::Stdin)?;
    let stdout = open_stream(vsock, container, exec, StreamKind::Stdout)?;
    let stderr = open_stream(vsock, container, exec, StreamKind::Stderr)?;
    host_to_guest(dup(fds[0])?, stdin);
    Ok(vec![guest_to_host(stdout, dup(fds[1])?), guest_to_host(stderr, dup(fds[2])?)])
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
