//! `husk start`: run the process of a created container, then its poststart hooks.

use anyhow::anyhow;
use husk_agent_protocol::agent as pb;

use crate::agent::{ctx, describe};
use crate::cli::GlobalArgs;
use crate::commands::{agent_of, NOT_RUNNING};
use crate::container::{Container, Record, Status};
use crate::hooks::{self, Stage};

pub fn run(global: &GlobalArgs, id: &str) -> anyhow::Result<()> {
    let container = Container::open(&global.root, id)?;
    let mut record = container.load()?;
    match record.current_status() {
        Status::Created => {}
        Status::Stopped => return Err(anyhow!("cannot start a container that has stopped")),
        other => return Err(anyhow!("cannot start an already {} container", other.name())),
    }
    let client = agent_of(&container, &record, &[Status::Created])?;
    let mut req = pb::StartContainerRequest::new();
    req.container_id = id.into();
    client.start_container(ctx(), &req).map_err(|e| {
        if record.current_status() == Status::Stopped {
            anyhow!(NOT_RUNNING)
        } else {
            anyhow!("cannot start container \"{id}\": {}", describe(&e))
        }
    })?;
    record.status = Status::Running;
    container.save(&record)?;
    poststart(&container, &record);
    Ok(())
}

/// Run the poststart hooks of a container whose process started.
pub fn poststart(container: &Container, record: &Record) {
    if let Some(spec) = container.spec() {
        hooks::run_warning(&spec, Stage::Poststart, &record.to_oci_state());
    }
}
