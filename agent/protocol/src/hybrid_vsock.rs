//! The host's way into the guest: husk's hybrid vsock (as in Firecracker). The VMM listens on a
//! Unix socket; a client connects, sends `CONNECT <port>\n`, and gets `OK <host port>\n` once the
//! guest accepted, after which the socket is a byte stream to the guest's listener on that port.
//! A refusal (no listener on the port) is EOF instead of the `OK` line.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::line::{read_line, LineError};
use crate::stream::{StreamError, StreamHeader, StreamKind};

/// The longest answer line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 32;

/// Why a hybrid vsock connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to the VM's vsock socket {path}")]
    Socket {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("sending CONNECT {port}")]
    Send {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("the guest refused vsock port {port} (nothing listens there)")]
    Refused { port: u32 },
    #[error("reading the answer to CONNECT {port}")]
    Reply {
        port: u32,
        #[source]
        source: LineError,
    },
    #[error("unexpected answer to CONNECT {port}: {line:?}")]
    BadReply { port: u32, line: String },
    #[error("setting up the agent client")]
    Client(#[source] io::Error),
}

/// Connect to the guest's vsock `port` through the VMM's hybrid vsock socket `uds`: the returned
/// stream is the connection to the guest's listener.
pub fn connect(uds: &Path, port: u32) -> Result<UnixStream, ConnectError> {
    let mut stream = connect_unix(uds)
        .map_err(|source| ConnectError::Socket { path: uds.display().to_string(), source })?;
    handshake(&mut stream, port)?;
    Ok(stream)
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A Unix socket's path in a form that fits a socket address, also when the path itself is
/// longer (Docker's state directories make such paths): then through its directory, held open
/// here, as `/proc/self/fd/<fd>/<name>`. Valid for binding and connecting in this process while
/// this lives.
pub struct SocketPath {
    path: PathBuf,
    _dir: Option<std::fs::File>,
}

impl SocketPath {
    pub fn new(path: &Path) -> io::Result<Self> {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(SocketPath { path: path.into(), _dir: None });
        };
        if path.as_os_str().len() <= MAX_SOCKET_PATH {
            return Ok(SocketPath { path: path.into(), _dir: None });
        }
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)?;
        let mut short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        short.push(name);
        Ok(SocketPath { path: short, _dir: Some(dir) })
    }

    /// The path to bind or connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Connect to the Unix socket at `path`, however long (see [`SocketPath`]).
pub fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    UnixStream::connect(SocketPath::new(path)?.path())
}

/// The `CONNECT` handshake on an already-connected stream to the VMM's socket.
pub fn handshake(stream: &mut UnixStream, port: u32) -> Result<(), ConnectError> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|source| ConnectError::Send { port, source })?;
    let line = match read_line(stream, MAX_REPLY) {
        Ok(line) => line,
        Err(LineError::Eof) => return Err(ConnectError::Refused { port }),
        Err(source) => return Err(ConnectError::Reply { port, source }),
    };
    match line.strip_prefix("OK ") {
        Some(n) if n.parse::<u32>().is_ok() => Ok(()),
        _ => Err(ConnectError::BadReply { port, line }),
    }
}

/// Why a stdio stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStreamError {
    #[error("opening the {kind} stream")]
    Connect {
        kind: StreamKind,
        #[source]
        source: ConnectError,
    },
    #[error("opening the {kind} stream")]
    Header {
        kind: StreamKind,
        #[source]
        source: StreamError,
    },
}

/// Open the stdio stream `header` names: a connection to [`crate::STDIO_PORT`] through the
/// VMM's socket `uds`, the header sent and accepted.
pub fn open_stream(uds: &Path, header: &StreamHeader) -> Result<UnixStream, OpenStreamError> {
    let kind = header.kind;
    let mut s = connect(uds, crate::STDIO_PORT)
        .map_err(|source| OpenStreamError::Connect { kind, source })?;
    header.open(&mut s).map_err(|source| OpenStreamError::Header { kind, source })?;
    Ok(s)
}

/// A ttrpc client for the agent service over a connected stream (from [`connect`] to
/// [`crate::AGENT_PORT`], or a Unix socket the agent listens on directly).
pub fn agent_client(stream: UnixStream) -> Result<crate::client::AgentClient, ConnectError> {
    crate::client::AgentClient::new(stream).map_err(ConnectError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::thread;

    use husk_tests::tiny_guest::TempDir;

    /// Serve one connection the way husk's VMM does: read the CONNECT line, answer `reply`
    /// (nothing: refuse by closing), then echo what follows.
    fn vmm_side(reply: Option<&'static str>) -> (TempDir, thread::JoinHandle<String>) {
        let dir = TempDir::new("protocol-vsock");
        let listener = UnixListener::bind(dir.path().join("vsock")).unwrap();
        let handle = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let line = read_line(&mut s, 64).unwrap();
            if let Some(reply) = reply {
                s.write_all(reply.as_bytes()).unwrap();
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).unwrap();
                s.write_all(&buf).unwrap();
            }
            line
        });
        (dir, handle)
    }

    #[test]
    fn connect_sends_the_port_and_leaves_the_stream_after_ok() {
        let (dir, vmm) = vmm_side(Some("OK 1073741824\n"));
        let mut s = connect(&dir.path().join("vsock"), 1024).unwrap();
        s.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");
        assert_eq!(vmm.join().unwrap(), "CONNECT 1024");
    }

    #[test]
    fn refusal_and_bad_answers_are_errors() {
        let (dir, vmm) = vmm_side(None);
        let err = connect(&dir.path().join("vsock"), 7).unwrap_err();
        assert!(matches!(err, ConnectError::Refused { port: 7 }), "{err}");
        vmm.join().unwrap();

        let (dir, _vmm) = vmm_side(Some("NO\n"));
        let err = connect(&dir.path().join("vsock"), 7).unwrap_err();
        assert!(matches!(err, ConnectError::BadReply { .. }), "{err}");

        let err = connect(&dir.path().join("missing"), 7).unwrap_err();
        assert!(matches!(err, ConnectError::Socket { .. }), "{err}");
    }

    #[test]
    fn sockets_with_paths_longer_than_an_address_holds() {
        let top = TempDir::new("protocol-long");
        let dir = top.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock");
        assert!(path.as_os_str().len() > MAX_SOCKET_PATH);
        assert!(UnixListener::bind(&path).is_err(), "too long for a plain bind");
        let short = SocketPath::new(&path).unwrap();
        assert!(short.path().starts_with("/proc/self/fd/"));
        let listener = UnixListener::bind(short.path()).unwrap();
        assert!(path.exists(), "the socket is in its directory");
        let mut client = connect_unix(&path).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        let plain = dir.parent().unwrap().join("s");
        assert_eq!(SocketPath::new(&plain).unwrap().path(), plain, "short paths stay as they are");
    }
}
