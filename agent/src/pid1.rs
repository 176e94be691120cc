//! The guest's PID 1 duties: leaving the initramfs for a tmpfs root, the basic file systems,
//! the console as stdio, the loopback interface, and powering the VM off.
//!
//! husk's VMM ends the VM when the guest resets it through the i8042 (the kernel runs with
//! `reboot=k`), so "power off" is `reboot(RB_AUTOBOOT)`, as the test initramfs's `reboot -f`.

use std::os::fd::AsRawFd;

use nix::mount::MsFlags;

/// Milliseconds on the boot clock since `started` (a time from [`boot_clock_ns`]).
pub fn ms_since(started: u64) -> Option<f64> {
    Some(boot_clock_ns()?.saturating_sub(started) as f64 / 1e6)
}

/// Now, in nanoseconds on the boot clock (`main` notes it first thing: when /init started).
pub fn boot_clock_ns() -> Option<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some(u64::try_from(now.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(now.tv_nsec()).ok()?)
}

/// Mount what a guest needs and put the console on stdin, stdout and stderr.
pub fn setup() -> Result<(), String> {
    leave_initramfs()?;
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, "mode=0755")?;
    console();
    mount("proc", "/proc", "proc", nosuid_noexec, "")?;
    mount("sysfs", "/sys", "sysfs", nosuid_noexec, "")?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "gid=5,mode=0620,ptmxmode=0666",
    )?;
    mount("tmpfs", "/dev/shm", "tmpfs", nosuid_noexec, "mode=1777")?;
    mount("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=0755")?;
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_noexec, "nsdelegate")?;
    if let Err(e) = loopback_up() {
        log::warn!("bringing lo up: {e}");
    }
    Ok(())
}

/// pivot_root(2) cannot move away from the initramfs's root (the kernel's `rootfs` mount), and
/// every container is set up with pivot_root. So, as switch_root does, PID 1 first moves onto a
/// tmpfs: it makes that tmpfs the root (MS_MOVE, chroot) and goes on there. Its executable stays
/// in the initramfs underneath, in use, and containers' helpers start from it as
/// `/proc/self/exe`: nothing is copied or executed again. Returns at once when the root is not
/// `rootfs`.
fn leave_initramfs() -> Result<(), String> {
    mount("proc", "/proc", "proc", MsFlags::empty(), "")?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo");
    nix::mount::umount("/proc").map_err(|e| format!("umount /proc: {e}"))?;
    let mountinfo = mountinfo.map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    // Fields: id, parent, major:minor, root, mount point, options, ..., "-", fstype, ...
    let root_fstype = mountinfo.lines().find_map(|l| {
        let mut fields = l.split(' ');
        (fields.nth(4) == Some("/")).then(|| l.split(" - ").nth(1)?.split(' ').next())?
    });
    if root_fstype != Some("rootfs") {
        return Ok(());
    }
    let new_root = "/newroot";
    mount("tmpfs", new_root, "tmpfs", MsFlags::MS_NODEV, "mode=0755")?;
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        std::fs::create_dir_all(format!("{new_root}/{dir}"))
            .map_err(|e| format!("mkdir {new_root}/{dir}: {e}"))?;
    }
    std::env::set_current_dir(new_root).map_err(|e| format!("chdir {new_root}: {e}"))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving {new_root} to /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot to the new root: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// mount(2) of a fresh file system on `target` (created if missing); already mounted is fine.
fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: &str,
) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    let data = (!data.is_empty()).then_some(data);
    match nix::mount::mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!("mount {fstype} on {target}: {e}")),
    }
}

/// The kernel starts PID 1 with /dev/console as stdio only if the initramfs has that node; ours
/// has not, so open it from devtmpfs. (Stdio that is already open is kept.)
fn console() {
    // SAFETY: F_GETFD only inspects the descriptor table.
    if (0..3).all(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0) {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/console")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

fn loopback_up() -> std::io::Result<()> {
    // Any AF_INET socket does for the interface ioctls.
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills in the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the flags member of the union is the one SIOCGIFFLAGS filled in.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Flush the file systems and end the VM.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    log::error!("reboot: {e}");
    // PID 1 must not exit (the kernel would panic, which also ends the VM, less politely).
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_since_a_time_on_the_boot_clock() {
        let now = boot_clock_ns().expect("the boot clock");
        let ms = ms_since(now.saturating_sub(250_000_000)).unwrap();
        assert!((250.0..60_000.0).contains(&ms), "{ms} ms");
        assert_eq!(ms_since(u64::MAX), Some(0.0), "a start in the future counts as now");
    }
}
