//! Starting a `husk-agent init` helper for a container process: its stdio, its channel, the
//! pid namespace it is born in, registered with the reaper.
//!
//! A new pid namespace can only be entered at fork, and `unshare(CLONE_NEWPID)` /
//! `setns(CLONE_NEWPID)` change the namespace of the calling thread's future children. So each
//! launch runs on a short-lived thread of its own that switches its children's pid namespace
//! and forks once; the agent's other threads are not affected.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::sched::CloneFlags;

use crate::channel::Channel;
use crate::error::{Error, Result};
use crate::init::config::{InitConfig, ToInit};
use crate::reaper::{Reaper, Spawned};

/// The pid namespace the process is born in.
pub enum PidNs<'a> {
    /// The agent's.
    Inherit,
    /// A new one (the process is its init).
    New,
    /// The one of the process behind this pidfd (an exec), or at this path.
    JoinPidfd(BorrowedFd<'a>),
    JoinPath(&'a Path),
}

/// Spawn the helper with `stdio` and send it `config`. `pidfd` is passed on to it (an exec
/// joins that process's other namespaces).
pub fn launch(
    reaper: &Reaper,
    exe: &Path,
    config: InitConfig,
    stdio: [std::process::Stdio; 3],
    pid_ns: PidNs<'_>,
    pidfd: Option<BorrowedFd<'_>>,
) -> Result<(Spawned, Channel)> {
    let (ours, theirs) = Channel::pair().map_err(|e| Error::internal("socketpair", &e))?;
    let theirs = theirs.into_fd();
    let passed: Vec<i32> =
        std::iter::once(theirs.as_raw_fd()).chain(pidfd.map(|fd| fd.as_raw_fd())).collect();
    let [stdin, stdout, stderr] = stdio;
    let mut cmd = Command::new(exe);
    cmd.arg0(crate::init::ARG0)
        .arg("init")
        .args(passed.iter().map(|fd| fd.to_string()))
        .env_clear()
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    let keep = passed.clone();
    // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which is
    // async-signal-safe; it allocates nothing (`keep` was allocated before the fork).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                // These were opened close-on-exec in the agent; this child alone keeps them.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = std::thread::scope(|s| {
        s.spawn(|| -> Result<Spawned> {
            match pid_ns {
                PidNs::Inherit => {}
                PidNs::New => nix::sched::unshare(CloneFlags::CLONE_NEWPID)
                    .map_err(|e| Error::internal("unshare(CLONE_NEWPID)", &e))?,
                PidNs::JoinPidfd(fd) => nix::sched::setns(fd, CloneFlags::CLONE_NEWPID)
                    .map_err(|e| Error::internal("joining the container's pid namespace", &e))?,
                PidNs::JoinPath(path) => {
                    let fd = std::fs::File::open(path).map_err(|e| {
                        Error::InvalidArgument(format!("pid namespace {}: {e}", path.display()))
                    })?;
                    nix::sched::setns(fd, CloneFlags::CLONE_NEWPID).map_err(|e| {
                        Error::InvalidArgument(format!(
                            "joining pid namespace {}: {e}",
                            path.display()
                        ))
                    })?
                }
            }
            reaper.spawn(&mut cmd).map_err(|e| Error::internal("starting husk-agent init", &e))
        })
        .join()
        .unwrap_or_else(|_| Err(Error::Internal("the launch thread panicked".into())))
    })?;
    // The child's ends of the channel and stdio close here, in the agent.
    drop(cmd);
    drop(theirs);
    if let Err(e) = ours.send(&ToInit::Config(Box::new(config)), &[]) {
        // The helper died at once; the caller sees its exit through `spawned`.
        log::warn!("sending the config to process {}: {e}", spawned.pid);
    }
    Ok((spawned, ours))
}
