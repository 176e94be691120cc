//! `husk`: the command-line front end. For now it offers `husk vm run`, which boots one micro-VM
//! in the foreground for tests, benchmarks and people debugging guests; the runc-compatible
//! container commands build on the same VMM library.

// The runtime's create and delete wire the network in next; until then only its tests use it.
#[allow(dead_code)]
mod network;
mod signals;
mod terminal;
mod vm_run;

use clap::{Parser, Subcommand};

/// husk: run containers in KVM micro-VMs.
#[derive(Parser, Debug)]
#[command(name = "husk", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Work with micro-VMs directly.
    #[command(subcommand)]
    Vm(VmCommand),
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Boot one micro-VM in the foreground; exit 0 when the guest reboots or powers off.
    Run(vm_run::VmRunArgs),
}

fn init_logging() {
    let env = env_logger::Env::new().filter_or("HUSK_LOG", "warn");
    env_logger::Builder::from_env(env).format_timestamp_micros().init();
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Vm(VmCommand::Run(args)) => vm_run::run(args),
    };
    std::process::exit(code);
}
