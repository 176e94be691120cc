//! A terminal for a container process (`terminal: true`): a pty from the container's own devpts
//! (so `tty` inside names /dev/pts/N), the slave as stdin, stdout, stderr and controlling
//! terminal; the master goes to the agent, which attaches it to the host's `tty` stream.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use oci_spec::runtime::Process;

/// Set up the terminal for this process; returns the master.
pub fn setup(p: &Process) -> Result<OwnedFd, String> {
    let master =
        open("/dev/ptmx", OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| {
                format!(
            "terminal: opening /dev/ptmx in the container (is devpts mounted on /dev/pts?): {e}"
        )
            })?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which points at `unlock`.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(format!("terminal: unlockpt: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor for the slave.
    let slave = unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY)
    };
    if slave < 0 {
        return Err(format!(
            "terminal: opening the pty slave: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the ioctl just returned this descriptor; nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let uid = nix::unistd::Uid::from_raw(p.user().uid());
    nix::unistd::fchown(&slave, Some(uid), None)
        .map_err(|e| format!("terminal: chown of the pty: {e}"))?;
    if let Some(size) = p.console_size() {
        let ws = libc::winsize {
            ws_row: size.height() as u16,
            ws_col: size.width() as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points at `ws`.
        if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(format!("terminal: window size: {}", std::io::Error::last_os_error()));
        }
    }
    nix::unistd::setsid().map_err(|e| format!("terminal: setsid: {e}"))?;
    // SAFETY: TIOCSCTTY takes an int argument by value (0: do not steal).
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        return Err(format!("terminal: TIOCSCTTY: {}", std::io::Error::last_os_error()));
    }
    nix::unistd::dup2_stdin(&slave).map_err(|e| format!("terminal: dup2: {e}"))?;
    nix::unistd::dup2_stdout(&slave).map_err(|e| format!("terminal: dup2: {e}"))?;
    nix::unistd::dup2_stderr(&slave).map_err(|e| format!("terminal: dup2: {e}"))?;
    Ok(master)
}
