//! The one place the agent waits for children. A thread reaps every child on SIGCHLD: the
//! agent's container processes and, as the guest's PID 1 (or a host-mode subreaper), every
//! orphan handed to it. Exit statuses of registered processes go to whoever waits for them;
//! orphans are reaped and forgotten.
//!
//! Nothing else in the agent may wait for a child (no `Child::wait`, no `Command::output`):
//! it would steal statuses from this thread, or have them stolen.
//!
//! A child is registered while [`Reaper::spawn`] holds the registry lock around the fork, and
//! the thread finds a zombie with `waitid(WNOWAIT)` but reaps it only under that lock. So a
//! registered process whose exit is not recorded yet is never reaped: its pid is still its own,
//! which makes the pidfd taken at spawn time (and anything else done under the lock) safe.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::pidfd;
use crate::sync::lock;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The shell's convention: the exit code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            Self::Exited(code) => code,
            Self::Signaled(signal) => 128 + signal,
        }
    }

    fn from_wait_status(status: libc::c_int) -> Self {
        if libc::WIFSIGNALED(status) {
            Self::Signaled(libc::WTERMSIG(status))
        } else {
            Self::Exited(libc::WEXITSTATUS(status))
        }
    }
}

/// Where a registered process's exit status lands.
#[derive(Default)]
pub struct Exit {
    status: Mutex<Option<ExitStatus>>,
    cond: Condvar,
}

impl Exit {
    /// The status, once the process has exited.
    pub fn get(&self) -> Option<ExitStatus> {
        *lock(&self.status)
    }

    /// Block until the process has exited.
    pub fn wait(&self) -> ExitStatus {
        let mut status = lock(&self.status);
        loop {
            if let Some(s) = *status {
                return s;
            }
            status = self.cond.wait(status).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Block until the process has exited or `timeout` has passed.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let status = lock(&self.status);
        let (status, _) = self
            .cond
            .wait_timeout_while(status, timeout, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *status
    }

    fn set(&self, s: ExitStatus) {
        *lock(&self.status) = Some(s);
        self.cond.notify_all();
    }
}

/// A process the reaper watches.
pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub exit: Arc<Exit>,
}

pub struct Reaper {
    children: Mutex<HashMap<i32, Arc<Exit>>>,
}

/// Block SIGCHLD in the calling thread, and so in every thread created after it. Call before
/// the agent starts any thread: the reaper takes SIGCHLD through a signalfd, which only works
/// while no thread could have it delivered the ordinary way. (Children do not inherit the mask:
/// `Command` clears it.)
pub fn block_sigchld() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
}

impl Reaper {
    /// Start the reaper thread. SIGCHLD must be blocked ([`block_sigchld`]).
    pub fn start() -> io::Result<Arc<Self>> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        let sfd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC)?;
        let reaper = Arc::new(Self { children: Mutex::new(HashMap::new()) });
        let r = reaper.clone();
        std::thread::Builder::new().name("reaper".into()).spawn(move || r.run(sfd))?;
        Ok(reaper)
    }

    /// Spawn `cmd` and register it, so that its exit status is kept for [`Exit::wait`].
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Spawned> {
        let mut children = lock(&self.children);
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        // Dropping a Child neither waits nor kills; the reaper thread owns the waiting.
        drop(child);
        let exit = Arc::new(Exit::default());
        children.insert(pid, exit.clone());
        // Not reaped yet (we hold the lock), so the pid is still this child's.
        let pidfd = match pidfd::open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                // Cannot track it: make sure it does not run untracked. kill(2) is safe here
                // for the same reason pidfd_open would have been.
                // SAFETY: kill takes a pid and a signal; the pid is our unreaped child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return Err(e);
            }
        };
        Ok(Spawned { pid, pidfd, exit })
    }

    fn run(&self, sfd: SignalFd) {
        loop {
            match sfd.read_signal() {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // Cannot happen with a valid signalfd; fall back to polling rather than
                    // stop reaping.
                    log::error!("reaper: reading the signalfd: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            self.reap_all();
        }
    }

    /// Reap every zombie child there is now.
    fn reap_all(&self) {
        loop {
            // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // Find a zombie without reaping it (WNOWAIT); it is reaped below, under the lock.
            // SAFETY: `info` is a valid siginfo_t for the kernel to fill in.
            let r = unsafe {
                libc::waitid(
                    libc::P_ALL,
                    0,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            if r < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ECHILD) => return,
                    _ => {
                        log::error!("reaper: waitid: {}", io::Error::last_os_error());
                        return;
                    }
                }
            }
            // SAFETY: waitid filled in a SIGCHLD siginfo (or left it zeroed: no zombie).
            let pid = unsafe { info.si_pid() };
            if pid == 0 {
                return;
            }
            let mut children = lock(&self.children);
            let mut status = 0;
            // SAFETY: `status` is a valid int for the kernel to fill in.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r != pid {
                log::error!("reaper: waitpid({pid}): {}", io::Error::last_os_error());
                continue;
            }
            let exit = ExitStatus::from_wait_status(status);
            match children.remove(&pid) {
                Some(cell) => {
                    log::debug!("process {pid} ended: {exit:?}");
                    cell.set(exit);
                }
                None => log::debug!("reaped orphan {pid}: {exit:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(ExitStatus::Exited(3).code(), 3);
        assert_eq!(ExitStatus::Signaled(9).code(), 137);
        let exit = Exit::default();
        assert_eq!(exit.wait_timeout(Duration::from_millis(10)), None);
        exit.set(ExitStatus::Exited(0));
        assert_eq!(exit.wait(), ExitStatus::Exited(0));
        assert_eq!(exit.get(), Some(ExitStatus::Exited(0)));
    }
}
