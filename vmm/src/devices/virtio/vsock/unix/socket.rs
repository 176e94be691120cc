//! Host Unix-socket plumbing for the vsock backend: the listening socket at `uds_path` (which
//! refuses a path a live listener holds, replaces a stale socket file, and removes its file when
//! dropped), a connect that never blocks the event loop, and a send that never raises SIGPIPE.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the host socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The directory that should hold the socket does not exist.
    #[error("directory {0} for the vsock socket does not exist")]
    MissingParent(PathBuf),
    /// A live listener already serves this path.
    #[error("vsock socket path in use: {0}")]
    InUse(PathBuf),
    /// Something other than a socket sits at the path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The host refused to create the socket.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What the host said.
        #[source]
        source: io::Error,
    },
}

/// The non-blocking listener at `uds_path`; its socket file goes away with it.
#[derive(Debug)]
pub struct HostListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created, so that dropping never removes a file
    /// someone else put at the same path since.
    file_id: (u64, u64),
}

impl HostListener {
    /// Listen on `path`, replacing a stale socket file left by a dead process.
    pub fn bind(path: &Path) -> Result<Self, ListenerError> {
        check_parent(path)?;
        let listener = match UnixListener::bind(path) {
            Ok(listener) => listener,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                remove_stale_socket(path)?;
                UnixListener::bind(path).map_err(|source| bind_error(path, source))?
            }
            Err(source) => return Err(bind_error(path, source)),
        };
        listener.set_nonblocking(true).map_err(|source| bind_error(path, source))?;
        let meta = std::fs::symlink_metadata(path).map_err(|source| bind_error(path, source))?;
        Ok(HostListener { listener, path: path.to_path_buf(), file_id: (meta.dev(), meta.ino()) })
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }
}

impl AsRawFd for HostListener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.file_id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove vsock socket {}: {e}", self.path.display());
            }
        }
    }
}

fn bind_error(path: &Path, source: io::Error) -> ListenerError {
    ListenerError::Bind { path: path.to_path_buf(), source }
}

fn check_parent(path: &Path) -> Result<(), ListenerError> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() && !parent.is_dir() => {
            Err(ListenerError::MissingParent(parent.to_path_buf()))
        }
        _ => Ok(()),
    }
}

/// `path` exists: remove it if it is a socket nobody listens on.
fn remove_stale_socket(path: &Path) -> Result<(), ListenerError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| bind_error(path, source))?;
    if !meta.file_type().is_socket() {
        return Err(ListenerError::NotASocket(path.to_path_buf()));
    }
    match connect_nonblocking(path) {
        // Connected, or a listener whose backlog is full: alive either way.
        Ok(_) => return Err(ListenerError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            return Err(ListenerError::InUse(path.to_path_buf()))
        }
        Err(_) => {}
    }
    log::info!("replacing stale vsock socket {}", path.display());
    std::fs::remove_file(path).map_err(|source| bind_error(path, source))
}

/// Connect a non-blocking stream to the Unix socket at `path`. A Unix-domain connect completes
/// at once or fails: a missing socket, a refused connection, or a listener whose backlog is full
/// (`WouldBlock`) are errors, never a wait.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let addr = socket_address(path)?;
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr_len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a fully initialised sockaddr_un that outlives the call and `addr_len` is
    // its size; `socket` is an open socket.
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            addr_len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

/// The sockaddr_un for `path`, which must fit with its terminating NUL.
fn socket_address(path: &Path) -> io::Result<libc::sockaddr_un> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr =
        libc::sockaddr_un { sun_family: libc::AF_UNIX as libc::sa_family_t, sun_path: [0; 108] };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a usable Unix socket path", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(addr)
}

/// Write `buf` to `stream` without raising SIGPIPE when the peer is gone (that is `EPIPE`).
pub fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call and
    // `stream` keeps the descriptor open.
    let sent = unsafe {
        libc::send(stream.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL)
    };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::test_support::TempDir;

    #[test]
    fn bind_creates_and_drop_removes_the_socket() {
        let dir = TempDir::new("vsock");
        let path = dir.path().join("v.sock");
        let listener = HostListener::bind(&path).unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        UnixStream::connect(&path).unwrap();
        drop(listener);
        assert!(!path.exists(), "socket file left behind");
    }

    #[test]
    fn live_listener_makes_the_path_in_use() {
        let dir = TempDir::new("vsock");
        let path = dir.path().join("v.sock");
        let _first = HostListener::bind(&path).unwrap();
        let err = HostListener::bind(&path).unwrap_err();
        assert!(matches!(err, ListenerError::InUse(_)), "{err}");
        assert!(err.to_string().contains("socket path in use"), "{err}");
        assert!(path.exists(), "the live listener's file must stay");
    }

    #[test]
    fn stale_socket_file_is_replaced() {
        let dir = TempDir::new("vsock");
        let path = dir.path().join("v.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "std leaves the file behind: a stale socket");
        let listener = HostListener::bind(&path).unwrap();
        UnixStream::connect(&path).unwrap();
        drop(listener);
    }

    #[test]
    fn regular_file_is_not_replaced() {
        let dir = TempDir::new("vsock");
        let path = dir.path().join("v.sock");
        std::fs::write(&path, b"data").unwrap();
        let err = HostListener::bind(&path).unwrap_err();
        assert!(matches!(err, ListenerError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn missing_parent_directory_is_named() {
        let dir = TempDir::new("vsock");
        let parent = dir.path().join("absent");
        let err = HostListener::bind(&parent.join("v.sock")).unwrap_err();
        assert!(matches!(&err, ListenerError::MissingParent(p) if *p == parent), "{err}");
        assert!(err.to_string().contains(&*parent.to_string_lossy()), "{err}");
    }

    #[test]
    fn drop_leaves_a_replaced_file_alone() {
        let dir = TempDir::new("vsock");
        let path = dir.path().join("v.sock");
        let listener = HostListener::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(listener);
        assert!(path.exists());
    }

    #[test]
    fn nonblocking_connect_reports_absent_and_refused_sockets() {
        let dir = TempDir::new("vsock");
        let path = dir.path().join("s");
        let err = connect_nonblocking(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        drop(UnixListener::bind(&path).unwrap());
        let err = connect_nonblocking(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        let long = dir.path().join("x".repeat(200));
        assert_eq!(connect_nonblocking(&long).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn nonblocking_connect_reaches_a_listener() {
        let dir = TempDir::new("vsock");
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        let stream = connect_nonblocking(&path).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        assert_eq!(send_nosignal(&stream, b"hi").unwrap(), 2);
        let mut buf = [0u8; 2];
        io::Read::read_exact(&mut peer, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(peer);
        let err = send_nosignal(&stream, b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
