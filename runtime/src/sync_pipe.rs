//! How a command that starts a background husk process (`create`'s VM process, `exec
//! --detach`'s process) learns whether it got going: a pipe whose write end the child inherits
//! (its number in `HUSK_SYNC_FD`); the child writes one JSON line, `{"ok":true}` or
//! `{"error":"..."}`, and closes it. EOF without a line means the child died first.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The environment variable that passes the write end's number to the child.
const ENV: &str = "HUSK_SYNC_FD";

#[derive(Serialize, Deserialize)]
struct Report {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The parent's end.
struct SyncReader {
    read: File,
    write: Option<OwnedFd>,
}

impl SyncReader {
    fn new() -> std::io::Result<Self> {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned here.
        let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(SyncReader { read, write: Some(write) })
    }

    /// Let `cmd`'s child inherit the write end.
    fn pass_to(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let fd = self.write.as_ref().expect("not yet spawned").as_raw_fd();
        cmd.env(ENV, fd.to_string());
        // SAFETY: fcntl is async-signal-safe; it clears close-on-exec on the descriptor the
        // child must keep.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }

    /// Wait for the child's report (close our copy of the write end first, so that the child's
    /// death reads as EOF).
    fn wait(mut self) -> Result<(), String> {
        drop(self.write.take());
        let mut text = String::new();
        if let Err(e) = self.read.read_to_string(&mut text) {
            return Err(format!("reading the child's report: {e}"));
        }
        match serde_json::from_str::<Report>(text.trim()) {
            Ok(Report { error: None }) => Ok(()),
            Ok(Report { error: Some(e) }) => Err(e),
            Err(_) => Err("it exited before it was ready (see the log)".into()),
        }
    }
}

/// Start `cmd`, a background husk process that reports through a sync pipe, and wait for its
/// report. `what` names it in errors. A child that failed is killed and reaped; on success it
/// runs on, for the caller's caller (a subreaper) to reap.
pub fn spawn_reported(mut cmd: Command, what: &str) -> Result<std::process::Child, String> {
    let sync = SyncReader::new().map_err(|e| format!("cannot create a pipe: {e}"))?;
    sync.pass_to(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {what}: {e}"))?;
    if let Err(e) = sync.wait() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(child)
}

/// The child's end, from the environment.
pub struct SyncWriter(File);

impl SyncWriter {
    /// The write end passed in `HUSK_SYNC_FD`, if any (taken out of the environment so that
    /// nothing started later inherits the number).
    pub fn from_env() -> Option<Self> {
        let fd: RawFd = std::env::var(ENV).ok()?.parse().ok()?;
        std::env::remove_var(ENV);
        // SAFETY: F_GETFD only checks that the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return None;
        }
        // SAFETY: the parent passed this descriptor for this process to own; it is open.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: F_SETFD on a descriptor this process owns: nothing it starts inherits it.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Some(SyncWriter(file))
    }

    /// Report success or failure and close the pipe; false when the parent is gone (nobody
    /// will learn of this process, so it should not go on).
    pub fn report(mut self, result: Result<(), String>) -> bool {
        let report = Report { error: result.err() };
        let mut line = serde_json::to_string(&report).expect("a report serializes");
        line.push('\n');
        self.0.write_all(line.as_bytes()).is_ok()
    }
}
