//! The stdio stream server: one connection per stream, a header line naming the process and the
//! stream (`husk_agent_protocol::stream`), then the bytes, copied by `pump` with EOF passed on
//! in both directions (see the protocol crate's docs for the contract).
//!
//! An output stream is closed only after the host closed its end: the guest kernel gives a
//! closed vsock socket 8 s (`VSOCK_CLOSE_TIMEOUT`) before it resets it, discarding whatever the
//! host has not taken yet, and a slow reader on the host (Docker's log pipeline under load)
//! can take longer than that for the last few hundred KiB.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use husk_agent_protocol::stream::{reply_err, StreamHeader, REPLY_OK};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{shutdown, Shutdown};

use crate::container::process::Attach;
use crate::container::Containers;
use crate::listen::{Conn, Listener};
use crate::pump::pump;

/// How long a new connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Accept stream connections on `listener` forever (on a thread of its own).
pub fn serve(listener: Listener, containers: Arc<Containers>) -> std::io::Result<()> {
    std::thread::Builder::new().name("stdio".into()).spawn(move || loop {
        match listener.accept() {
            Ok(conn) => {
                let containers = containers.clone();
                let spawned = std::thread::Builder::new()
                    .name("stream".into())
                    .spawn(move || handle(conn, &containers));
                if let Err(e) = spawned {
                    log::error!("stdio: no thread for a stream: {e}");
                }
            }
            Err(e) => {
                // EMFILE and the like: do not spin.
                log::error!("stdio: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })?;
    Ok(())
}

fn handle(mut conn: Conn, containers: &Containers) {
    if let Err(e) = conn.set_read_timeout(Some(HEADER_TIMEOUT)) {
        log::warn!("stdio: {e}");
        return;
    }
    let header = match StreamHeader::read_from(&mut conn) {
        Ok(h) => h,
        Err(e) => {
            let _ = conn.write_all(&reply_err(&crate::error::chain(&e)));
            return;
        }
    };
    let fd: OwnedFd = match conn.try_clone_fd() {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!("stdio: {e}");
            return;
        }
    };
    let attached = containers
        .process(&header.container_id, &header.exec_id)
        .and_then(|p| p.attach(header.kind, &fd));
    let attach = match attached {
        Ok(a) => a,
        Err(e) => {
            let _ = conn.write_all(&reply_err(&e.to_string()));
            return;
        }
    };
    if conn.write_all(REPLY_OK).is_err() || conn.set_read_timeout(None).is_err() {
        return;
    }
    let name = format!("{}/{} {}", header.container_id, header.exec_id, header.kind);
    drop(conn);
    run(attach, fd, &name);
}

/// Copy a stream until it ends, passing EOF on.
fn run(attach: Attach, conn: OwnedFd, name: &str) {
    match attach {
        Attach::Output(src) => {
            let end = pump(src.as_fd(), conn.as_fd());
            log::debug!("stream {name}: {end:?}");
            // The process's output ended: so does the stream (the host reads EOF).
            let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&conn), Shutdown::Write);
            wait_for_host_close(conn.as_fd());
        }
        Attach::Input(dst) => {
            let end = pump(conn.as_fd(), dst.as_fd());
            log::debug!("stream {name}: {end:?}");
            // Dropping `dst` closes the process's stdin: it reads EOF.
        }
        Attach::Tty(master_out, master_in) => {
            let input_conn = match conn.try_clone() {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("stream {name}: {e}");
                    return;
                }
            };
            let input = std::thread::Builder::new().name("tty-in".into()).spawn(move || {
                // The host ending its input ends only the input: output goes on.
                pump(input_conn.as_fd(), master_in.as_fd())
            });
            let end = pump(master_out.as_fd(), conn.as_fd());
            log::debug!("stream {name}: {end:?}");
            let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&conn), Shutdown::Write);
            // The input copy ends when the host closes its end, which it does once it has read
            // all the output.
            if let Ok(t) = input {
                let _ = t.join();
            }
        }
    }
}

/// Wait until the host closed its end of `conn` (EOF or a reset), discarding anything it still
/// sends.
fn wait_for_host_close(conn: BorrowedFd<'_>) {
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [PollFd::new(conn, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
        match nix::unistd::read(conn, &mut buf) {
            Ok(0) => return,
            Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn an_ended_output_stream_stays_open_until_the_host_closes_it() {
        let (guest, mut host) = UnixStream::pair().unwrap();
        let closer = std::thread::spawn(move || {
            let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&guest), Shutdown::Write);
            wait_for_host_close(guest.as_fd());
        });
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!closer.is_finished(), "the guest end closed before the host's");
        drop(host);
        closer.join().unwrap();
    }
}
