//! The guest's network, which all its containers share (the VM is their network boundary): its
//! NICs' counters.

use std::fs;
use std::path::Path;

use husk_agent_protocol::agent as pb;

/// ARPHRD_LOOPBACK, the `type` of a loopback interface.
const LOOPBACK: &str = "772";

/// The counters of every NIC but loopback, from /sys/class/net (the guest's sysfs); a NIC that
/// disappears while it is read is left out.
pub fn counters() -> Vec<pb::NetworkStats> {
    let Ok(entries) = fs::read_dir("/sys/class/net") else { return Vec::new() };
    let mut out: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let kind = fs::read_to_string(dir.join("type")).ok()?;
            if kind.trim() == LOOPBACK {
                return None;
            }
            let stat = |name: &str| read_u64(&dir.join("statistics").join(name));
            Some(pb::NetworkStats {
                name: e.file_name().to_string_lossy().into_owned(),
                rx_bytes: stat("rx_bytes")?,
                rx_packets: stat("rx_packets")?,
                rx_errors: stat("rx_errors")?,
                rx_dropped: stat("rx_dropped")?,
                tx_bytes: stat("tx_bytes")?,
                tx_packets: stat("tx_packets")?,
                tx_errors: stat("tx_errors")?,
                tx_dropped: stat("tx_dropped")?,
                ..Default::default()
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}
