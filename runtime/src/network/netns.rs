//! Network namespaces by path (`/var/run/netns/NAME`, `/proc/PID/ns/net`): work done inside
//! one on a thread of its own, and entering one for good.
//!
//! setns(2) with `CLONE_NEWNET` moves only the calling thread, so [`run_in`] spawns a thread,
//! moves it, runs the work there and joins it: the caller's namespace never changes. Sockets
//! and tun files opened on that thread stay bound to the namespace after the thread is gone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::NetworkError;

/// An open network namespace.
pub struct Netns {
    file: File,
}

impl Netns {
    /// Open the namespace at `path`.
    pub fn open(path: &Path) -> Result<Netns, NetworkError> {
        let file = File::open(path)
            .map_err(|source| NetworkError::OpenNetns { path: path.to_owned(), source })?;
        Ok(Netns { file })
    }

    /// Move the calling thread into this namespace.
    fn enter(&self, path: &Path) -> Result<(), NetworkError> {
        // SAFETY: setns takes an fd, which `self.file` keeps open, and a flag; it changes only
        // the calling thread's network namespace, which no Rust invariant depends on.
        let ret = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        if ret < 0 {
            let source = io::Error::last_os_error();
            let path = path.to_owned();
            return Err(match source.raw_os_error() {
                Some(libc::EINVAL) => NetworkError::NotANetns { path, source },
                _ => NetworkError::EnterNetns { path, source },
            });
        }
        Ok(())
    }

    /// Run `work` on a new thread inside this namespace and return what it returns.
    pub fn run<T: Send>(
        &self,
        path: &Path,
        work: impl FnOnce() -> Result<T, NetworkError> + Send,
    ) -> Result<T, NetworkError> {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("husk-netns".into())
                .spawn_scoped(scope, || {
                    self.enter(path)?;
                    work()
                })
                .map_err(NetworkError::Thread)?;
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Run `work` on a new thread inside the network namespace at `path`; the calling thread stays
/// where it is.
pub fn run_in<T: Send>(
    path: &Path,
    work: impl FnOnce() -> Result<T, NetworkError> + Send,
) -> Result<T, NetworkError> {
    Netns::open(path)?.run(path, work)
}

/// Move the calling thread into the network namespace at `path` for good.
pub fn enter(path: &Path) -> Result<(), NetworkError> {
    Netns::open(path)?.enter(path)
}
