//! `husk delete`: remove a stopped (or, as runc does, a created) container and every trace of
//! it: its VM process, its host cgroup, its state directory with the VM's socket, console log
//! and disk image; and it runs its poststop hooks. `--force` kills a running one first. Works
//! after a `kill -9` of the VM process too.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::cli::{DeleteArgs, GlobalArgs};
use crate::container::{process, Container, StateError, Status};
use crate::hooks::{self, Stage};
use crate::host_cgroup;
use crate::network;
use crate::rootfs_image::RootfsImages;

/// How long a killed VM process may take to go.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(global: &GlobalArgs, args: &DeleteArgs) -> anyhow::Result<()> {
    let container = Container::open(&global.root, &args.id)?;
    let record = match container.load() {
        Ok(record) => record,
        // A directory without a record: a create that died before it saved one (a live create
        // would still hold the lock we now have). Nothing in it can be running.
        Err(StateError::NotExist(_)) => {
            log::warn!("container {} has no record; removing what its create left", args.id);
            return clean_up(container);
        }
        // A record that cannot be read cannot name a VM process to stop; --force removes it.
        Err(e) if args.force => {
            log::warn!("{e}; removing the container's directory");
            return Ok(container.destroy()?);
        }
        Err(e) => return Err(e.into()),
    };
    match record.current_status() {
        Status::Stopped | Status::Creating => {}
        Status::Created => kill_vm(&record)?,
        Status::Running | Status::Paused if args.force => kill_vm(&record)?,
        other => bail!("cannot delete container {} that is not stopped: {}", args.id, other.name()),
    }
    clean_up(container)
}

/// Kill the container's VM process (the VM with it) and wait until it is gone.
fn kill_vm(record: &crate::container::Record) -> anyhow::Result<()> {
    if process::kill_and_wait(record.pid, record.pid_start_time, libc::SIGKILL, KILL_TIMEOUT) {
        Ok(())
    } else {
        Err(anyhow!("the VM process {} of container {} did not exit", record.pid, record.id))
    }
}

/// Remove what husk made for a container whose VM process is gone: the network set-up in its
/// namespace, its hold on its rootfs image, then its state directory.
pub fn clean_up(container: Container) -> anyhow::Result<()> {
    if let Some(record) = network::load_record(container.dir())? {
        network::teardown(&record).context("cannot undo the container's network set-up")?;
    }
    if let Ok(mut record) = container.load() {
        RootfsImages::release(&record.image.path)?;
        if let Some(spec) = container.spec() {
            host_cgroup::remove(&spec);
            record.status = Status::Stopped;
            hooks::run_warning(&spec, Stage::Poststop, &record.to_oci_state());
        }
    }
    Ok(container.destroy()?)
}
