//! `husk pause` and `husk resume`: freeze and thaw every process of a container (the guest's
//! cgroup freezer; the VM itself keeps running).

use anyhow::anyhow;
use husk_agent_protocol::agent as pb;

use crate::agent::{ctx, describe};
use crate::cli::GlobalArgs;
use crate::commands::{agent_of, NOT_RUNNING};
use crate::container::{Container, Status};

pub fn pause(global: &GlobalArgs, id: &str) -> anyhow::Result<()> {
    let container = Container::open(&global.root, id)?;
    let mut record = container.load()?;
    match record.current_status() {
        Status::Running => {}
        Status::Paused => return Err(anyhow!("container \"{id}\" is already paused")),
        _ => return Err(anyhow!(NOT_RUNNING)),
    }
    let client = agent_of(&container, &record, &[Status::Running])?;
    let mut req = pb::PauseContainerRequest::new();
    req.container_id = id.into();
    client
        .pause_container(ctx(), &req)
        .map_err(|e| anyhow!("cannot pause container \"{id}\": {}", describe(&e)))?;
    record.status = Status::Paused;
    container.save(&record)?;
    Ok(())
}

pub fn resume(global: &GlobalArgs, id: &str) -> anyhow::Result<()> {
    let container = Container::open(&global.root, id)?;
    let mut record = container.load()?;
    match record.current_status() {
        Status::Paused => {}
        Status::Stopped => return Err(anyhow!(NOT_RUNNING)),
        _ => return Err(anyhow!("container not paused")),
    }
    let client = agent_of(&container, &record, &[Status::Paused])?;
    let mut req = pb::ResumeContainerRequest::new();
    req.container_id = id.into();
    client
        .resume_container(ctx(), &req)
        .map_err(|e| anyhow!("cannot resume container \"{id}\": {}", describe(&e)))?;
    record.status = Status::Running;
    container.save(&record)?;
    Ok(())
}
