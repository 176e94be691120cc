//! A host process named by pid, told apart from a later process that reuses the pid by its start
//! time (field 22 of /proc/<pid>/stat), and waited for from a process that is not its parent
//! (through a pidfd).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The start time of `pid` in clock ticks since boot, or `None` if there is no such process.
/// A zombie counts as gone: it has exited and only waits for its parent to reap it.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces or parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (the state).
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// Whether the process `pid` that started at `started` still runs.
pub fn alive(pid: i32, started: u64) -> bool {
    pid > 0 && start_time(pid) == Some(started)
}

/// Send `signal` to `pid` if it is still the process that started at `started`, and wait up to
/// `timeout` for it to exit. Returns whether it is gone.
pub fn kill_and_wait(pid: i32, started: u64, signal: i32, timeout: Duration) -> bool {
    let Some(pidfd) = open_pidfd(pid, started) else { return true };
    // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo and no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    wait_exit(&pidfd, timeout)
}

/// Wait up to `timeout` for `pid`, the process that started at `started`, to exit. Returns
/// whether it is gone.
pub fn wait_gone(pid: i32, started: u64, timeout: Duration) -> bool {
    open_pidfd(pid, started).is_none_or(|pidfd| wait_exit(&pidfd, timeout))
}

/// A pidfd of `pid` if it is still the process that started at `started`. The pidfd pins the
/// process identity: checked after opening it, a signal sent or a wait through it cannot reach
/// a later process with the same pid.
fn open_pidfd(pid: i32, started: u64) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a new descriptor this function owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
    alive(pid, started).then_some(pidfd)
}

/// Wait until the process behind `pidfd` exits (it turns readable), up to `timeout`.
fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    crate::readable::wait_readable(pidfd.as_fd(), timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times_tell_processes_apart() {
        let me = std::process::id() as i32;
        let t = start_time(me).expect("this process runs");
        assert!(alive(me, t));
        assert!(!alive(me, t + 1), "another start time is another process");
        assert!(!alive(0, t));
    }

    #[test]
    fn kill_and_wait_ends_a_process() {
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id() as i32;
        let t = start_time(pid).unwrap();
        assert!(kill_and_wait(pid, t, libc::SIGKILL, Duration::from_secs(10)));
        child.wait().unwrap();
        assert!(!alive(pid, t));
    }

    #[test]
    fn wait_gone_waits_for_the_exit_of_that_process_only() {
        let mut child = std::process::Command::new("sh").args(["-c", "sleep 1"]).spawn().unwrap();
        let pid = child.id() as i32;
        let t = start_time(pid).unwrap();
        assert!(!wait_gone(pid, t, Duration::from_millis(100)), "it still runs");
        assert!(wait_gone(pid, t + 1, Duration::ZERO), "another start time: not that process");
        assert!(wait_gone(pid, t, Duration::from_secs(10)));
        child.wait().unwrap();
    }
}
