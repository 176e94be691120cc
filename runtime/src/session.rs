//! A container process (the container's own or an exec) seen from the host process that stands
//! for it: its stdio or terminal attached, the signals this host process gets passed on to it,
//! and its exit status once it ends, after its last output byte.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use husk_agent_protocol::agent as pb;
use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::stream::StreamKind;

use crate::agent::{ctx, ctx_forever, describe};
use crate::console;
use crate::signals;
use crate::stdio::{self, dup, guest_to_host, host_to_guest, open_stream, std_fds, OutputActivity};
use crate::terminal::RawTerminal;

/// How long the output of a process that exited may stay idle (nothing arriving, nothing being
/// written) before husk stops waiting for its end. The agent ends each stream once every holder
/// of the pipe closed it (the container's pid namespace dies with its init), so only an exec's
/// output that a background process holds stays open; output that a slow reader on the host is
/// still taking is waited for however long that takes, as it would be with runc.
const OUTPUT_GRACE: Duration = Duration::from_secs(10);

/// Where the process's terminal goes, when it has one.
#[derive(Debug, Clone)]
pub enum TerminalMode {
    /// No terminal: the host process's descriptors 0, 1 and 2 are the process's stdio.
    None,
    /// A pty whose master goes to this console socket (runc's --console-socket).
    ConsoleSocket(PathBuf),
    /// This host process's own terminal (`husk run` in a shell).
    Inherit,
}

impl TerminalMode {
    /// The terminal of a process: none without `terminal`; a pty for the console socket when
    /// one is given; else this host process's own terminal.
    pub fn for_process(terminal: bool, console_socket: Option<&Path>) -> Self {
        match (terminal, console_socket) {
            (false, _) => TerminalMode::None,
            (true, Some(socket)) => TerminalMode::ConsoleSocket(socket.to_path_buf()),
            (true, None) => TerminalMode::Inherit,
        }
    }
}

/// The guest process a session stands for, and the host terminal whose size its terminal
/// follows; what the signal-forwarding thread needs.
#[derive(Clone)]
struct Target {
    client: AgentClient,
    container: String,
    exec: String,
    tty_fd: Option<RawFd>,
}

impl Target {
    /// Give the guest terminal the host terminal's size (when it has one).
    fn resize(&self) {
        let Some((rows, columns)) = self.tty_fd.and_then(console::window_size) else { return };
        if rows == 0 || columns == 0 {
            return;
        }
        let mut req = pb::TtyWinResizeRequest::new();
        req.container_id = self.container.clone();
        req.exec_id = self.exec.clone();
        req.rows = rows.into();
        req.columns = columns.into();
        if let Err(e) = self.client.tty_win_resize(ctx(), &req) {
            log::debug!("resizing the terminal of {}: {}", self.container, describe(&e));
        }
    }

    fn signal(&self, signum: i32) {
        let mut req = pb::SignalProcessRequest::new();
        req.container_id = self.container.clone();
        req.exec_id = self.exec.clone();
        req.signal = signum as u32;
        if let Err(e) = self.client.signal_process(ctx(), &req) {
            log::debug!("forwarding signal {signum}: {}", describe(&e));
        }
    }
}

/// An attached process.
pub struct Session {
    target: Target,
    output: Vec<JoinHandle<()>>,
    activity: Arc<OutputActivity>,
    _tty: Option<std::fs::File>,
    _raw: Option<RawTerminal>,
}

impl Session {
    /// Attach to the stdio of process `exec` (empty: the container's own) of `container`.
    /// `control`: this is a background husk process, a session leader without a terminal: the
    /// host pty becomes its controlling terminal (it is then told of resizes by SIGWINCH), and
    /// it lets go of the caller's stdio, which the process does not use (as runc's container
    /// process, whose stdio becomes its pty, does not hold it).
    pub fn attach(
        client: AgentClient,
        vsock: &Path,
        container: &str,
        exec: &str,
        mode: &TerminalMode,
        control: bool,
    ) -> anyhow::Result<Self> {
        let target =
            Target { client, container: container.into(), exec: exec.into(), tty_fd: None };
        let activity = Arc::new(OutputActivity::default());
        let mut session = Session { target, output: vec![], activity, _tty: None, _raw: None };
        match mode {
            TerminalMode::None => {
                session.output =
                    stdio::attach_pipes(vsock, container, exec, std_fds(), &session.activity)?;
            }
            TerminalMode::ConsoleSocket(socket) => {
                let pty = console::pty_to_console_socket(socket, control)?;
                let stream = open_stream(vsock, container, exec, StreamKind::Tty)?;
                host_to_guest(pty.slave.try_clone()?, stream.try_clone()?);
                let output = pty.slave.try_clone()?;
                session.output = vec![guest_to_host(stream, output, &session.activity)];
                session.target.tty_fd = Some(pty.slave.as_raw_fd());
                session._tty = Some(pty.slave);
                if control {
                    stdio::release_std_fds().context("cannot release the caller's stdio")?;
                }
            }
            TerminalMode::Inherit => {
                let [input, output, _] = std_fds();
                session._raw = RawTerminal::enable(input.as_fd())
                    .context("cannot put the terminal in raw mode")?;
                let stream = open_stream(vsock, container, exec, StreamKind::Tty)?;
                host_to_guest(dup(input)?, stream.try_clone()?);
                session.output = vec![guest_to_host(stream, dup(output)?, &session.activity)];
                session.target.tty_fd = Some(input.as_raw_fd());
                session.target.resize();
            }
        }
        Ok(session)
    }

    /// Pass the signals this process gets (blocked beforehand with
    /// [`signals::block_forwarded`]) on to the guest process, and resizes to its terminal.
    pub fn forward_signals(&self) {
        let target = self.target.clone();
        crate::threads::spawn("signals", move || loop {
            match signals::wait_forwarded() {
                libc::SIGWINCH => target.resize(),
                signum => target.signal(signum),
            }
        });
    }

    /// Wait for the process to exit and for its output to reach the host.
    pub fn wait(mut self) -> anyhow::Result<pb::WaitProcessResponse> {
        let mut req = pb::WaitProcessRequest::new();
        req.container_id = self.target.container.clone();
        req.exec_id = self.target.exec.clone();
        let status = self
            .target
            .client
            .wait_process(ctx_forever(), &req)
            .map_err(|e| anyhow::anyhow!("waiting for the process: {}", describe(&e)))?;
        let (done, all_out) = mpsc::channel();
        let output = std::mem::take(&mut self.output);
        crate::threads::spawn("output-join", move || {
            for pump in output {
                let _ = pump.join();
            }
            let _ = done.send(());
        });
        loop {
            let moved = self.activity.moved();
            match all_out.recv_timeout(OUTPUT_GRACE) {
                Err(mpsc::RecvTimeoutError::Timeout) if self.activity.busy_since(moved) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    log::warn!(
                        "the output of {} stayed open and idle {OUTPUT_GRACE:?} after it exited",
                        self.target.container
                    );
                    break;
                }
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        Ok(status)
    }
}
