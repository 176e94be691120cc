//! The stdio stream header: the one line a host sends on a new connection to the agent's stdio
//! port, and the agent's answer (see the crate docs for what each stream carries).
//!
//! ```text
//! host:  HUSK-STDIO <container-id> <exec-id or -> <stdin|stdout|stderr|tty>\n
//! agent: OK\n                      (then the connection is the stream)
//!    or: ERR <reason>\n            (then the agent closes the connection)
//! ```
//!
//! `-` names the container's own process (the empty exec id of the ttrpc requests). Ids follow
//! [`crate::valid_id`], so the words never contain spaces.

use std::fmt;
use std::io::{self, Read, Write};

use crate::line::{read_line, LineError};
use crate::valid_id;

/// The first word of a header line.
pub const MAGIC: &str = "HUSK-STDIO";

/// The longest header line, newline included.
pub const MAX_HEADER: usize = MAGIC.len() + 2 * (crate::MAX_ID_LEN + 1) + 8 + 1;

/// The longest answer line, newline included.
pub const MAX_REPLY: usize = 1024;

/// Which of a process's streams a connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    /// The terminal (pty master), both directions.
    Tty,
}

impl StreamKind {
    fn word(self) -> &'static str {
        match self {
            Self::Stdin => "stdin",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Tty => "tty",
        }
    }
}

impl fmt::Display for StreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// A parsed header: which process and which of its streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub container_id: String,
    /// Empty for the container's own process.
    pub exec_id: String,
    pub kind: StreamKind,
}

/// Why a header or an answer was not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the stream header")]
    Read(#[source] LineError),
    #[error("malformed stream header {0:?} (expected `{MAGIC} <container-id> <exec-id|-> <stdin|stdout|stderr|tty>`)")]
    Malformed(String),
    #[error("invalid id {0:?} in the stream header")]
    BadId(String),
    #[error("sending the stream header")]
    Send(#[source] io::Error),
    #[error("reading the agent's answer to the stream header")]
    Reply(#[source] LineError),
    #[error("the agent refused the stream: {0}")]
    Refused(String),
    #[error("unexpected answer to the stream header: {0:?}")]
    BadReply(String),
}

impl StreamHeader {
    /// The header line, newline included.
    pub fn line(&self) -> String {
        let exec = if self.exec_id.is_empty() { "-" } else { &self.exec_id };
        format!("{MAGIC} {} {exec} {}\n", self.container_id, self.kind)
    }

    /// Parse a header line (without its newline).
    pub fn parse(line: &str) -> Result<Self, StreamError> {
        let malformed = || StreamError::Malformed(line.to_string());
        let words: Vec<&str> = line.split(' ').collect();
        let [magic, container, exec, kind] = words[..] else { return Err(malformed()) };
        if magic != MAGIC {
            return Err(malformed());
        }
        let kind = match kind {
            "stdin" => StreamKind::Stdin,
            "stdout" => StreamKind::Stdout,
            "stderr" => StreamKind::Stderr,
            "tty" => StreamKind::Tty,
            _ => return Err(malformed()),
        };
        if !valid_id(container) {
            return Err(StreamError::BadId(container.to_string()));
        }
        let exec_id = match exec {
            "-" => String::new(),
            id if valid_id(id) => id.to_string(),
            id => return Err(StreamError::BadId(id.to_string())),
        };
        Ok(Self { container_id: container.to_string(), exec_id, kind })
    }

    /// The agent's side: read and parse the header from a new connection.
    pub fn read_from(conn: &mut impl Read) -> Result<Self, StreamError> {
        let line = read_line(conn, MAX_HEADER).map_err(StreamError::Read)?;
        Self::parse(&line)
    }

    /// The host's side: send the header on a new connection and wait for the agent's answer;
    /// on success the connection is the stream.
    pub fn open(&self, conn: &mut (impl Read + Write)) -> Result<(), StreamError> {
        conn.write_all(self.line().as_bytes()).map_err(StreamError::Send)?;
        let reply = read_line(conn, MAX_REPLY).map_err(StreamError::Reply)?;
        if reply == "OK" {
            Ok(())
        } else if let Some(reason) = reply.strip_prefix("ERR ") {
            Err(StreamError::Refused(reason.to_string()))
        } else {
            Err(StreamError::BadReply(reply))
        }
    }
}

/// The agent's answer accepting a stream.
pub const REPLY_OK: &[u8] = b"OK\n";

/// The agent's answer refusing a stream, `reason` made one line and cut to fit.
pub fn reply_err(reason: &str) -> Vec<u8> {
    let mut line: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    while line.len() > MAX_REPLY - 5 {
        line.pop();
    }
    format!("ERR {line}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(exec: &str, kind: StreamKind) -> StreamHeader {
        StreamHeader { container_id: "c1".into(), exec_id: exec.into(), kind }
    }

    #[test]
    fn round_trip() {
        for kind in [StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr, StreamKind::Tty] {
            for exec in ["", "e-1"] {
                let h = header(exec, kind);
                let line = h.line();
                assert!(line.len() <= MAX_HEADER);
                assert_eq!(StreamHeader::read_from(&mut line.as_bytes()).unwrap(), h);
            }
        }
        assert_eq!(header("", StreamKind::Tty).line(), "HUSK-STDIO c1 - tty\n");
        let longest = StreamHeader {
            container_id: "c".repeat(crate::MAX_ID_LEN),
            exec_id: "e".repeat(crate::MAX_ID_LEN),
            kind: StreamKind::Stdout,
        };
        assert_eq!(StreamHeader::read_from(&mut longest.line().as_bytes()).unwrap(), longest);
    }

    #[test]
    fn bad_headers() {
        for bad in [
            "",
            "HUSK-STDIO c1 - ",
            "HUSK-STDIO c1 - stdin extra",
            "husk-stdio c1 - stdin",
            "HUSK-STDIO c1 - STDIN",
        ] {
            assert!(matches!(StreamHeader::parse(bad), Err(StreamError::Malformed(_))), "{bad:?}");
        }
        for bad in [
            "HUSK-STDIO ../x - stdin",
            "HUSK-STDIO c1 -x stdin",
            "HUSK-STDIO - - stdin",
            "HUSK-STDIO c1  stdin",
        ] {
            assert!(matches!(StreamHeader::parse(bad), Err(StreamError::BadId(_))), "{bad:?}");
        }
    }

    /// A duplex in-memory peer: reads come from `input`, writes go to `output`.
    struct Peer<'a> {
        input: &'a [u8],
        output: Vec<u8>,
    }

    impl Read for Peer<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Peer<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn open_reads_the_answer() {
        let h = header("e1", StreamKind::Stdout);
        let mut ok = Peer { input: b"OK\ndata", output: Vec::new() };
        h.open(&mut ok).unwrap();
        assert_eq!(ok.output, b"HUSK-STDIO c1 e1 stdout\n");
        assert_eq!(ok.input, b"data");

        let refusal = reply_err("no such\ncontainer");
        let mut refused = Peer { input: &refusal, output: Vec::new() };
        let err = h.open(&mut refused).unwrap_err();
        assert!(matches!(&err, StreamError::Refused(r) if r == "no such container"), "{err}");

        let mut garbage = Peer { input: b"WHAT\n", output: Vec::new() };
        assert!(matches!(h.open(&mut garbage), Err(StreamError::BadReply(_))));

        assert!(reply_err(&"x".repeat(5000)).len() <= MAX_REPLY);
    }
}
