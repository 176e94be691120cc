//! husk-agent: the guest's PID 1. It serves the agent protocol (`husk-agent-protocol`: ttrpc on
//! vsock port 1024, stdio streams on 1025) and runs each container on the guest's kernel as
//! runc would on a host.
//!
//! Modes:
//! - As PID 1 (the micro-VM's /init): mounts the basics, logs to the console (and a copy to a
//!   host vsock port with `HUSK_AGENT_LOG_TO=vsock:PORT` on the kernel command line: see
//!   `logging`), listens on vsock, and powers the VM off on Shutdown (with `when_idle`, once no
//!   container is left).
//! - Anywhere else (tests on a host, as root): `--listen unix:PATH --stdio-listen unix:PATH
//!   --cgroup-root DIR`; the same service over Unix sockets, and Shutdown ends the agent.
//! - `husk-agent init ...`: internal, the helper that becomes a container process (`init`).
//!
//! It prints `husk-agent: ready` on stdout once it serves (as PID 1, with the milliseconds since
//! /init started, on the boot clock).

mod args;
mod channel;
mod clock;
mod container;
mod entropy;
mod error;
mod init;
mod listen;
mod logging;
mod net;
mod netlink;
mod pid1;
mod pidfd;
mod pump;
mod reaper;
mod service;
mod stdio;
mod sync;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use husk_agent_protocol::{AGENT_PORT, READY_PORT, STDIO_PORT};

use container::cgroup::CgroupRoot;
use container::Containers;
use listen::{Addr, Listener};

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if init::is_helper(&argv) {
        init::main(&argv[2..]);
    }
    let pid1 = std::process::id() == 1;
    let started = if pid1 { pid1::boot_clock_ns() } else { None };
    let mounted = if pid1 { pid1::setup() } else { Ok(()) };
    let log = logging::init();
    let result = mounted.map_err(anyhow::Error::msg).and_then(|()| run(pid1, started, &argv, &log));
    if let Err(e) = result {
        log::error!("{e:#}");
        if pid1 {
            pid1::power_off();
        }
        std::process::exit(1);
    }
}

/// `started`: when /init started, as PID 1.
fn run(
    pid1: bool,
    started: Option<u64>,
    argv: &[String],
    log: &logging::Log,
) -> anyhow::Result<()> {
    // Before any thread exists: see reaper.
    reaper::block_sigchld().context("blocking SIGCHLD")?;
    let env = |var: &str| std::env::var(var).ok();
    let words = argv.get(1..).unwrap_or_default();
    let parsed = if pid1 {
        // The kernel hands PID 1 the command line words it does not know: settings come
        // from the environment (HUSK_AGENT_*=... on the kernel command line) and defaults.
        args::parse(words, env).or_else(|e| {
            log::warn!("ignoring the arguments: {e}");
            args::parse(&[], env)
        })
    } else {
        args::parse(words, env)
    };
    let args = match parsed.map_err(anyhow::Error::msg)? {
        args::Parsed::Run(args) => args,
        args::Parsed::Print(text) => {
            print!("{text}");
            std::process::exit(0);
        }
    };
    if let Some(addr) = args.log_to.clone() {
        // Not fatal: the console has the log either way.
        if let Err(e) = log.copy_to(addr) {
            log::warn!("starting the log copy: {e}");
        }
    }
    if !pid1 {
        // Orphans of containers without a pid namespace come to the agent, as they would to
        // PID 1 in the guest.
        nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
    }
    let (listen, stdio_listen, cgroup_root) = if pid1 {
        (
            args.listen.unwrap_or(Addr::Vsock(AGENT_PORT)),
            args.stdio_listen.unwrap_or(Addr::Vsock(STDIO_PORT)),
            args.cgroup_root.unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup/containers")),
        )
    } else {
        match (args.listen, args.stdio_listen, args.cgroup_root) {
            (Some(l), Some(s), Some(c)) => (l, s, c),
            _ => bail!("--listen, --stdio-listen and --cgroup-root are needed when not PID 1"),
        }
    };
    let reaper = reaper::Reaper::start().context("starting the reaper")?;
    let cgroups = CgroupRoot::prepare(&cgroup_root).context("preparing the cgroup root")?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let containers = Arc::new(Containers::new(
        reaper,
        PathBuf::from("/proc/self/exe"),
        cgroups,
        args.state_dir.clone(),
    ));

    let stdio =
        Listener::bind(&stdio_listen).with_context(|| format!("listening on {stdio_listen}"))?;
    stdio::serve(stdio, containers.clone()).context("starting the stdio server")?;

    let shutdown: service::ShutdownFn = if pid1 {
        Box::new(|| pid1::power_off())
    } else {
        let root = containers.cgroup_root().to_path_buf();
        Box::new(move || {
            if let Err(e) = std::fs::remove_dir(&root) {
                log::warn!("removing {}: {e}", root.display());
            }
            log::info!("shut down");
            std::process::exit(0);
        })
    };
    let service = service::Service::new(containers, shutdown, pid1);
    let agent = Arc::new(service) as Arc<dyn husk_agent_protocol::agent_ttrpc::Agent + Send + Sync>;
    let listener = Listener::bind(&listen).with_context(|| format!("listening on {listen}"))?;
    let (listener, host_only) = listener.into_parts();
    let mut server = ttrpc::Server::new()
        .add_listener(listener)
        .context("ttrpc listener")?
        .register_service(husk_agent_protocol::agent_ttrpc::create_agent(agent));
    if let Some(hook) = host_only {
        server = server.set_accept_hook(hook);
    }
    server.start().context("starting the ttrpc server")?;
    let ready_ms = started.and_then(pid1::ms_since);
    if let Addr::Vsock(_) = listen {
        // The host may be waiting for this rather than polling; nothing has to listen. It goes
        // first: the lines below cost a serial console a VM exit or two per byte.
        if let Err(e) = Addr::Vsock(READY_PORT).connect() {
            log::debug!("telling the host we are ready: {e}");
        }
    }
    log::info!("serving on {listen} (stdio on {stdio_listen})");
    match ready_ms {
        Some(ms) => println!("husk-agent: ready {ms:.1} ms after /init started"),
        None => println!("husk-agent: ready"),
    }
    loop {
        std::thread::park();
    }
}
