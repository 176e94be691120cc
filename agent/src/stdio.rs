//! The stdio stream server: one connection per stream, a header line naming the process and the
//! stream (`husk_agent_protocol::stream`), then the bytes, copied by `pump` with EOF passed on
//! in both directions (see the protocol crate's docs for the contract).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use husk_agent_protocol::stream::{reply_err, StreamHeader, REPLY_OK};
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
            let raw = std::os::fd::AsRawFd::as_raw_fd(&conn);
            let _ = shutdown(raw, Shutdown::Write);
            // Output is over (the terminal is closed): stop copying input too.
            let _ = shutdown(raw, Shutdown::Read);
            if let Ok(t) = input {
                let _ = t.join();
            }
        }
    }
}
