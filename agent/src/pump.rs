//! Copying one direction of a stdio stream: from a source descriptor to a destination, through
//! a bounded buffer, reading only while there is room (so a slow reader holds back the writer:
//! back-pressure) and reporting how the copy ended.

use std::os::fd::{AsFd, BorrowedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

const BUF: usize = 64 * 1024;

/// Why a copy stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The source ended (EOF; for a pty master, EIO once no one holds the terminal) and
    /// everything read from it was written.
    SourceEof,
    /// The destination cannot take more (its reader is gone).
    DestinationClosed,
}

/// Copy from `src` to `dst` until one of them ends. Both are switched to non-blocking mode.
pub fn pump(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> nix::Result<End> {
    for fd in [src, dst] {
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    let mut buf = vec![0u8; BUF];
    let (mut start, mut end) = (0, 0);
    let mut eof = false;
    loop {
        if eof && start == end {
            return Ok(End::SourceEof);
        }
        if start == end {
            (start, end) = (0, 0);
        }
        let want_read = !eof && end < BUF;
        let want_write = start < end;
        // The destination is always polled: POLLERR/POLLHUP say its reader is gone even while
        // there is nothing to write. The source only while there is room for what it has.
        let dst_events = if want_write { PollFlags::POLLOUT } else { PollFlags::empty() };
        let mut fds = vec![PollFd::new(dst.as_fd(), dst_events)];
        if want_read {
            fds.push(PollFd::new(src.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let dst_ready = fds[0].revents().unwrap_or(PollFlags::empty());
        let src_ready = fds.get(1).and_then(|f| f.revents()).unwrap_or(PollFlags::empty());
        if want_read && !src_ready.is_empty() {
            match nix::unistd::read(src, &mut buf[end..]) {
                Ok(0) => eof = true,
                Ok(n) => end += n,
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                // A pty master reads EIO once the last holder of the terminal closed it.
                Err(Errno::EIO) => eof = true,
                Err(e) => return Err(e),
            }
        }
        if start < end {
            match nix::unistd::write(dst, &buf[start..end]) {
                Ok(n) => start += n,
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) | Err(Errno::EIO) => {
                    return Ok(End::DestinationClosed)
                }
                Err(e) => return Err(e),
            }
        } else if dst_ready.intersects(PollFlags::POLLERR | PollFlags::POLLHUP) {
            return Ok(End::DestinationClosed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn copies_everything_then_reports_eof() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (conn, mut host) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expected = data.clone();
        let writer = std::thread::spawn(move || std::fs::File::from(w).write_all(&data).unwrap());
        // The copier drops its connection when done: the host reads EOF.
        let copier = std::thread::spawn(move || pump(r.as_fd(), conn.as_fd()).unwrap());
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(copier.join().unwrap(), End::SourceEof);
        assert!(got == expected, "{} bytes arrived of {}", got.len(), expected.len());
    }

    #[test]
    fn a_slow_reader_holds_the_writer_back_and_a_gone_one_ends_the_copy() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (conn, host) = UnixStream::pair().unwrap();
        let copier = std::thread::spawn(move || pump(r.as_fd(), conn.as_fd()).unwrap());
        // Nobody reads the host side: after the socket buffers, the pump's buffer and the pipe
        // fill up, the writer cannot write any more.
        nix::fcntl::fcntl(&w, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        let mut w = std::fs::File::from(w);
        let chunk = [0u8; 4096];
        let mut written = 0usize;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match w.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                    if w.write(&chunk).is_err() {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
            assert!(std::time::Instant::now() < deadline, "the writer was never held back");
        }
        assert!(written < 16 << 20, "{written} bytes buffered");
        drop(host);
        assert_eq!(copier.join().unwrap(), End::DestinationClosed);
    }

    #[test]
    fn a_closed_pipe_reader_ends_an_input_copy() {
        let (conn, mut host) = UnixStream::pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let copier = std::thread::spawn(move || pump(conn.as_fd(), w.as_fd()).unwrap());
        host.write_all(b"abc").unwrap();
        let mut got = [0u8; 3];
        std::fs::File::from(r.try_clone().unwrap()).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        // The process closed its stdin: the copy ends without waiting for the host.
        drop(r);
        assert_eq!(copier.join().unwrap(), End::DestinationClosed);
    }
}
