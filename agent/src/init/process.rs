//! The container process's identity and limits, set by its helper just before it executes the
//! program: rlimits, OOM score, umask, cwd, user and groups, capabilities, no_new_privileges,
//! the environment, and the program looked up in the container's PATH.

use std::collections::HashSet;
use std::convert::Infallible;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{Capabilities, LinuxCapabilities, PosixRlimitType, Process};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything execve needs, checked.
pub struct Prepared {
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// A seccomp filter to install just before execve.
    seccomp: Option<super::seccomp::Filter>,
}

/// Apply the process's limits and identity to this process and find its program. Run in the
/// container's namespaces, after its root is in place.
///
/// The seccomp filter goes on as late as it can: just before execve with no_new_privileges;
/// without, it needs CAP_SYS_ADMIN, so before the identity change (runc's order; the profile
/// must then allow the calls that follow, as Docker's does).
pub fn prepare(p: &Process, seccomp: Option<super::seccomp::Filter>) -> Result<Prepared, String> {
    for r in p.rlimits().iter().flatten() {
        let resource = rlimit_resource(r.typ());
        setrlimit(resource, r.soft(), r.hard())
            .map_err(|e| format!("setrlimit {:?}: {e}", r.typ()))?;
    }
    if let Some(adj) = p.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| format!("oom_score_adj {adj}: {e}"))?;
    }
    let user = p.user();
    let umask = user.umask().unwrap_or(0o022);
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
    nix::unistd::chdir(p.cwd()).map_err(|e| format!("chdir {}: {e}", p.cwd().display()))?;
    let envp = environment(p)?;
    let nnp = p.no_new_privileges().unwrap_or(false);
    let seccomp = match seccomp {
        Some(filter) if !nnp => {
            super::seccomp::install(&filter)?;
            None
        }
        other => other,
    };
    identity(
        user.uid(),
        user.gid(),
        user.additional_gids().as_deref().unwrap_or_default(),
        p.capabilities().as_ref(),
    )?;
    if nnp {
        nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privileges: {e}"))?;
    }
    let args = p.args().as_deref().unwrap_or_default();
    let path_var =
        p.env().iter().flatten().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    let path = find_program(&args[0], path_var)?;
    let cstr =
        |s: &[u8]| CString::new(s).map_err(|_| "an argument contains a NUL byte".to_string());
    Ok(Prepared {
        path: cstr(path.as_os_str().as_bytes())?,
        argv: args.iter().map(|a| cstr(a.as_bytes())).collect::<Result<_, _>>()?,
        envp,
        seccomp,
    })
}

/// Execute the program: signal dispositions and mask back to defaults (this helper's runtime
/// ignores SIGPIPE, and ignored signals survive execve), every descriptor but stdio closed.
pub fn exec(p: &Prepared) -> Result<Infallible, String> {
    for sig in 1..=libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: resetting a disposition to SIG_DFL installs no handler; invalid numbers
            // (the C library's own real-time signals) just fail.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(|e| format!("sigprocmask: {e}"))?;
    // SAFETY: close_range only changes descriptor flags; CLOEXEC keeps the channel open for an
    // error report should execve fail.
    let r =
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if r < 0 {
        return Err(format!("close_range: {}", std::io::Error::last_os_error()));
    }
    if let Some(filter) = &p.seccomp {
        super::seccomp::install(filter)?;
    }
    let e = nix::unistd::execve(&p.path, &p.argv, &p.envp).unwrap_err();
    Err(format!("exec {}: {e}", p.path.to_string_lossy()))
}

fn rlimit_resource(t: PosixRlimitType) -> Resource {
    use PosixRlimitType as T;
    match t {
        T::RlimitCpu => Resource::RLIMIT_CPU,
        T::RlimitFsize => Resource::RLIMIT_FSIZE,
        T::RlimitData => Resource::RLIMIT_DATA,
        T::RlimitStack => Resource::RLIMIT_STACK,
        T::RlimitCore => Resource::RLIMIT_CORE,
        T::RlimitRss => Resource::RLIMIT_RSS,
        T::RlimitNproc => Resource::RLIMIT_NPROC,
        T::RlimitNofile => Resource::RLIMIT_NOFILE,
        T::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        T::RlimitAs => Resource::RLIMIT_AS,
        T::RlimitLocks => Resource::RLIMIT_LOCKS,
        T::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        T::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        T::RlimitNice => Resource::RLIMIT_NICE,
        T::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        T::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

/// The process's environment, with HOME from the container's /etc/passwd (or `/`) when unset.
fn environment(p: &Process) -> Result<Vec<CString>, String> {
    let mut env: Vec<String> = p.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home(p.user().uid()).unwrap_or_else(|| "/".into())));
    }
    env.into_iter()
        .map(|e| {
            CString::new(e).map_err(|_| "an environment entry contains a NUL byte".to_string())
        })
        .collect()
}

fn home(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[2].parse() == Ok(uid)).then(|| f[5].to_string())
    })
}

/// Become uid/gid with the given groups and capabilities (all of root's are kept when the spec
/// gives none, as for any process that stays uid 0; a non-root user then has none).
fn identity(
    uid: u32,
    gid: u32,
    groups: &[u32],
    caps: Option<&LinuxCapabilities>,
) -> Result<(), String> {
    let groups: Vec<Gid> = groups.iter().map(|&g| Gid::from_raw(g)).collect();
    nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {e}"))?;
    if let Some(c) = caps {
        let bounding = cap_set(c.bounding())?;
        for cap in caps::all() {
            if !bounding.contains(&cap)
                && caps::has_cap(None, caps::CapSet::Bounding, cap).unwrap_or(false)
            {
                caps::drop(None, caps::CapSet::Bounding, cap)
                    .map_err(|e| format!("dropping {cap} from the bounding set: {e}"))?;
            }
        }
        caps::securebits::set_keepcaps(true).map_err(|e| format!("PR_SET_KEEPCAPS: {e}"))?;
    }
    let (g, u) = (Gid::from_raw(gid), Uid::from_raw(uid));
    nix::unistd::setresgid(g, g, g).map_err(|e| format!("setgid {gid}: {e}"))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| format!("setuid {uid}: {e}"))?;
    if let Some(c) = caps {
        caps::securebits::set_keepcaps(false).map_err(|e| format!("PR_SET_KEEPCAPS: {e}"))?;
        capset(&cap_set(c.effective())?, &cap_set(c.permitted())?, &cap_set(c.inheritable())?)?;
        caps::set(None, caps::CapSet::Ambient, &cap_set(c.ambient())?)
            .map_err(|e| format!("ambient capabilities: {e}"))?;
    }
    Ok(())
}

/// The spec's capabilities as the caps crate's (ones this agent does not know are left out,
/// with a warning on the console: the kernel would not know them either).
fn cap_set(set: &Option<Capabilities>) -> Result<HashSet<caps::Capability>, String> {
    let mut out = HashSet::new();
    for c in set.iter().flatten() {
        let name = serde_json::to_value(c).map_err(|e| e.to_string())?;
        let name = name.as_str().unwrap_or_default();
        match name.parse::<caps::Capability>() {
            Ok(cap) => {
                out.insert(cap);
            }
            Err(_) => eprintln!("husk-agent init: unknown capability {name}, ignored"),
        }
    }
    Ok(out)
}

/// Set effective, permitted and inheritable at once (one at a time could pass through a state
/// the kernel refuses, e.g. effective not within permitted).
fn capset(
    effective: &HashSet<caps::Capability>,
    permitted: &HashSet<caps::Capability>,
    inheritable: &HashSet<caps::Capability>,
) -> Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let bits = |s: &HashSet<caps::Capability>| s.iter().fold(0u64, |b, c| b | (1u64 << c.index()));
    let (e, p, i) = (bits(effective), bits(permitted), bits(inheritable));
    let mut data = [Data::default(); 2];
    for (n, d) in data.iter_mut().enumerate() {
        let shift = 32 * n;
        *d = Data {
            effective: (e >> shift) as u32,
            permitted: (p >> shift) as u32,
            inheritable: (i >> shift) as u32,
        };
    }
    let header = Header { version: VERSION_3, pid: 0 };
    // SAFETY: capset reads one header and two data structs (version 3) from these pointers.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if r < 0 {
        return Err(format!("capset: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The program to execute: `name` itself when it has a slash, else the first executable file
/// of that name in `path_var`.
fn find_program(name: &str, path_var: &str) -> Result<PathBuf, String> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        let executable = std::fs::metadata(&candidate).is_ok_and(|m| m.is_file())
            && nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok();
        if executable {
            return Ok(candidate);
        }
    }
    Err(format!("executable file `{name}` not found in $PATH ({path_var})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_lookup() {
        assert_eq!(find_program("sh", "/nonexistent:/bin").unwrap(), PathBuf::from("/bin/sh"));
        assert_eq!(find_program("./x", "/bin").unwrap(), PathBuf::from("./x"));
        // /etc/passwd exists but is not executable.
        assert!(find_program("passwd", "/etc").unwrap_err().contains("not found in $PATH"));
    }
}
