//! The serial console's file output, bounded: the guest decides how much it prints, so a file
//! that grew with it would let a guest (a compromised kernel, or a container that makes the
//! kernel warn in a loop) fill the host's disk, or the host's memory where the file is on a
//! tmpfs such as /run. At [`CONSOLE_FILE_LIMIT`] bytes the file becomes `<file>.1`, replacing
//! the previous one, and a new file starts: the newest output is always kept, and at most
//! twice the limit is on the host.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// How large the console file grows before it is rotated.
pub const CONSOLE_FILE_LIMIT: u64 = 1 << 20;

/// A console file rotated at a size limit.
pub struct ConsoleFile {
    path: PathBuf,
    file: File,
    written: u64,
    limit: u64,
}

impl ConsoleFile {
    /// Create (or truncate) `path`, rotated at [`CONSOLE_FILE_LIMIT`] bytes.
    pub fn create(path: &Path) -> io::Result<Self> {
        Self::with_limit(path, CONSOLE_FILE_LIMIT)
    }

    fn with_limit(path: &Path, limit: u64) -> io::Result<Self> {
        Ok(ConsoleFile { path: path.to_path_buf(), file: File::create(path)?, written: 0, limit })
    }

    /// The name the full file is moved to: `<file>.1`.
    fn rotated_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, Self::rotated_path(&self.path))?;
        self.file = File::create(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for ConsoleFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written >= self.limit {
            self.rotate()?;
        }
        // Never past the limit within one call: the rest comes in the next, into a new file.
        let room = usize::try_from(self.limit - self.written).unwrap_or(usize::MAX);
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_the_limit_keeping_the_newest_output() {
        let tmp = husk_tests::tiny_guest::TempDir::new("console-file");
        let dir = tmp.path();
        let path = dir.join("console.log");
        let mut out = ConsoleFile::with_limit(&path, 10).unwrap();
        // 25 bytes, one at a time as the UART writes them, then a write across the limit.
        for b in b"aaaaaaaaaabbbbbbbbbbccccc" {
            out.write_all(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"ccccc");
        assert_eq!(std::fs::read(ConsoleFile::rotated_path(&path)).unwrap(), b"bbbbbbbbbb");
        out.write_all(b"dddddeeeeeeeeeef").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"f");
        assert_eq!(std::fs::read(ConsoleFile::rotated_path(&path)).unwrap(), b"eeeeeeeeee");
        let mut names: Vec<_> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["console.log", "console.log.1"], "two files at most");
    }
}
