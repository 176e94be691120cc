//! husk's command line, runc's: the same commands, flags, defaults and output formats, so that
//! containerd's runc shim and people's scripts drive husk as they drive runc. Flags runc has
//! that have no meaning for a VM (`--systemd-cgroup`, `--no-pivot`, ...) are accepted.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::logging::LogFormat;
use crate::vm_run::VmRunArgs;

/// husk: a runc-compatible OCI runtime that runs each container in its own KVM micro-VM.
#[derive(Parser, Debug)]
#[command(name = "husk", about, disable_version_flag = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// runc's global flags, plus where husk's guest kernel and image are.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Root directory for the state of containers.
    #[arg(long, global = true, default_value = "/run/husk")]
    pub root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log debug messages too.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for runc compatibility; husk manages cgroups inside the guest.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for runc compatibility (true, false or auto).
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true")]
    pub rootless: Option<String>,
    /// Accepted for runc compatibility (checkpointing is not supported).
    #[arg(long, global = true, hide = true)]
    pub criu: Option<String>,
    /// The guest kernel (overrides HUSK_KERNEL and the config file).
    #[arg(long, global = true)]
    pub kernel: Option<PathBuf>,
    /// The guest image (initramfs with husk-agent; overrides HUSK_INITRD and the config file).
    #[arg(long, global = true)]
    pub initrd: Option<PathBuf>,
    /// Print the version.
    #[arg(short = 'v', long)]
    pub version: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a container: boot its VM and set the container up, not yet running its process.
    Create(CreateArgs),
    /// Run the process of a created container.
    Start(IdArgs),
    /// Create and start a container, and wait for it unless --detach.
    Run(RunArgs),
    /// Print a container's state as JSON.
    State(IdArgs),
    /// Send a signal to a container's process (default SIGTERM).
    Kill(KillArgs),
    /// Delete a container and everything husk made for it.
    Delete(DeleteArgs),
    /// Run a new process in a running container.
    Exec(ExecArgs),
    /// List a container's processes.
    Ps(PsArgs),
    /// List the containers.
    List(ListArgs),
    /// Freeze every process of a container.
    Pause(IdArgs),
    /// Thaw a paused container.
    Resume(IdArgs),
    /// Print a container's stats as JSON events.
    Events(EventsArgs),
    /// Change a container's resource limits.
    Update(UpdateArgs),
    /// Print what husk supports, as the OCI features JSON.
    Features,
    /// Write a default config.json.
    Spec(SpecArgs),
    /// Work with micro-VMs directly.
    #[command(subcommand)]
    Vm(VmCommand),
    /// (internal) A container's VM process, started by `create`.
    #[command(hide = true)]
    VmProcess(VmProcessArgs),
    /// (internal) A detached `exec`'s process, started by `exec --detach`.
    #[command(hide = true)]
    ExecProcess(ExecProcessArgs),
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Boot one micro-VM in the foreground; exit 0 when the guest reboots or powers off.
    Run(VmRunArgs),
}

#[derive(Args, Debug)]
pub struct IdArgs {
    /// The container id.
    pub id: String,
}

#[derive(Args, Debug, Clone)]
pub struct CreateArgs {
    /// The container id.
    pub id: String,
    /// The bundle directory (holding config.json).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// A Unix socket that receives the pty master when the process has a terminal.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Write the pid of the container's VM process here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra descriptors to pass to the container (none can cross into a VM: must be 0).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Return once the container runs, leaving it in the background.
    #[arg(short, long)]
    pub detach: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Args, Debug)]
pub struct KillArgs {
    /// The container id.
    pub id: String,
    /// A signal name (TERM, SIGTERM) or number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
    /// Send the signal to every process of the container.
    #[arg(short, long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// The container id.
    pub id: String,
    /// Kill the container first if it still runs.
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// The container id.
    pub id: String,
    /// The command and its arguments (unless --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// A JSON file with the OCI process to run.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// A Unix socket that receives the pty master with --tty.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Set an environment variable (NAME=VALUE).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Give the process a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// The user: UID[:GID].
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional group ids.
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// Return once the process runs.
    #[arg(short, long)]
    pub detach: bool,
    /// Write the pid of the process that stands for the exec here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Set no_new_privileges.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Add a capability.
    #[arg(short, long)]
    pub cap: Vec<String>,
    /// Extra descriptors to pass (none can cross into a VM: must be 0).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub process_label: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub ignore_paused: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub cgroup: Option<String>,
}

#[derive(Args, Debug)]
pub struct VmProcessArgs {
    /// The container id.
    pub id: String,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExecProcessArgs {
    /// The container id.
    pub id: String,
    #[arg(long)]
    pub exec_id: String,
    /// The OCI process JSON the parent `exec` wrote.
    #[arg(long)]
    pub process: PathBuf,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// The container id.
    pub id: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub format: Format,
    /// ps options (accepted; husk prints its own columns).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    pub format: Format,
    /// Print only the ids.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// The container id.
    pub id: String,
    /// Print one stats event and exit.
    #[arg(long)]
    pub stats: bool,
    /// Interval between stats events.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub interval: std::time::Duration,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The container id.
    pub id: String,
    /// The new resources as OCI linux.resources JSON, from a file or `-` for stdin.
    #[arg(short, long)]
    pub resources: Option<String>,
    /// Memory limit in bytes.
    #[arg(long)]
    pub memory: Option<i64>,
    /// Memory reservation in bytes.
    #[arg(long)]
    pub memory_reservation: Option<i64>,
    /// Memory plus swap limit in bytes.
    #[arg(long)]
    pub memory_swap: Option<i64>,
    /// CPU CFS period in microseconds.
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// CPU CFS quota in microseconds.
    #[arg(long)]
    pub cpu_quota: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long)]
    pub cpu_share: Option<u64>,
    /// Maximum number of pids.
    #[arg(long)]
    pub pids_limit: Option<i64>,
}

#[derive(Args, Debug)]
pub struct SpecArgs {
    /// Where to write config.json.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The command lines containerd's runc shim sends.
    #[test]
    fn containerd_command_lines_parse() {
        for line in [
            "husk --root /run/containerd/runc/k8s.io --log /b/log.json --log-format json create \
             --bundle /b --pid-file /b/init.pid --console-socket /tmp/c.sock c1",
            "husk --root /r --log /b/log.json --log-format json start c1",
            "husk --root /r --log /b/log.json --log-format json kill --all c1 9",
            "husk --root /r --log /b/log.json --log-format json delete --force c1",
            "husk --root /r --log /b/log.json --log-format json exec --process /tmp/p.json \
             --detach --pid-file /b/e.pid c1",
            "husk --root /r --log /b/log.json --log-format json ps --format json c1",
            "husk --root /r --log /b/log.json --log-format json update --resources - c1",
            "husk --root /r --systemd-cgroup state c1",
            "husk spec --rootless -b /tmp",
            "husk exec -t -e A=1 -u 1000:1000 --cwd /tmp c1 sh -c 'echo hi'",
        ] {
            let args = line.split_whitespace().filter(|w| *w != "\\");
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }
}
