//! Reading one short header line from a stream without reading past its newline: the bytes
//! after it belong to whoever uses the stream next (a ttrpc client, a process's stdio).

use std::io::{self, Read};

/// Why no line could be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("the peer closed the connection before a full line")]
    Eof,
    #[error("the line is longer than {0} bytes")]
    TooLong(usize),
    #[error("the line is not UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Read bytes one at a time up to and including `\n`; return the line without it (and without a
/// trailing `\r`). At most `max` bytes, the newline included.
pub fn read_line(reader: &mut impl Read, max: usize) -> Result<String, LineError> {
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match reader.read(&mut byte) {
            Ok(0) => return Err(LineError::Eof),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        if byte[0] == b'\n' {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return String::from_utf8(line).map_err(|_| LineError::NotUtf8);
        }
        line.push(byte[0]);
        if line.len() >= max {
            return Err(LineError::TooLong(max));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_at_the_newline() {
        let mut input: &[u8] = b"OK 5\r\nrest";
        assert_eq!(read_line(&mut input, 64).unwrap(), "OK 5");
        assert_eq!(input, b"rest");
    }

    #[test]
    fn errors() {
        assert!(matches!(read_line(&mut &b"OK"[..], 64), Err(LineError::Eof)));
        assert!(matches!(read_line(&mut &b"abcdef\n"[..], 4), Err(LineError::TooLong(4))));
        assert!(matches!(read_line(&mut &b"\xff\n"[..], 4), Err(LineError::NotUtf8)));
        // A line of exactly `max` bytes with its newline fits.
        assert_eq!(read_line(&mut &b"abc\n"[..], 4).unwrap(), "abc");
    }
}
