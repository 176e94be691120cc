//! `husk update`: change a container's resource limits, from OCI `linux.resources` JSON
//! (`--resources FILE`, `-` for stdin, as containerd sends them) or from flags.

use std::io::Read;

use anyhow::{anyhow, Context};
use husk_agent_protocol::agent as pb;
use serde_json::{json, Value};

use crate::agent::{ctx, describe};
use crate::cli::{GlobalArgs, UpdateArgs};
use crate::commands::agent_of;
use crate::container::{Container, Status};

pub fn run(global: &GlobalArgs, args: &UpdateArgs) -> anyhow::Result<()> {
    let resources = resources(args)?;
    let container = Container::open(&global.root, &args.id)?;
    let record = container.load()?;
    let client =
        agent_of(&container, &record, &[Status::Created, Status::Running, Status::Paused])?;
    let mut req = pb::UpdateContainerRequest::new();
    req.container_id = args.id.clone();
    req.resources_json = serde_json::to_vec(&resources)?;
    client
        .update_container(ctx(), &req)
        .map_err(|e| anyhow!("cannot update container \"{}\": {}", args.id, describe(&e)))?;
    Ok(())
}

fn resources(args: &UpdateArgs) -> anyhow::Result<Value> {
    let mut r: Value = match args.resources.as_deref() {
        Some("-") => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading resources from stdin")?;
            serde_json::from_str(&text).context("the resources are not valid JSON")?
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading resources from {path}"))?;
            serde_json::from_str(&text)
                .with_context(|| format!("the resources in {path} are not valid JSON"))?
        }
        None => json!({}),
    };
    if !r.is_object() {
        return Err(anyhow!("the resources must be a JSON object (OCI linux.resources)"));
    }
    let mut set = |section: &str, key: &str, value: Value| {
        let obj = r.as_object_mut().expect("checked above");
        let section = obj.entry(section).or_insert_with(|| json!({}));
        section[key] = value;
    };
    if let Some(v) = args.memory {
        set("memory", "limit", v.into());
    }
    if let Some(v) = args.memory_reservation {
        set("memory", "reservation", v.into());
    }
    if let Some(v) = args.memory_swap {
        set("memory", "swap", v.into());
    }
    if let Some(v) = args.cpu_period {
        set("cpu", "period", v.into());
    }
    if let Some(v) = args.cpu_quota {
        set("cpu", "quota", v.into());
    }
    if let Some(v) = args.cpu_share {
        set("cpu", "shares", v.into());
    }
    if let Some(v) = args.pids_limit {
        set("pids", "limit", v.into());
    }
    Ok(r)
}
