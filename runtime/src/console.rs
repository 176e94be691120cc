//! Terminals for container processes with `terminal: true`. The process's real terminal is a
//! pty in the guest; on the host husk makes a pty pair too, hands its master to the caller over
//! `--console-socket` exactly as runc does (one SCM_RIGHTS message whose data is the master's
//! name), and joins its slave, in raw mode, to the guest's terminal stream. The caller resizes
//! the master; the slave is husk's controlling terminal, so a resize reaches husk as SIGWINCH
//! and goes on to the guest.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("creating a pty: {0}")]
    Pty(std::io::Error),
    #[error("connecting to the console socket {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("sending the pty master over the console socket: {0}")]
    Send(std::io::Error),
    #[error("setting up the terminal: {0}")]
    Setup(std::io::Error),
}

/// The host side of a container terminal: the slave husk keeps.
pub struct HostPty {
    pub slave: File,
}

/// A pty pair whose master went to the console socket at `socket`; the slave is set raw and
/// made this process's controlling terminal when `control` (this process must then be a
/// session leader without one).
pub fn pty_to_console_socket(socket: &Path, control: bool) -> Result<HostPty, ConsoleError> {
    let (master, slave) = openpty()?;
    make_raw(slave.as_raw_fd()).map_err(ConsoleError::Setup)?;
    if control {
        // SAFETY: TIOCSCTTY with argument 0 on a terminal descriptor this process owns.
        if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
            return Err(ConsoleError::Setup(std::io::Error::last_os_error()));
        }
    }
    let stream = UnixStream::connect(socket)
        .map_err(|source| ConsoleError::Connect { path: socket.display().to_string(), source })?;
    send_fd(&stream, b"/dev/ptmx", master.as_raw_fd()).map_err(ConsoleError::Send)?;
    Ok(HostPty { slave: File::from(slave) })
}

fn openpty() -> Result<(OwnedFd, OwnedFd), ConsoleError> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors; no name, termios or winsize are passed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(ConsoleError::Pty(std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    let pair = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&pair.0, &pair.1] {
        // SAFETY: F_SETFD on a descriptor this function owns.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(pair)
}

/// Raw mode: bytes pass untouched, the guest's terminal does the line discipline.
pub fn make_raw(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: termios is plain data that tcgetattr fills.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is valid to fill; `fd` is a terminal the caller owns.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only edits the struct.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: as above.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The window size of terminal `fd` as (rows, columns), if it is a terminal.
pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data that TIOCGWINSZ fills.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into `ws`.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } != 0 {
        return None;
    }
    Some((ws.ws_row, ws.ws_col))
}

/// Send `fd` with `data` as one SCM_RIGHTS message.
fn send_fd(stream: &UnixStream, data: &[u8], fd: RawFd) -> std::io::Result<()> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below points into live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds one header of CMSG_SPACE(sizeof fd) bytes, so
    // CMSG_FIRSTHDR is non-null and CMSG_DATA has room for one descriptor.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: `msg` is fully initialized and its buffers outlive the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_tests::runtime::recv_fd;
    use husk_tests::tiny_guest::TempDir;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_master_reaches_the_console_socket_and_talks_to_the_slave() {
        let dir = TempDir::new("runtime-console");
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let pty = pty_to_console_socket(&path, false).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let (name, master) = recv_fd(&conn);
        assert_eq!(name, "/dev/ptmx");
        let mut master = File::from(master);
        master.write_all(b"raw\n").unwrap();
        let mut slave = pty.slave;
        let mut buf = [0u8; 4];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"raw\n", "raw mode passes bytes untouched");
        let ws = libc::winsize { ws_row: 50, ws_col: 132, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize.
        assert_eq!(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) }, 0);
        assert_eq!(window_size(slave.as_raw_fd()), Some((50, 132)));
    }

    #[test]
    fn a_missing_console_socket_is_a_clear_error() {
        let e = pty_to_console_socket(Path::new("/nonexistent/console.sock"), false).err().unwrap();
        assert!(e.to_string().contains("connecting to the console socket /nonexistent"), "{e}");
    }
}
