//! Where the agent listens: `vsock:PORT` in the guest, `unix:PATH` on a host (tests), and the
//! connections accepted there (the same byte streams either way). The same addresses name
//! where the agent connects to (its log copy): `vsock:PORT` is then the host's port.
//!
//! A vsock listener serves the host (CID 2) only ([`HostOnly`]). vsock has no network
//! namespaces, and the guest kernel's loopback transport lets any process in the guest, a
//! container's included, connect to the agent's ports at CID 1 or the guest's own CID: the
//! ttrpc port would give it the guest's root (a container with any spec), the stdio port other
//! processes' streams. A Unix listener (tests on a host) is guarded by its socket file's
//! permissions.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, VsockAddr};

/// A listen address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Vsock(u32),
    Unix(PathBuf),
}

impl FromStr for Addr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(port) = s.strip_prefix("vsock:") {
            return port.parse().map(Addr::Vsock).map_err(|_| format!("bad vsock port in {s:?}"));
        }
        if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        Err(format!("{s:?}: expected vsock:PORT or unix:PATH"))
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Vsock(port) => write!(f, "vsock:{port}"),
            Addr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Addr {
    /// Connect to the address: for `vsock:PORT`, the host's (CID 2) port PORT.
    pub fn connect(&self) -> io::Result<Conn> {
        match self {
            Addr::Vsock(port) => {
                let fd = vsock_socket()?;
                socket::connect(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_HOST, *port))?;
                Ok(Conn(fd))
            }
            Addr::Unix(path) => Ok(Conn(UnixStream::connect(path)?.into())),
        }
    }
}

/// A new vsock stream socket, to connect or to bind.
fn vsock_socket() -> io::Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    Ok(fd)
}

/// A listening socket.
pub struct Listener {
    fd: OwnedFd,
    /// For a vsock listener: who may connect.
    host_only: Option<HostOnly>,
}

impl Listener {
    pub fn bind(addr: &Addr) -> io::Result<Self> {
        match addr {
            Addr::Vsock(port) => {
                let fd = vsock_socket()?;
                socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, *port))?;
                socket::listen(&fd, socket::Backlog::new(128).map_err(io::Error::from)?)?;
                Ok(Self { fd, host_only: Some(HostOnly::default()) })
            }
            Addr::Unix(path) => {
                // A socket file left by an earlier agent would make bind fail.
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    std::fs::remove_file(path)?;
                }
                Ok(Self { fd: UnixListener::bind(path)?.into(), host_only: None })
            }
        }
    }

    /// The next connection this listener serves; others are closed (and logged) on the way.
    pub fn accept(&self) -> io::Result<Conn> {
        loop {
            let fd = match socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                Ok(fd) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
                Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => continue,
                Err(e) => return Err(e.into()),
            };
            if let Some(host_only) = &self.host_only {
                if let Err(why) = host_only.check(fd.as_fd()) {
                    host_only.log_refusal(&why);
                    continue;
                }
            }
            return Ok(Conn(fd));
        }
    }

    /// The descriptor, for a server that does its own accepting (ttrpc), and the check that
    /// server must make of each connection it accepts (a vsock listener's).
    pub fn into_parts(self) -> (RawFd, Option<HostOnly>) {
        (self.fd.into_raw_fd(), self.host_only)
    }
}

/// Whether `n` is 1, 10, 100, ...
fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

/// Serve the host (CID 2) only: a vsock connection from anywhere else (a process in the guest,
/// through the loopback transport) is refused. See the module documentation.
#[derive(Debug, Default)]
pub struct HostOnly {
    /// Connections the accept loop has refused so far.
    refused: AtomicU64,
}

impl HostOnly {
    /// Log a refusal, the 1st, 10th, 100th... only: a process that connects in a loop must not
    /// flood the serial console (one VM exit per byte).
    fn log_refusal(&self, why: &str) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if is_power_of_ten(n) {
            log::warn!("closed a connection: {why} ({n} refused so far)");
        }
    }

    /// Whether the connection `fd` comes from the host; why not when it does not.
    fn check(&self, fd: BorrowedFd) -> Result<(), String> {
        match socket::getpeername::<VsockAddr>(fd.as_raw_fd()) {
            Ok(peer) if peer.cid() == libc::VMADDR_CID_HOST => Ok(()),
            Ok(peer) => Err(format!("vsock peer CID {} is not the host's", peer.cid())),
            Err(e) => Err(format!("no vsock peer address: {e}")),
        }
    }
}

impl ttrpc::AcceptHook for HostOnly {
    fn on_accept(&self, fd: RawFd) -> Result<ttrpc::HookOutput, ttrpc::HookError> {
        // SAFETY: ttrpc lends the accepted descriptor for this call and keeps it open.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        self.check(fd).map_err(ttrpc::HookError::Rejected)?;
        Ok(ttrpc::HookOutput { data: Default::default(), payload_transform: None })
    }
}

/// A connection, accepted or made.
pub struct Conn(OwnedFd);

impl Conn {
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        use nix::sys::time::{TimeVal, TimeValLike};
        // Zero: no timeout.
        let tv = TimeVal::microseconds(t.map_or(0, |t| t.as_micros() as i64));
        socket::setsockopt(&self.0, sockopt::ReceiveTimeout, &tv).map_err(Into::into)
    }

    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.0.try_clone()
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        nix::unistd::read(&self.0, buf).map_err(|e| match e {
            // SO_RCVTIMEO expiring.
            nix::errno::Errno::EAGAIN => io::Error::from(io::ErrorKind::TimedOut),
            e => e.into(),
        })
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        socket::send(self.0.as_raw_fd(), buf, socket::MsgFlags::MSG_NOSIGNAL).map_err(Into::into)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!("vsock:1024".parse(), Ok(Addr::Vsock(1024)));
        assert_eq!("unix:/run/a.sock".parse(), Ok(Addr::Unix("/run/a.sock".into())));
        for bad in ["vsock:x", "unix:", "tcp:1", "1024"] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
        assert_eq!(Addr::Vsock(7).to_string(), "vsock:7");
    }

    #[test]
    fn unix_listener_accepts_and_times_out() {
        let dir = husk_tests::tiny_guest::TempDir::new("listen");
        let path = dir.path().join("agent.sock");
        let l = Listener::bind(&Addr::Unix(path.clone())).unwrap();
        // A stale socket file is replaced.
        drop(l);
        let l = Listener::bind(&Addr::Unix(path.clone())).unwrap();
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut conn = l.accept().unwrap();
        client.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        conn.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let err = conn.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn refusals_logged_at_powers_of_ten() {
        let logged: Vec<u64> = (0..=1000).filter(|&n| is_power_of_ten(n)).collect();
        assert_eq!(logged, [1, 10, 100, 1000]);
    }

    #[test]
    fn host_only_refuses_a_peer_that_is_not_the_hosts_vsock() {
        // The check fails closed: a peer it cannot place (here a Unix socket) is refused, by
        // the stdio accept loop and by ttrpc's hook alike.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let why = HostOnly::default().check(a.as_fd()).unwrap_err();
        assert!(why.contains("no vsock peer address"), "{why}");
        let rejected = ttrpc::AcceptHook::on_accept(&HostOnly::default(), a.as_raw_fd());
        assert!(matches!(rejected, Err(ttrpc::HookError::Rejected(_))));
    }
}
