//! `husk kill`: send a signal to a container's process, or with --all to every process in it.

use anyhow::anyhow;
use husk_agent_protocol::agent as pb;

use crate::agent::{ctx, describe};
use crate::cli::{GlobalArgs, KillArgs};
use crate::commands::{agent_of, vm_ended, NOT_RUNNING};
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
    let Err(e) = client.signal_process(ctx(), &req) else { return Ok(()) };
    // The connection broke rather than the agent refusing: when the VM process then ends, the
    // container stopped as it was signalled (a KILL of its last process can end the VM before
    // the agent's reply gets out), and the signal did its work.
    let disconnected = !matches!(e, ttrpc::Error::RpcStatus(_));
    if disconnected && vm_ended(&record) {
        log::debug!("the VM of {} ended as it was signalled: {}", args.id, describe(&e));
        return Ok(());
    }
    if record.current_status() == Status::Stopped {
        return Err(anyhow!(NOT_RUNNING));
    }
    Err(anyhow!("cannot signal container \"{}\": {}", args.id, describe(&e)))
}
