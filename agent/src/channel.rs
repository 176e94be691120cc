//! The private channel between the agent and a container process it starts (the
//! `husk-agent init` helper, until it executes the container's program): length-prefixed JSON
//! messages on a Unix stream socket pair, with file descriptors passed alongside a message.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest message (an OCI spec with a big seccomp profile is well under it).
pub const MAX_MESSAGE: usize = 4 << 20;

/// The most descriptors passed with one message.
const MAX_FDS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the other side closed the channel")]
    Eof,
    #[error("timed out waiting for the other side")]
    TimedOut,
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    #[error("encoding or decoding a message")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

pub struct Channel {
    sock: UnixStream,
}

impl Channel {
    /// A connected pair (close-on-exec).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Channel { sock: a }, Channel { sock: b }))
    }

    pub fn from_stream(sock: UnixStream) -> Self {
        Self { sock }
    }

    pub fn into_fd(self) -> OwnedFd {
        self.sock.into()
    }

    pub fn set_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// Send `msg`, with `fds` attached.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let body = serde_json::to_vec(msg)?;
        if body.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLarge(body.len()));
        }
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
        // The descriptors travel with the first byte; the rest may follow in more writes.
        let sent = loop {
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &[IoSlice::new(&frame)],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
        };
        (&self.sock).write_all(&frame[sent..])?;
        Ok(())
    }

    /// Receive one message and the descriptors that came with it.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let mut len = [0u8; 4];
        let mut got = 0;
        let mut fds = Vec::new();
        while got < 4 {
            let mut cmsg = nix::cmsg_space!([i32; MAX_FDS]);
            let mut iov = [IoSliceMut::new(&mut len[got..])];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => msg,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Err(ChannelError::TimedOut),
                Err(e) => return Err(io::Error::from(e).into()),
            };
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(received) = c {
                    // SAFETY: SCM_RIGHTS just installed these descriptors in this process;
                    // nothing else owns them.
                    fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            if msg.bytes == 0 {
                return Err(ChannelError::Eof);
            }
            got += msg.bytes;
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_MESSAGE {
            return Err(ChannelError::TooLarge(len));
        }
        let mut body = vec![0u8; len];
        (&self.sock).read_exact(&mut body).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ChannelError::Eof,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ChannelError::TimedOut,
            _ => e.into(),
        })?;
        Ok((serde_json::from_slice(&body)?, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_and_descriptors() {
        let (a, b) = Channel::pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let big = "x".repeat(300_000);
        let sender = std::thread::spawn(move || {
            a.send(&("hello", 7), &[r.as_fd()]).unwrap();
            a.send(&big, &[]).unwrap();
        });
        let ((word, n), fds): ((String, u32), _) = b.recv().unwrap();
        assert_eq!((word.as_str(), n), ("hello", 7));
        assert_eq!(fds.len(), 1);
        // The received descriptor is the pipe's read end.
        nix::unistd::write(&w, b"z").unwrap();
        let mut byte = [0u8; 1];
        nix::unistd::read(&fds[0], &mut byte).unwrap();
        assert_eq!(&byte, b"z");
        let (s, fds): (String, _) = b.recv().unwrap();
        assert_eq!(s.len(), 300_000);
        assert!(fds.is_empty());
        sender.join().unwrap();
        assert!(matches!(b.recv::<String>(), Err(ChannelError::Eof)));
    }

    #[test]
    fn timeouts_and_oversized_frames() {
        let (a, b) = Channel::pair().unwrap();
        b.set_timeout(Some(std::time::Duration::from_millis(20))).unwrap();
        assert!(matches!(b.recv::<String>(), Err(ChannelError::TimedOut)));
        (&a.sock).write_all(&(u32::MAX).to_le_bytes()).unwrap();
        assert!(matches!(b.recv::<String>(), Err(ChannelError::TooLarge(_))));
    }
}
