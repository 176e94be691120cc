//! What ListProcesses reports about a process, read from /proc.

use husk_agent_protocol::agent::ProcessInfo;

/// A process's pid, parent, uid, state and command line; None if it is gone.
pub fn info(pid: i32) -> Option<ProcessInfo> {
    let dir = format!("/proc/{pid}");
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain anything, up to the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = &stat[open + 1..close];
    let mut rest = stat[close + 1..].split_whitespace();
    let state = rest.next()?.to_string();
    let ppid = rest.next()?.parse().ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or(0);
    let cmdline = std::fs::read(format!("{dir}/cmdline")).unwrap_or_default();
    let mut args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        args.push(format!("[{comm}]"));
    }
    let mut info = ProcessInfo::new();
    info.pid = pid;
    info.ppid = ppid;
    info.uid = uid;
    info.state = state;
    info.args = args;
    Some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = info(std::process::id() as i32).unwrap();
        assert_eq!(me.ppid as u32, std::os::unix::process::parent_id());
        assert_eq!(me.uid, nix::unistd::getuid().as_raw());
        // The main thread: sleeping or running, depending on the moment.
        assert!(["R", "S"].contains(&me.state.as_str()), "{}", me.state);
        assert!(me.args[0].contains("husk_agent"), "{:?}", me.args);
        assert!(info(i32::MAX).is_none());
    }
}
