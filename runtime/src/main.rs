//! `husk`: a runc-compatible OCI runtime that runs each container in its own KVM micro-VM.
//! The commands are runc's (see `cli`); `husk vm run` boots a bare micro-VM for tests,
//! benchmarks and people debugging guests.

mod agent;
mod boot_files;
mod bundle;
mod cli;
mod commands;
mod console;
mod container;
mod hooks;
mod host_cgroup;
mod logging;
mod network;
mod readable;
mod rootfs_image;
mod session;
mod settings;
mod signals;
mod stale;
mod stdio;
mod sync_pipe;
mod terminal;
mod threads;
mod vm_process;
mod vm_run;
mod vm_template;

use clap::Parser;

use cli::{Cli, Command, VmCommand};

fn version() -> String {
    format!(
        "husk version {}\nspec: {}\nvmm: in-process KVM micro-VM (x86_64)\n",
        env!("CARGO_PKG_VERSION"),
        container::OCI_VERSION
    )
}

fn main() {
    threads::limit_default_stack();
    let cli = Cli::parse();
    let global = &cli.global;
    // `vm run` reads no settings: its level is set here, and for the container commands again
    // once the config file has been read.
    let level = match settings::env_log_level() {
        _ if global.debug => log::LevelFilter::Debug,
        Ok(level) => level.unwrap_or(log::LevelFilter::Warn),
        Err(e) => {
            eprintln!("husk: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = logging::init(global.log.as_deref(), global.log_format, level) {
        eprintln!("husk: cannot open the log file: {e}");
        std::process::exit(1);
    }
    if global.version {
        print!("{}", version());
        return;
    }
    let Some(command) = &cli.command else {
        eprintln!("husk: a command is needed (see husk --help)");
        std::process::exit(1);
    };
    let result: anyhow::Result<i32> = match command {
        Command::Create(args) => commands::create::run(global, args).map(|()| 0),
        Command::Start(args) => commands::start::run(global, &args.id).map(|()| 0),
        Command::Run(args) => commands::run::run(global, args),
        Command::State(args) => commands::state::run(global, &args.id).map(|()| 0),
        Command::Kill(args) => commands::kill::run(global, args).map(|()| 0),
        Command::Delete(args) => commands::delete::run(global, args).map(|()| 0),
        Command::Exec(args) => commands::exec::run(global, args),
        Command::Ps(args) => commands::ps::run(global, args).map(|()| 0),
        Command::List(args) => commands::list::run(global, args).map(|()| 0),
        Command::Pause(args) => commands::pause::pause(global, &args.id).map(|()| 0),
        Command::Resume(args) => commands::pause::resume(global, &args.id).map(|()| 0),
        Command::Events(args) => commands::events::run(global, args).map(|()| 0),
        Command::Update(args) => commands::update::run(global, args).map(|()| 0),
        Command::Features => commands::features::run().map(|()| 0),
        Command::Spec(args) => commands::spec::run(args).map(|()| 0),
        Command::Vm(VmCommand::Run(args)) => Ok(vm_run::run(args)),
        Command::VmProcess(args) => Ok(vm_process::main(global, args)),
        Command::ExecProcess(args) => Ok(commands::exec::exec_process(global, args)),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            let message = format!("{e:#}");
            log::error!("{message}");
            if global.log.is_some() {
                eprintln!("{message}");
            }
            1
        }
    };
    log::logger().flush();
    std::process::exit(code);
}
