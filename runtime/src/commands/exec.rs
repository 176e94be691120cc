//! `husk exec`: run another process in a running container. This host process stands for it:
//! its stdio (or a terminal through --console-socket) is the process's, the signals it gets go
//! to the process, and it exits with the process's status. With --detach a background husk
//! process does that (`husk exec-process`) and its pid goes to --pid-file.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use husk_agent_protocol::agent as pb;
use husk_agent_protocol::client::AgentClient;
use serde_json::{json, Value};

use crate::agent::{self, ctx, describe};
use crate::cli::{ExecArgs, ExecProcessArgs, GlobalArgs};
use crate::commands::create::check_console;
use crate::commands::{
    agent_of, refuse_preserved_fds, self_command, vm_ended, write_pid_file, NOT_RUNNING,
};
use crate::container::{vsock_path, Container, Record, Status};
use crate::session::{Session, TerminalMode};
use crate::signals;
use crate::sync_pipe::{spawn_reported, SyncWriter};

/// Returns the exit status to exit with.
pub fn run(global: &GlobalArgs, args: &ExecArgs) -> anyhow::Result<i32> {
    refuse_preserved_fds(args.preserve_fds)?;
    let container = Container::open(&global.root, &args.id)?;
    let record = container.load()?;
    match record.current_status() {
        Status::Stopped => bail!(NOT_RUNNING),
        Status::Paused => bail!("cannot exec in a paused container"),
        _ => {}
    }
    let client = agent_of(&container, &record, &[Status::Created, Status::Running])?;
    let process = process(args, &container.spec_path())?;
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    check_console(terminal, args.console_socket.is_some(), args.detach)?;
    let exec_id = new_exec_id();
    if args.detach {
        let path = container.dir().join(format!("{exec_id}.json"));
        std::fs::write(&path, serde_json::to_vec(&process)?)
            .with_context(|| format!("writing {}", path.display()))?;
        drop(container);
        let mut cmd = self_command(global);
        cmd.args(["exec-process", &args.id, "--exec-id", &exec_id, "--process"]).arg(&path);
        if let Some(socket) = &args.console_socket {
            cmd.arg("--console-socket").arg(socket);
        }
        let child = spawn_reported(cmd, "the exec's process").map_err(|e| {
            let _ = std::fs::remove_file(&path);
            anyhow!("cannot exec in container \"{}\": {e}", args.id)
        })?;
        if let Some(pid_file) = &args.pid_file {
            write_pid_file(pid_file, child.id() as i32)?;
        }
        return Ok(0);
    }
    let vsock = container.vsock_path();
    drop(container);
    signals::block_forwarded();
    let mode = TerminalMode::for_process(terminal, args.console_socket.as_deref());
    let session = start_exec(&client, &vsock, &args.id, &exec_id, &process, &mode, false)?;
    if let Some(pid_file) = &args.pid_file {
        write_pid_file(pid_file, std::process::id() as i32)?;
    }
    Ok(finish(&client, session, &record, &exec_id))
}

/// `husk exec-process`: the background process of `exec --detach`.
pub fn exec_process(global: &GlobalArgs, args: &ExecProcessArgs) -> i32 {
    let sync = SyncWriter::from_env();
    signals::block_forwarded();
    // SAFETY: setsid has no memory effects; this process was just started by `exec` and is
    // not a process group leader, so it becomes a session leader without a terminal.
    unsafe { libc::setsid() };
    let started = (|| {
        let process: Value = serde_json::from_slice(&std::fs::read(&args.process)?)?;
        let _ = std::fs::remove_file(&args.process);
        let record = Container::open(&global.root, &args.id)?.load()?;
        let vsock = vsock_path(&global.root.join(&args.id));
        let client = agent::connect(&vsock).map_err(|_| anyhow!(NOT_RUNNING))?;
        let terminal = process["terminal"].as_bool().unwrap_or(false);
        // `exec` refused a terminal without a console socket.
        let mode = TerminalMode::for_process(terminal, args.console_socket.as_deref());
        let session = start_exec(&client, &vsock, &args.id, &args.exec_id, &process, &mode, true)?;
        anyhow::Ok((client, session, record))
    })();
    match started {
        Ok((client, session, record)) => {
            if sync.is_some_and(|sync| !sync.report(Ok(()))) {
                log::error!("husk exec went away before the exec was reported; ending it");
                let mut req = pb::SignalProcessRequest::new();
                req.container_id = args.id.clone();
                req.exec_id = args.exec_id.clone();
                req.signal = libc::SIGKILL as u32;
                let _ = client.signal_process(ctx(), &req);
            }
            finish(&client, session, &record, &args.exec_id)
        }
        Err(e) => {
            log::error!("{e:#}");
            if let Some(sync) = sync {
                sync.report(Err(format!("{e:#}")));
            }
            1
        }
    }
}

fn start_exec(
    client: &AgentClient,
    vsock: &Path,
    id: &str,
    exec_id: &str,
    process: &Value,
    mode: &TerminalMode,
    control: bool,
) -> anyhow::Result<Session> {
    let mut req = pb::ExecProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    req.process_json = serde_json::to_vec(process)?;
    let stdio = req.stdio.mut_or_insert_default();
    (stdio.stdin, stdio.stdout, stdio.stderr) = (true, true, true);
    client
        .exec_process(ctx(), &req)
        .map_err(|e| anyhow!("cannot exec in container \"{id}\": {}", describe(&e)))?;
    Session::attach(client.clone(), vsock, id, exec_id, mode, control)
}

/// Wait for the exec to end, forget it in the agent, and return its exit status.
fn finish(client: &AgentClient, session: Session, record: &Record, exec_id: &str) -> i32 {
    session.forward_signals();
    let id = &record.id;
    let code = match session.wait() {
        Ok(status) => status.exit_status,
        // The VM went down under the wait: the exec was killed with the container, as the
        // processes of a container whose init dies are (its pid namespace goes with it).
        Err(e) if vm_ended(record) => {
            log::debug!("exec {exec_id} in {id} ended with its VM: {e:#}");
            128 + libc::SIGKILL
        }
        Err(e) => {
            log::error!("exec {exec_id} in {id}: {e:#}");
            255
        }
    };
    let mut req = pb::RemoveProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    let _ = client.remove_process(ctx(), &req);
    code
}

fn new_exec_id() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("exec-{}-{:x}", std::process::id(), nanos)
}

/// The process to run: the --process file as it is, or the container's own process with the
/// command and the flags applied (as runc builds it).
fn process(args: &ExecArgs, spec_path: &Path) -> anyhow::Result<Value> {
    if let Some(path) = &args.process {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the process {}", path.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("the process in {} is not valid JSON", path.display()));
    }
    if args.command.is_empty() {
        bail!("exec args cannot be empty");
    }
    let spec: Value = serde_json::from_slice(
        &std::fs::read(spec_path).with_context(|| format!("reading {}", spec_path.display()))?,
    )?;
    let mut p = spec["process"].clone();
    p["args"] = json!(args.command);
    p["terminal"] = json!(args.tty);
    let mut env: Vec<String> = p["env"]
        .as_array()
        .map(|e| e.iter().filter_map(|v| v.as_str().map(String::from)).collect())
        .unwrap_or_default();
    for var in &args.env {
        let name = var.split('=').next().unwrap_or_default();
        env.retain(|e| e.split('=').next() != Some(name));
        env.push(var.clone());
    }
    p["env"] = json!(env);
    if let Some(cwd) = &args.cwd {
        p["cwd"] = json!(cwd);
    }
    if let Some(user) = &args.user {
        let (uid, gid) = match user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (user.as_str(), None),
        };
        let number = |s: &str| {
            s.parse::<u32>().map_err(|_| anyhow!("--user takes UID[:GID] as numbers, not {user:?}"))
        };
        p["user"]["uid"] = json!(number(uid)?);
        p["user"]["gid"] = json!(gid.map(number).transpose()?.unwrap_or(0));
    }
    if !args.additional_gids.is_empty() {
        p["user"]["additionalGids"] = json!(args.additional_gids);
    }
    if args.no_new_privs {
        p["noNewPrivileges"] = json!(true);
    }
    for cap in &args.cap {
        for set in ["bounding", "effective", "permitted"] {
            let list = &mut p["capabilities"][set];
            if !list.is_array() {
                *list = json!([]);
            }
            let list = list.as_array_mut().expect("made an array");
            if !list.iter().any(|c| c == cap.as_str()) {
                list.push(json!(cap));
            }
        }
    }
    Ok(p)
}
