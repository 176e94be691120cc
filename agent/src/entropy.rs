//! Host randomness for the guest kernel's random number generator: written into its input
//! pool through /dev/urandom, then a reseed of the generator from that pool
//! (`RNDRESEEDCRNG`). A guest restored from a snapshot starts with the generator state of the
//! snapshot, which every guest restored from it shares; this makes each one's its own.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;

use crate::error::{Error, Result};

/// The most bytes taken at once.
const MAX_BYTES: usize = 4096;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool (CAP_SYS_ADMIN).
const RNDRESEEDCRNG: libc::Ioctl = 0x5207;

/// Mix `data` into the input pool and reseed the generator from it.
pub fn add(data: &[u8]) -> Result<()> {
    if data.is_empty() || data.len() > MAX_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{} bytes of entropy (1 to {MAX_BYTES} are taken)",
            data.len()
        )));
    }
    let mut urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| Error::internal("opening /dev/urandom", &e))?;
    urandom.write_all(data).map_err(|e| Error::internal("writing /dev/urandom", &e))?;
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of this process.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(Error::internal("reseeding the CRNG", &std::io::Error::last_os_error()));
    }
    log::info!("{} bytes of host entropy added, CRNG reseeded", data.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_amounts_are_refused_and_host_bytes_reseed() {
        for bad in [0, MAX_BYTES + 1] {
            let err = add(&vec![1; bad]).unwrap_err();
            assert!(err.to_string().contains("bytes of entropy"), "{err}");
        }
        // The agent's tests run as root (the guest's PID 1 is): the reseed is allowed.
        add(&[7; 64]).expect("mixed in and reseeded");
    }
}
