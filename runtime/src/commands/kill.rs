//! `husk kill`: send a signal to a container's process, or with --all to every process in it.

use anyhow::anyhow;
use husk_agent_protocol::agent as pb;

use crate::agent::{ctx, describe};
use crate::cli::{GlobalArgs, KillArgs};
use crate::commands::{agent_of, NOT_RUNNING};
use crate::container::{Container, Status};
use crate::signals;

pub fn run(global: &GlobalArgs, args: &KillArgs) -> anyhow::Result<()> {
    let signal =
        signals::parse(&args.signal).ok_or_else(|| anyhow!("unknown signal {:?}", args.signal))?;
    let container = Container::open(&global.root, &args.id)?;
    let record = container.load()?;
    let client =
        agent_of(&container, &record, &[Status::Created, Status::Running, Status::Paused])?;
    let mut req = pb::SignalProcessRequest::new();
    req.container_id = args.id.clone();
    req.signal = signal as u32;
    req.all = args.all;
    client.signal_process(ctx(), &req).map_err(|e| {
        if record.current_status() == Status::Stopped {
            anyhow!(NOT_RUNNING)
        } else {
            anyhow!("cannot signal container \"{}\": {}", args.id, describe(&e))
        }
    })?;
    Ok(())
}
