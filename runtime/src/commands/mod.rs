//! One module per command, as runc has them; each takes the global flags and its own.

pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod features;
pub mod kill;
pub mod list;
pub mod pause;
pub mod ps;
pub mod run;
pub mod spec;
pub mod start;
pub mod state;
pub mod update;

use anyhow::anyhow;
use husk_agent_protocol::client::AgentClient;

use crate::agent;
use crate::cli::GlobalArgs;
use crate::container::{Container, Record, Status};
use crate::settings::{Overrides, Settings};

/// The error runc gives (and containerd matches) for a container whose process is gone.
pub const NOT_RUNNING: &str = "container not running";

/// runc's --preserve-fds: no descriptor can be passed into a container's VM.
pub fn refuse_preserved_fds(count: u32) -> anyhow::Result<()> {
    if count > 0 {
        return Err(anyhow!("--preserve-fds: descriptors cannot be passed into a container's VM"));
    }
    Ok(())
}

/// husk's settings with the global flags' overrides.
pub fn settings(global: &GlobalArgs) -> anyhow::Result<Settings> {
    let overrides = Overrides { kernel: global.kernel.clone(), initrd: global.initrd.clone() };
    let settings = Settings::load(&overrides)?;
    if !global.debug {
        log::set_max_level(settings.log_level);
    }
    Ok(settings)
}

/// Whether the container's VM process ends within a few seconds: asked after a request to its
/// agent broke off, which is what a VM going down under the request looks like (the container's
/// last process died, or it was deleted).
pub fn vm_ended(record: &Record) -> bool {
    const VM_EXIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
    crate::container::process::wait_gone(record.pid, record.pid_start_time, VM_EXIT_TIMEOUT)
}

/// A client of the agent in the VM of a container that must be in one of `allowed` states.
pub fn agent_of(
    container: &Container,
    record: &Record,
    allowed: &[Status],
) -> anyhow::Result<AgentClient> {
    let status = record.current_status();
    if status == Status::Stopped {
        return Err(anyhow!(NOT_RUNNING));
    }
    if !allowed.contains(&status) {
        return Err(anyhow!("container \"{}\" is {}", record.id, status.name()));
    }
    agent::connect(&container.vsock_path()).map_err(|e| {
        log::debug!("connecting to the agent of {}: {e}", record.id);
        anyhow!(NOT_RUNNING)
    })
}

/// Write `pid` to `path` atomically, as runc does (a temporary file renamed into place).
pub fn write_pid_file(path: &std::path::Path, pid: i32) -> anyhow::Result<()> {
    let tmp = path.with_extension("husk-tmp");
    std::fs::write(&tmp, pid.to_string())
        .map_err(|e| anyhow!("writing the pid file {}: {e}", path.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow!("writing the pid file {}: {e}", path.display()))
}

/// This binary, for the background processes husk starts (it may have been replaced on disk
/// since; /proc/self/exe is the one running).
pub fn self_command(global: &GlobalArgs) -> std::process::Command {
    let mut cmd = std::process::Command::new("/proc/self/exe");
    // Named as this binary, not /proc/self/exe, in ps and `docker top`.
    if let Ok(exe) = std::env::current_exe() {
        std::os::unix::process::CommandExt::arg0(&mut cmd, exe);
    }
    cmd.arg("--root").arg(&global.root);
    if let Some(log) = &global.log {
        cmd.arg("--log").arg(log);
    }
    cmd.arg("--log-format").arg(match global.log_format {
        crate::logging::LogFormat::Text => "text",
        crate::logging::LogFormat::Json => "json",
    });
    if global.debug {
        cmd.arg("--debug");
    }
    if let Some(kernel) = &global.kernel {
        cmd.arg("--kernel").arg(kernel);
    }
    if let Some(initrd) = &global.initrd {
        cmd.arg("--initrd").arg(initrd);
    }
    cmd
}
