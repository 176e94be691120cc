//! `husk ps`: the processes of a container. The table shows them as the guest sees them (the
//! pids are the guest's: the container's processes do not exist on the host). `--format json`
//! is what containerd's shim reads, and Docker's `top` looks its pids up in the host's `ps`:
//! it lists the container's host process, the VM process, as Kata Containers' shim does.

use anyhow::anyhow;
use husk_agent_protocol::agent as pb;

use crate::agent::{ctx, describe};
use crate::cli::{Format, GlobalArgs, PsArgs};
use crate::commands::agent_of;
use crate::commands::list::table;
use crate::container::{Container, Status};

pub fn run(global: &GlobalArgs, args: &PsArgs) -> anyhow::Result<()> {
    let container = Container::open(&global.root, &args.id)?;
    let record = container.load()?;
    let client =
        agent_of(&container, &record, &[Status::Created, Status::Running, Status::Paused])?;
    drop(container);
    if args.format == Format::Json {
        println!("{}", serde_json::to_string(&[record.pid])?);
        return Ok(());
    }
    let mut req = pb::ListProcessesRequest::new();
    req.container_id = args.id.clone();
    let list = client
        .list_processes(ctx(), &req)
        .map_err(|e| anyhow!("listing the processes of \"{}\": {}", args.id, describe(&e)))?;
    let mut rows = vec![["UID", "PID", "PPID", "STAT", "CMD"].map(String::from).to_vec()];
    for p in &list.processes {
        rows.push(vec![
            p.uid.to_string(),
            p.pid.to_string(),
            p.ppid.to_string(),
            p.state.clone(),
            p.args.join(" "),
        ]);
    }
    print!("{}", table(&rows));
    Ok(())
}
