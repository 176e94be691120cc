//! SIGINT, SIGTERM and SIGHUP end a running micro-VM cleanly: the handler writes the VM's stop
//! event (an async-signal-safe `write`) and records the signal, so that `husk` tears the VM
//! down (closing taps, removing sockets) and exits with 128 + the signal number, as a process
//! killed by it would report.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// The stop event's descriptor, -1 when none is installed.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
/// The signal that asked to stop, 0 if none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_stop_signal(signum: libc::c_int) {
    RECEIVED.store(signum, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; the fd is an eventfd kept open by the caller
        // for as long as the handler is installed, and `one` is 8 valid bytes.
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// Route the stop signals to `stop_evt`, which the caller keeps open until the VM has ended.
pub fn forward_to(stop_evt: &EventFd) -> std::io::Result<()> {
    STOP_FD.store(stop_evt.as_raw_fd(), Ordering::SeqCst);
    for signum in STOP_SIGNALS {
        // SAFETY: the handler only does async-signal-safe work (atomics and write).
        let previous = unsafe {
            libc::signal(signum, on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t)
        };
        if previous == libc::SIG_ERR {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The stop signal that arrived, if any.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        signum => Some(signum),
    }
}
