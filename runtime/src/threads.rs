//! Threads of husk's processes (the VMM's event loop, stdio copies, signal forwarding): named,
//! on stacks under 2 MiB. Where transparent huge pages are always on, a stack of Rust's default
//! 2 MiB that starts on a huge page boundary, as one placed right below the guest's memory does,
//! is backed by a 2 MiB huge page from its first use: 2 MiB more for every idle container.
//! husk's own threads ask for small stacks here; threads that libraries start (ttrpc's client)
//! get Rust's default, which [`limit_default_stack`] makes small too.

use std::thread::JoinHandle;

/// The stack of each thread: these threads copy through heap buffers and make system calls.
/// Under a quarter of 2 MiB too, so that glibc never hands one a cached stack of a thread that
/// had Rust's default (it reuses cached stacks up to four times the size asked for).
pub const STACK_SIZE: usize = 256 << 10;

/// Run `work` on a new thread called `name`. Like `std::thread::spawn`, panics when the system
/// cannot make a thread.
pub fn spawn<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    try_spawn(name, work).unwrap_or_else(|e| panic!("cannot start the {name} thread: {e}"))
}

/// Run `work` on a new thread called `name`, or say why the system could not make one.
pub fn try_spawn<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    std::thread::Builder::new().name(name.into()).stack_size(STACK_SIZE).spawn(work)
}

/// Make `STACK_SIZE` the default stack of threads started without a size (by libraries), unless
/// the user chose one with `RUST_MIN_STACK`, which Rust reads when the first such thread starts.
/// Called first thing in `main`, while the process has one thread.
pub fn limit_default_stack() {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        std::env::set_var("RUST_MIN_STACK", STACK_SIZE.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the calling thread's stack, as the C library allocated it.
    fn own_stack_size() -> usize {
        // SAFETY: `attr` is initialised by pthread_getattr_np before it is read and destroyed
        // once; pthread_self is always a valid thread handle for the calling thread.
        unsafe {
            let mut attr: libc::pthread_attr_t = std::mem::zeroed();
            assert_eq!(libc::pthread_getattr_np(libc::pthread_self(), &mut attr), 0);
            let mut size = 0;
            assert_eq!(libc::pthread_attr_getstacksize(&attr, &mut size), 0);
            libc::pthread_attr_destroy(&mut attr);
            size
        }
    }

    #[test]
    fn threads_have_small_named_stacks() {
        let (name, size) =
            spawn("probe", || (std::thread::current().name().map(str::to_owned), own_stack_size()))
                .join()
                .unwrap();
        assert_eq!(name.as_deref(), Some("probe"));
        assert!(size >= STACK_SIZE, "stack of {size} bytes");
        assert!(size < 2 << 20, "a stack of {size} bytes can hold a 2 MiB huge page");
        let default = std::thread::spawn(own_stack_size).join().unwrap();
        assert!(default >= 2 << 20, "Rust's default stack ({default} bytes) is the one to avoid");
    }
}
