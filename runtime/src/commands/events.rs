//! `husk events`: the container's stats as runc's JSON events, once with --stats, else every
//! --interval until the container stops.

use anyhow::anyhow;
use husk_agent_protocol::agent as pb;
use serde_json::{json, Value};

use crate::agent::{ctx, describe};
use crate::cli::{EventsArgs, GlobalArgs};
use crate::commands::agent_of;
use crate::container::{Container, Status};

pub fn run(global: &GlobalArgs, args: &EventsArgs) -> anyhow::Result<()> {
    let client = {
        let container = Container::open(&global.root, &args.id)?;
        let record = container.load()?;
        agent_of(&container, &record, &[Status::Created, Status::Running, Status::Paused])?
    };
    loop {
        let mut req = pb::StatsContainerRequest::new();
        req.container_id = args.id.clone();
        let stats = match client.stats_container(ctx(), &req) {
            Ok(stats) => stats,
            // The container stopped while events were being printed.
            Err(_) if !args.stats => return Ok(()),
            Err(e) => return Err(anyhow!("stats of \"{}\": {}", args.id, describe(&e))),
        };
        println!("{}", json!({"type": "stats", "id": args.id, "data": stats_json(&stats)}));
        if args.stats {
            return Ok(());
        }
        std::thread::sleep(args.interval);
    }
}

/// The agent's counters in runc's `types.Stats` layout (cpu times in nanoseconds).
fn stats_json(s: &pb::StatsContainerResponse) -> Value {
    let cpu = s.cpu.clone().unwrap_or_default();
    let mem = s.memory.clone().unwrap_or_default();
    let pids = s.pids.clone().unwrap_or_default();
    let networks: Vec<Value> = s
        .networks
        .iter()
        .map(|n| {
            json!({"name": n.name, "rx_bytes": n.rx_bytes, "rx_packets": n.rx_packets,
                   "rx_errors": n.rx_errors, "rx_dropped": n.rx_dropped,
                   "tx_bytes": n.tx_bytes, "tx_packets": n.tx_packets,
                   "tx_errors": n.tx_errors, "tx_dropped": n.tx_dropped})
        })
        .collect();
    json!({
        "cpu": {
            "usage": {"total": cpu.usage_usec * 1000, "user": cpu.user_usec * 1000,
                      "kernel": cpu.system_usec * 1000},
            "throttling": {"periods": cpu.nr_periods, "throttled_periods": cpu.nr_throttled,
                           "throttled_time": cpu.throttled_usec * 1000}
        },
        "memory": {
            "usage": {"usage": mem.usage_bytes, "limit": mem.limit_bytes},
            "swap": {"usage": mem.swap_usage_bytes},
            "raw": {"anon": mem.anon_bytes, "file": mem.file_bytes, "oom_kill": mem.oom_kills}
        },
        "pids": {"current": pids.current, "limit": pids.limit},
        "network_interfaces": networks
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_are_nanoseconds() {
        let mut s = pb::StatsContainerResponse::new();
        s.cpu.mut_or_insert_default().usage_usec = 5;
        s.memory.mut_or_insert_default().usage_bytes = 4096;
        let v = stats_json(&s);
        assert_eq!(v["cpu"]["usage"]["total"], 5000);
        assert_eq!(v["memory"]["usage"]["usage"], 4096);
    }
}
