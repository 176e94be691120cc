//! The host's process table as the suites read it from `/proc`: for their checks that no
//! process is left behind, and for the diagnostics and clean-up of the Docker suite.

use std::fs;
use std::path::Path;

/// The fields of one process's `/proc/PID/stat` that the suites use.
pub struct ProcStat {
    pub pid: i32,
    /// The command name, without its parentheses.
    pub comm: String,
    /// The state letter: `R`, `S`, `D`, `Z`, ...
    pub state: char,
    pub ppid: i32,
    /// The whole line, as the kernel wrote it.
    pub line: String,
}

impl ProcStat {
    /// Parse a stat line. The command name may hold spaces and parentheses, so it ends at the
    /// last ") ".
    fn parse(line: String) -> Option<Self> {
        let (head, rest) = line.rsplit_once(") ")?;
        let (pid, comm) = head.split_once(" (")?;
        let mut fields = rest.split_whitespace();
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        Some(Self { pid: pid.parse().ok()?, comm: comm.to_string(), state, ppid, line })
    }
}

/// The stat of every process there is (those gone by the time they are read are left out).
pub fn processes() -> Vec<ProcStat> {
    let Ok(dir) = fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(ProcStat::parse)
        .collect()
}

/// Processes (other than zombies) whose command line mentions `needle`, as "PID: command line".
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = vec![];
    for process in processes().into_iter().filter(|p| p.state != 'Z') {
        let path = Path::new("/proc").join(process.pid.to_string()).join("cmdline");
        let Ok(cmdline) = fs::read(path) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{}: {cmdline}", process.pid));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_name_with_spaces_and_parentheses() {
        let line = "42 (a) b (c)) S 7 42 42 0 -1 4194560".to_string();
        let stat = ProcStat::parse(line).unwrap();
        assert_eq!((stat.pid, stat.comm.as_str(), stat.state, stat.ppid), (42, "a) b (c)", 'S', 7));
    }

    #[test]
    fn finds_this_process() {
        let me = processes().into_iter().find(|p| p.pid == std::process::id() as i32).unwrap();
        assert_eq!(me.ppid as u32, std::os::unix::process::parent_id());
        assert!(me.line.starts_with(&format!("{} (", me.pid)));
    }
}
