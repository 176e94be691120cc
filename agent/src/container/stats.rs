//! What StatsContainer reports of a container's cgroup: memory, cpu and pids counters. The cpu
//! counters are always there (cgroup v2 keeps them without the cpu controller); memory and pids
//! are left out when the cgroup does not have their controller.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use husk_agent_protocol::agent as pb;

/// The counters of the cgroup at `dir`; an error only when cpu.stat cannot be read.
pub fn read(dir: &Path) -> std::io::Result<pb::StatsContainerResponse> {
    let cpu = keyed(dir, "cpu.stat")?;
    let mut out = pb::StatsContainerResponse::new();
    out.cpu = Some(pb::CpuStats {
        usage_usec: cpu.get("usage_usec").copied().unwrap_or(0),
        user_usec: cpu.get("user_usec").copied().unwrap_or(0),
        system_usec: cpu.get("system_usec").copied().unwrap_or(0),
        nr_periods: cpu.get("nr_periods").copied().unwrap_or(0),
        nr_throttled: cpu.get("nr_throttled").copied().unwrap_or(0),
        throttled_usec: cpu.get("throttled_usec").copied().unwrap_or(0),
        ..Default::default()
    })
    .into();
    if let Some(usage) = number(dir, "memory.current") {
        let stat = keyed(dir, "memory.stat").unwrap_or_default();
        let events = keyed(dir, "memory.events").unwrap_or_default();
        out.memory = Some(pb::MemoryStats {
            usage_bytes: usage,
            limit_bytes: number(dir, "memory.max").unwrap_or(0),
            swap_usage_bytes: number(dir, "memory.swap.current").unwrap_or(0),
            anon_bytes: stat.get("anon").copied().unwrap_or(0),
            file_bytes: stat.get("file").copied().unwrap_or(0),
            oom_kills: events.get("oom_kill").copied().unwrap_or(0),
            ..Default::default()
        })
        .into();
    }
    if let Some(current) = number(dir, "pids.current") {
        out.pids = Some(pb::PidsStats {
            current,
            limit: number(dir, "pids.max").unwrap_or(0),
            ..Default::default()
        })
        .into();
    }
    Ok(out)
}

/// A one-number file; `max` (no limit) reads as 0, a missing file as None.
fn number(dir: &Path, file: &str) -> Option<u64> {
    let text = fs::read_to_string(dir.join(file)).ok()?;
    match text.trim() {
        "max" => Some(0),
        n => n.parse().ok(),
    }
}

/// The `key value` lines of a flat keyed file (cpu.stat, memory.stat, memory.events).
fn keyed(dir: &Path, file: &str) -> std::io::Result<HashMap<String, u64>> {
    let text = fs::read_to_string(dir.join(file))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_cgroup_has() {
        let cgroup = husk_tests::tiny_guest::TempDir::new("stats");
        let dir = cgroup.path().to_path_buf();
        fs::write(dir.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
            .unwrap();
        let s = read(&dir).unwrap();
        assert_eq!((s.cpu.usage_usec, s.cpu.user_usec, s.cpu.system_usec), (1500, 1000, 500));
        assert_eq!(s.cpu.nr_throttled, 0);
        assert!(s.memory.is_none() && s.pids.is_none());

        fs::write(dir.join("memory.current"), "4096\n").unwrap();
        fs::write(dir.join("memory.max"), "max\n").unwrap();
        fs::write(dir.join("memory.stat"), "anon 1024\nfile 2048\nkernel 7\n").unwrap();
        fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        fs::write(dir.join("pids.current"), "2\n").unwrap();
        fs::write(dir.join("pids.max"), "50\n").unwrap();
        let s = read(&dir).unwrap();
        let m = &s.memory;
        assert_eq!((m.usage_bytes, m.limit_bytes, m.swap_usage_bytes), (4096, 0, 0));
        assert_eq!((m.anon_bytes, m.file_bytes, m.oom_kills), (1024, 2048, 1));
        assert_eq!((s.pids.current, s.pids.limit), (2, 50));
        drop(cgroup);
        assert!(read(&dir).is_err());
    }
}
