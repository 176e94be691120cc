//! `husk-agent-init init CHANNEL_FD [PIDFD]` (argv[0] `husk-agent-init`): the helper that
//! becomes a container process.
//!
//! The agent is multi-threaded, so it does nothing between fork and exec but what `Command`
//! does (plus clearing close-on-exec on the descriptors it passes): it executes this helper, a
//! fresh single-threaded process, in the container's pid namespace, with the process's stdio,
//! its end of a private channel (`channel`) and, for an exec, the pidfd of the container's
//! process. The helper joins the cgroup, makes or joins the namespaces, sets up the root file
//! system (for a container) and the terminal, takes on the process's identity, reports `Ready`,
//! waits for `Start` (a container's own process only: StartContainer) and executes the program.
//! Any failure goes back to the agent as `Failed` with what went wrong, and the helper exits.

pub mod config;
mod mounts;
mod process;
mod rootfs;
pub mod seccomp;
mod syscalls;
mod tty;

use std::convert::Infallible;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sched::CloneFlags;

use crate::channel::{Channel, ChannelError};
use crate::container::spec::Ns;
use config::{FromInit, InitConfig, Setup, ToInit};

/// The helper's argv[0] (with `init` as argv[1]): what makes the binary run as the helper.
pub const ARG0: &str = "husk-agent-init";

/// Whether this process is the helper. It is told apart by the argv[0] the agent gives it, not
/// by its pid: in a new pid namespace the helper is PID 1 too, and must never take itself for
/// the guest's init (whose argv[0] is the kernel's `/init`).
pub fn is_helper(argv: &[String]) -> bool {
    argv.len() >= 2 && argv[0] == ARG0 && argv[1] == "init"
}

/// Run the helper; `args` are the descriptor numbers after `init`.
pub fn main(args: &[String]) -> ! {
    let fds: Vec<i32> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if fds.is_empty() || fds.len() != args.len() || fds.len() > 2 || fds.iter().any(|&fd| fd < 3) {
        eprintln!("husk-agent init: internal helper of husk-agent, not for direct use");
        std::process::exit(2);
    }
    // SAFETY: the agent passed these descriptors open, to this process alone, and named them
    // on the command line; nothing else in this process owns them.
    let chan = Channel::from_stream(unsafe { UnixStream::from_raw_fd(fds[0]) });
    // SAFETY: as above.
    let pidfd = fds.get(1).map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let Err(message) = run(&chan, pidfd);
    // If the agent is gone there is nobody to tell.
    let _ = chan.send(&FromInit::Failed(message), &[]);
    std::process::exit(1);
}

fn run(chan: &Channel, pidfd: Option<OwnedFd>) -> Result<Infallible, String> {
    let cfg: Box<InitConfig> = match chan.recv::<ToInit>() {
        Ok((ToInit::Config(cfg), _)) => cfg,
        Ok((ToInit::Start, _)) => return Err("expected a config, got Start".into()),
        Err(e) => return Err(format!("reading the config: {e}")),
    };
    let procs = cfg.cgroup.join("cgroup.procs");
    std::fs::write(&procs, "0").map_err(|e| format!("joining cgroup {}: {e}", procs.display()))?;
    let is_create = matches!(cfg.setup, Setup::Create(_));
    match &cfg.setup {
        Setup::Create(c) => {
            for (ns, path) in &c.namespaces.join {
                let fd = nix::fcntl::open(
                    path,
                    nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .map_err(|e| format!("opening namespace {}: {e}", path.display()))?;
                nix::sched::setns(fd, ns.clone_flag())
                    .map_err(|e| format!("joining namespace {}: {e}", path.display()))?;
            }
            let new = flags(c.namespaces.new.iter().filter(|ns| **ns != Ns::Pid));
            nix::sched::unshare(new).map_err(|e| format!("unshare {new:?}: {e}"))?;
            rootfs::setup(c, &cfg.cgroup)?;
            if let Some(h) = c.spec.hostname().as_deref().filter(|h| !h.is_empty()) {
                nix::unistd::sethostname(h).map_err(|e| format!("sethostname {h}: {e}"))?;
            }
            if let Some(d) = c.spec.domainname().as_deref().filter(|d| !d.is_empty()) {
                // SAFETY: setdomainname reads `len` bytes from the pointer, a live &str.
                if unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) } < 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(format!("setdomainname {d}: {e}"));
                }
            }
            for (key, value) in
                c.spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()).into_iter().flatten()
            {
                let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                std::fs::write(&path, value).map_err(|e| format!("sysctl {key}={value}: {e}"))?;
            }
            rootfs::lock_down(c)?;
        }
        Setup::Exec { namespaces } => {
            let pidfd = pidfd.ok_or("an exec needs the container process's pidfd")?;
            let join = flags(namespaces.iter().filter(|ns| **ns != Ns::Pid));
            nix::sched::setns(pidfd.as_fd(), join)
                .map_err(|e| format!("joining the container's namespaces: {e}"))?;
        }
    }
    let master = if cfg.process.terminal().unwrap_or(false) {
        Some(tty::setup(&cfg.process)?)
    } else {
        None
    };
    let filter = cfg.seccomp.as_ref().map(seccomp::compile).transpose()?;
    let prepared = process::prepare(&cfg.process, filter)?;
    let fds: Vec<_> = master.iter().map(|m| m.as_fd()).collect();
    chan.send(&FromInit::Ready, &fds).map_err(|e| format!("reporting ready: {e}"))?;
    drop(master);
    if is_create {
        match chan.recv::<ToInit>() {
            Ok((ToInit::Start, _)) => {}
            Ok((ToInit::Config(_), _)) => return Err("expected Start, got a config".into()),
            // The agent removed the container before starting it.
            Err(ChannelError::Eof) => std::process::exit(0),
            Err(e) => return Err(format!("waiting for start: {e}")),
        }
    }
    process::exec(&prepared)
}

fn flags<'a>(ns: impl Iterator<Item = &'a Ns>) -> CloneFlags {
    ns.fold(CloneFlags::empty(), |f, ns| f | ns.clone_flag())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_agents_own_helper_invocation_is_the_helper() {
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(is_helper(&argv(&[ARG0, "init", "5"])));
        // The guest's PID 1, even if the kernel hands it an `init` word from its command line.
        assert!(!is_helper(&argv(&["/init", "init"])));
        assert!(!is_helper(&argv(&["husk-agent", "init", "5"])));
        assert!(!is_helper(&argv(&[ARG0])));
    }
}
