//! A process the agent started in a container (its own process or an exec): its pidfd, its exit,
//! and the agent's ends of its stdio until the host attaches them as streams.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use husk_agent_protocol::stream::StreamKind;
use nix::fcntl::OFlag;
use nix::sys::socket::Shutdown;

use crate::error::{Error, Result};
use crate::pidfd;
use crate::reaper::{Exit, ExitStatus};
use crate::sync::lock;

/// The agent's end of one output stream.
enum Output {
    /// The process does not have this stream.
    Absent,
    /// Not attached yet: output waits in the pipe (or the pty).
    Waiting(OwnedFd),
    Attached,
}

/// The agent's end of the process's stdin.
enum Stdin {
    Absent,
    Waiting(OwnedFd),
    /// Attached; the connection (a duplicate) is kept so that CloseStdin can end the stream.
    Attached(OwnedFd),
    Closed,
}

struct Io {
    stdin: Stdin,
    stdout: Output,
    stderr: Output,
    tty: Output,
}

/// What a stream attaches to.
pub enum Attach {
    /// Copy from this descriptor to the connection.
    Output(OwnedFd),
    /// Copy from the connection to this descriptor.
    Input(OwnedFd),
    /// Both ways with the pty master (two descriptors for the two directions).
    Tty(OwnedFd, OwnedFd),
}

pub struct Process {
    pub pid: i32,
    pidfd: OwnedFd,
    exit: Arc<Exit>,
    io: Mutex<Io>,
    /// The pty master, for window resizes.
    tty: Option<OwnedFd>,
    /// The container cgroup's OOM kill count when the process started.
    oom_kills_at_start: Option<u64>,
}

/// The child's ends of its stdio (for `Command`) and the agent's ends, before the spawn.
pub struct StdioPlan {
    pub child: [Stdio; 3],
    io: Io,
}

impl StdioPlan {
    /// Pipes for the streams the host will attach, /dev/null for the others. With a terminal
    /// the child gets /dev/null for all three until it sets up its pty.
    pub fn new(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> Result<Self> {
        let (stdin, stdout, stderr) =
            if terminal { (false, false, false) } else { (stdin, stdout, stderr) };
        let null = || -> Result<Stdio> {
            File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(Stdio::from)
                .map_err(|e| Error::internal("opening /dev/null", &e))
        };
        let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::internal("pipe", &e));
        let mut io = Io {
            stdin: Stdin::Absent,
            stdout: Output::Absent,
            stderr: Output::Absent,
            tty: Output::Absent,
        };
        let child_in = if stdin {
            let (r, w) = pipe()?;
            io.stdin = Stdin::Waiting(w);
            Stdio::from(r)
        } else {
            null()?
        };
        let output = |wanted: bool, slot: &mut Output| -> Result<Stdio> {
            if !wanted {
                return null();
            }
            let (r, w) = pipe()?;
            *slot = Output::Waiting(r);
            Ok(Stdio::from(w))
        };
        let child_out = output(stdout, &mut io.stdout)?;
        let child_err = output(stderr, &mut io.stderr)?;
        Ok(Self { child: [child_in, child_out, child_err], io })
    }

    /// The child's ends, to hand to `Command` (which closes them in the agent after the spawn).
    pub fn take_child(&mut self) -> [Stdio; 3] {
        std::mem::replace(&mut self.child, [Stdio::null(), Stdio::null(), Stdio::null()])
    }
}

impl Process {
    pub fn new(
        spawned: crate::reaper::Spawned,
        plan: StdioPlan,
        tty: Option<OwnedFd>,
        oom_kills_at_start: Option<u64>,
    ) -> Result<Self> {
        let mut io = plan.io;
        let tty = match tty {
            Some(master) => {
                let dup = master.try_clone().map_err(|e| Error::internal("dup", &e))?;
                io.tty = Output::Waiting(master);
                Some(dup)
            }
            None => None,
        };
        Ok(Self {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            exit: spawned.exit,
            io: Mutex::new(io),
            tty,
            oom_kills_at_start,
        })
    }

    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    pub fn exit(&self) -> &Exit {
        &self.exit
    }

    pub fn exited(&self) -> Option<ExitStatus> {
        self.exit.get()
    }

    /// Whether an exit was the OOM killer's doing: SIGKILL, while the container's OOM kill count
    /// went up. The count is the cgroup's, so a SIGKILL from someone else that coincides with
    /// an OOM kill of another process in the same container would also count.
    pub fn oom_killed(&self, status: ExitStatus, oom_kills_now: Option<u64>) -> bool {
        status == ExitStatus::Signaled(libc::SIGKILL)
            && matches!((self.oom_kills_at_start, oom_kills_now), (Some(a), Some(b)) if b > a)
    }

    pub fn signal(&self, signal: i32) -> Result<()> {
        if self.exited().is_some() {
            return Err(Error::FailedPrecondition(format!("process {} has exited", self.pid)));
        }
        pidfd::send_signal(&self.pidfd, signal).map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => {
                Error::FailedPrecondition(format!("process {} has exited", self.pid))
            }
            Some(libc::EINVAL) => Error::InvalidArgument(format!("invalid signal {signal}")),
            _ => Error::internal(format!("signal {signal} to process {}", self.pid), &e),
        })
    }

    /// Hand out the agent's end of a stream to a new connection (`conn`, kept for stdin).
    pub fn attach(&self, kind: StreamKind, conn: &OwnedFd) -> Result<Attach> {
        let mut io = lock(&self.io);
        let missing = || {
            Error::FailedPrecondition(format!(
                "process {} has no {kind} stream (not requested{})",
                self.pid,
                if self.tty.is_some() { "; it has a terminal: attach tty" } else { "" }
            ))
        };
        let again = || Error::AlreadyExists(format!("the {kind} stream is already attached"));
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| Error::internal("dup", &e));
        match kind {
            StreamKind::Stdin => match std::mem::replace(&mut io.stdin, Stdin::Absent) {
                Stdin::Waiting(fd) => match dup(conn) {
                    Ok(conn) => {
                        io.stdin = Stdin::Attached(conn);
                        Ok(Attach::Input(fd))
                    }
                    Err(e) => {
                        io.stdin = Stdin::Waiting(fd);
                        Err(e)
                    }
                },
                other => {
                    let err = match other {
                        Stdin::Attached(_) => again(),
                        Stdin::Closed => Error::FailedPrecondition("stdin was closed".into()),
                        _ => missing(),
                    };
                    io.stdin = other;
                    Err(err)
                }
            },
            StreamKind::Stdout | StreamKind::Stderr | StreamKind::Tty => {
                let slot = match kind {
                    StreamKind::Stdout => &mut io.stdout,
                    StreamKind::Stderr => &mut io.stderr,
                    _ => &mut io.tty,
                };
                match std::mem::replace(slot, Output::Attached) {
                    Output::Waiting(fd) if kind == StreamKind::Tty => match dup(&fd) {
                        Ok(second) => Ok(Attach::Tty(fd, second)),
                        Err(e) => {
                            *slot = Output::Waiting(fd);
                            Err(e)
                        }
                    },
                    Output::Waiting(fd) => Ok(Attach::Output(fd)),
                    Output::Attached => Err(again()),
                    Output::Absent => {
                        *slot = Output::Absent;
                        Err(missing())
                    }
                }
            }
        }
    }

    /// Close the process's stdin: now if no stream is attached, else by ending the stream's
    /// input (what the host sent so far is still delivered).
    pub fn close_stdin(&self) -> Result<()> {
        let mut io = lock(&self.io);
        match std::mem::replace(&mut io.stdin, Stdin::Closed) {
            Stdin::Waiting(fd) => drop(fd),
            Stdin::Attached(conn) => {
                // The stdin pump reads EOF from its connection, writes out what it holds and
                // closes the pipe.
                if let Err(e) = nix::sys::socket::shutdown(conn.as_raw_fd(), Shutdown::Read) {
                    log::debug!("shutdown of a stdin stream: {e}");
                }
            }
            Stdin::Closed => {}
            Stdin::Absent => {
                io.stdin = Stdin::Absent;
                return Err(Error::FailedPrecondition(if self.tty.is_some() {
                    "the process has a terminal, not a stdin stream".into()
                } else {
                    "the process has no stdin stream (not requested)".into()
                }));
            }
        }
        Ok(())
    }

    pub fn resize(&self, rows: u16, columns: u16) -> Result<()> {
        let tty = self
            .tty
            .as_ref()
            .ok_or_else(|| Error::FailedPrecondition("the process has no terminal".into()))?;
        let ws = libc::winsize { ws_row: rows, ws_col: columns, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points at `ws`.
        let r = unsafe { libc::ioctl(tty.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r < 0 {
            return Err(Error::internal("resizing the terminal", &std::io::Error::last_os_error()));
        }
        Ok(())
    }
}
