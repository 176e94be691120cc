//! A newc cpio writer, for the small archives end-to-end tests append to the test initramfs
//! (Linux unpacks concatenated archives, so a test adds its own `/test.sh`).

/// An uncompressed newc archive being built.
#[derive(Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    next_ino: u32,
}

fn pad4(bytes: &mut Vec<u8>) {
    while !bytes.len().is_multiple_of(4) {
        bytes.push(0);
    }
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for f in fields {
            self.bytes.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        pad4(&mut self.bytes);
        self.bytes.extend_from_slice(data);
        pad4(&mut self.bytes);
    }

    /// Add a regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(mut self, name: &str, perm: u32, data: &[u8]) -> Self {
        self.entry(name, 0o100000 | perm, data);
        self
    }

    /// The archive, with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_tool_reads_it_back() {
        let archive = Cpio::new().file("test.sh", 0o755, b"#!/bin/sh\necho hi\n").finish();
        assert_eq!(archive.len() % 4, 0);
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the cpio tool (Debian's cpio package) is needed by this test");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), &archive).unwrap();
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        assert!(listing.contains("-rwxr-xr-x") && listing.contains("test.sh"), "{listing}");
    }
}
