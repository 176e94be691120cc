//! Waiting, up to a timeout, for a descriptor to turn readable: a pidfd when its process
//! exits, a listening socket when a connection comes.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// Whether `fd` turned readable within `timeout` (a signal interrupting the wait restarts it).
pub fn wait_readable(fd: BorrowedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return n > 0;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}
