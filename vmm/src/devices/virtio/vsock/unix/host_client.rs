//! A host client that connected to the vsock socket and has not yet said which guest port it
//! wants: it must send one line, `CONNECT <port>\n`. The line is read one byte at a time so that
//! bytes the client sends after the newline stay in the socket for the guest; its length is
//! bounded, and a malformed line or a client that hangs up before the newline is dropped.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// The longest line accepted, newline included (`CONNECT 4294967295\r\n` is 20 bytes).
const MAX_LINE: usize = 32;

/// What reading the line gave so far.
#[derive(Debug, PartialEq, Eq)]
pub enum LineStatus {
    /// More bytes are needed.
    Incomplete,
    /// The client asked for this guest port.
    Connect(u32),
    /// The client must be dropped.
    Rejected(String),
}

/// A host client waiting to send its `CONNECT` line.
#[derive(Debug)]
pub struct HostClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

impl HostClient {
    /// Track `stream` (non-blocking) until `deadline`.
    pub fn new(stream: UnixStream, deadline: Instant) -> Self {
        HostClient { stream, line: Vec::with_capacity(MAX_LINE), deadline }
    }

    /// The client socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// When the client will be dropped if its line is not complete.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Give up the socket (the line is complete).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Read what the client sent, stopping right after the newline.
    pub fn read_line(&mut self) -> LineStatus {
        let mut byte = [0u8; 1];
        while self.line.len() < MAX_LINE {
            match self.stream.read(&mut byte) {
                Ok(0) => return LineStatus::Rejected("client hung up before the newline".into()),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineStatus::Incomplete,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return LineStatus::Rejected(format!("read failed: {e}")),
            }
        }
        LineStatus::Rejected(format!("line longer than {MAX_LINE} bytes"))
    }
}

/// Parse `CONNECT <port>` (the newline already stripped; a trailing CR is tolerated).
fn parse_connect(line: &[u8]) -> LineStatus {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let parsed = std::str::from_utf8(line).ok().and_then(|text| {
        let mut words = text.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("CONNECT"), Some(port), None) if port.bytes().all(|b| b.is_ascii_digit()) => {
                port.parse::<u32>().ok()
            }
            _ => None,
        }
    });
    match parsed {
        Some(port) => LineStatus::Connect(port),
        None => LineStatus::Rejected(format!("malformed line {:?}", String::from_utf8_lossy(line))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn client() -> (UnixStream, HostClient) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (theirs, HostClient::new(ours, Instant::now() + Duration::from_secs(1)))
    }

    #[test]
    fn parses_connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), LineStatus::Connect(1234));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), LineStatus::Connect(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"CONNECT 4294967296",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 1 2",
            b"CONNECT  1",
            b"connect 1",
            b"LISTEN 1",
            b"CONNECT \xff",
            b"",
        ] {
            assert!(matches!(parse_connect(bad), LineStatus::Rejected(_)), "{bad:?}");
        }
    }

    #[test]
    fn line_arrives_in_pieces_and_leaves_the_rest_unread() {
        let (mut peer, mut client) = client();
        assert_eq!(client.read_line(), LineStatus::Incomplete);
        peer.write_all(b"CONN").unwrap();
        assert_eq!(client.read_line(), LineStatus::Incomplete);
        peer.write_all(b"ECT 52\npayload").unwrap();
        assert_eq!(client.read_line(), LineStatus::Connect(52));
        let mut stream = client.into_stream();
        let mut rest = [0u8; 7];
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"payload");
    }

    #[test]
    fn overlong_line_is_rejected() {
        let (mut peer, mut client) = client();
        peer.write_all(&[b'C'; 100]).unwrap();
        assert!(matches!(client.read_line(), LineStatus::Rejected(_)));
    }

    #[test]
    fn hang_up_before_newline_is_rejected() {
        let (mut peer, mut client) = client();
        peer.write_all(b"CONNECT 5").unwrap();
        drop(peer);
        assert!(matches!(client.read_line(), LineStatus::Rejected(_)));
    }
}
