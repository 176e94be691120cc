//! A pseudo-terminal for tests that drive a terminal program (`docker run -it`, `docker exec
//! -it`) as a person at a terminal would: the program gets the pty's slave side as its stdio and
//! controlling terminal, the test reads and types on the master side and resizes it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A pty pair; the slave side goes to the program started with [`Pty::spawn`].
pub struct Pty {
    master: OwnedFd,
    slave: Option<OwnedFd>,
    /// What the program printed and no [`Pty::expect`] has consumed yet.
    unread: Vec<u8>,
}

impl Pty {
    /// A new pty of `rows` x `cols`.
    pub fn open(rows: u16, cols: u16) -> Self {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two new descriptors; no name, termios or size are passed.
        let r = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty succeeded: both are new descriptors this process owns.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let pty = Pty { master, slave: Some(slave), unread: Vec::new() };
        pty.resize(rows, cols);
        pty
    }

    /// Set the terminal's size (the program gets SIGWINCH, as from a resized terminal window).
    pub fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    /// Start `cmd` in a new session with the slave side as its stdio and controlling terminal.
    /// One program per pty. `cmd` is dropped here with this process's last slave descriptors, so
    /// that the end of the program's output shows on the master side.
    pub fn spawn(&mut self, mut cmd: Command) -> Child {
        let slave = self.slave.take().expect("one program per pty");
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().expect("start the terminal program")
    }

    /// Type `text`.
    pub fn send(&self, text: &str) {
        let mut bytes = text.as_bytes();
        while !bytes.is_empty() {
            // SAFETY: writes from a live buffer of the given length.
            let n =
                unsafe { libc::write(self.master.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            assert!(n > 0, "writing to the pty: {}", std::io::Error::last_os_error());
            bytes = &bytes[n as usize..];
        }
    }

    /// Read what the program prints, at most until `deadline`; false at the end of its output
    /// (the program and everything holding the slave side are gone).
    fn read_some(&mut self, deadline: Instant) -> bool {
        let left =
            deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(200));
        let mut pfd =
            libc::pollfd { fd: self.master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one pollfd that lives on the stack.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
        if r <= 0 {
            return true;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: reads into a live buffer of the given length.
        let n = unsafe { libc::read(self.master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // EIO: no slave side open any more.
            return false;
        }
        self.unread.extend_from_slice(&buf[..n as usize]);
        true
    }

    /// Wait until the program has printed `needle`; returns its output up to and including it
    /// (consumed: the next call looks only at what follows).
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = String::from_utf8_lossy(&self.unread).into_owned();
            if let Some(at) = text.find(needle) {
                let end = at + needle.len();
                self.unread = text.as_bytes()[end..].to_vec();
                return text[..end].to_string();
            }
            let open = self.read_some(deadline);
            assert!(
                open && Instant::now() < deadline,
                "the terminal never showed {needle:?} ({}); it showed: {text:?}",
                if open { "timed out" } else { "the program's output ended" }
            );
        }
    }

    /// Run `command` in the shell on the terminal and return what it printed, trimmed: types
    /// `echo "=[$(command)]=$((40+2))"` and waits for the `]=42` that only the output has (the
    /// echo of the typed line shows `$((40+2))`).
    pub fn query(&mut self, command: &str, timeout: Duration) -> String {
        self.unread.clear();
        self.send(&format!("echo \"=[$({command})]=$((40+2))\"\r"));
        let seen = self.expect("]=42", timeout);
        let body = &seen[..seen.len() - "]=42".len()];
        let start = body.rfind("=[").map_or(0, |i| i + 2);
        body[start..].trim().to_string()
    }

    /// Wait for `child` to exit, reading its output meanwhile (so that it never blocks on a full
    /// terminal); its exit code.
    pub fn wait(&mut self, child: &mut Child, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait for the terminal program") {
                return status
                    .code()
                    .unwrap_or_else(|| panic!("the terminal program was killed: {status}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the terminal program did not exit within {timeout:?}; it showed: {:?}",
                    String::from_utf8_lossy(&self.unread)
                );
            }
            if !self.read_some(deadline) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
