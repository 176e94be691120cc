//! Signals in husk's host processes.
//!
//! - `husk vm run`: SIGINT, SIGTERM and SIGHUP end a running micro-VM cleanly: the handler
//!   writes the VM's stop event (an async-signal-safe `write`) and records the signal, so that
//!   `husk` tears the VM down (closing taps, removing sockets) and exits with 128 + the signal
//!   number, as a process killed by it would report.
//! - A process standing for a container process (the VM process, an exec's process) blocks the
//!   signals it passes on ([`FORWARDED`]) and takes them with `sigwait` on one thread.
//! - Signal names and numbers as `runc kill` takes them ([`parse`]).

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

/// The signals a process standing for a container process (the VM process, an exec's process)
/// passes on to it; SIGWINCH is a terminal resize.
pub const FORWARDED: [i32; 8] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
];

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset and sigaddset initialize and edit it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Block the forwarded signals in this thread and every thread it starts from now on, so that
/// only [`wait_forwarded`] receives them. Call before starting threads.
pub fn block_forwarded() {
    let set = forwarded_set();
    // SAFETY: changes this thread's signal mask with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Wait for the next forwarded signal (they must be blocked, see [`block_forwarded`]).
pub fn wait_forwarded() -> i32 {
    let set = forwarded_set();
    let mut signum = 0;
    loop {
        // SAFETY: sigwait with a valid set writes the signal number into `signum`.
        if unsafe { libc::sigwait(&set, &mut signum) } == 0 {
            return signum;
        }
    }
}

/// A signal from its name (`KILL`, `SIGKILL`, `kill`) or number, as `runc kill` takes it.
pub fn parse(text: &str) -> Option<i32> {
    if let Ok(n) = text.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => {
            let rt = name.strip_prefix("RTMIN")?;
            let offset = if rt.is_empty() { 0 } else { rt.strip_prefix('+')?.parse().ok()? };
            let n = libc::SIGRTMIN() + offset;
            return (n <= libc::SIGRTMAX()).then_some(n);
        }
    };
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_and_numbers() {
        assert_eq!(parse("KILL"), Some(9));
        assert_eq!(parse("SIGKILL"), Some(9));
        assert_eq!(parse("sigterm"), Some(15));
        assert_eq!(parse("9"), Some(9));
        assert_eq!(parse("RTMIN+1"), Some(libc::SIGRTMIN() + 1));
        assert_eq!(parse("0"), None);
        assert_eq!(parse("65"), None);
        assert_eq!(parse("SIGFOO"), None);
    }
}
