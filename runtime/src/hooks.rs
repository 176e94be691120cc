//! OCI hooks (config.json `hooks`), run on the host as runc runs them: each hook's `path` with
//! its `args` (the first is argv[0]) and only its `env`, the container's state JSON on its
//! stdin, killed after its `timeout` seconds if it has one.
//!
//! Where husk runs them:
//! - `prestart` and `createRuntime`: in the VM process, once it is in the container's network
//!   namespace (a new one, or the spec's) and before the VM boots, with the VM process's pid in
//!   the state, status "creating". They run in the runtime's namespaces: the hook processes go
//!   back to the network namespace husk was started in. Docker's libnetwork puts the
//!   container's veth into the namespace of that pid from its prestart hook, which is why the
//!   VM process takes the network over only after the hooks.
//! - `poststart`: after the container's process started (`start`, `run`); a failure is logged
//!   as a warning, as the runtime spec asks.
//! - `poststop`: when the container is deleted; a failure is logged as a warning.
//! - `createContainer` and `startContainer` run in the container's own namespaces, which are
//!   inside the guest: the bundle check refuses a spec that has them (see `bundle`).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Spec};

/// The hooks husk runs, by the name the runtime spec gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Prestart,
    CreateRuntime,
    Poststart,
    Poststop,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Prestart => "prestart",
            Stage::CreateRuntime => "createRuntime",
            Stage::Poststart => "poststart",
            Stage::Poststop => "poststop",
        }
    }

    fn hooks(self, spec: &Spec) -> &[Hook] {
        let Some(hooks) = spec.hooks() else { return &[] };
        #[allow(deprecated)] // prestart is deprecated in the spec, and still what Docker uses
        let list = match self {
            Stage::Prestart => hooks.prestart(),
            Stage::CreateRuntime => hooks.create_runtime(),
            Stage::Poststart => hooks.poststart(),
            Stage::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or_default()
    }
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("error running {stage} hook #{index} ({path}): {source}")]
    Start {
        stage: &'static str,
        index: usize,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("error running {stage} hook #{index} ({path}): {status}, stdout: {stdout:?}, stderr: {stderr:?}")]
    Failed {
        stage: &'static str,
        index: usize,
        path: String,
        status: String,
        stdout: String,
        stderr: String,
    },
}

/// How much of a hook's output goes into an error.
const OUTPUT_LIMIT: u64 = 4096;

/// Run `stage`'s hooks of `spec` in order with `state` on their stdin; the first failure ends
/// the run. With `netns`, each hook process enters that network namespace before it starts.
pub fn run(
    spec: &Spec,
    stage: Stage,
    state: &serde_json::Value,
    netns: Option<&File>,
) -> Result<(), HookError> {
    let state = serde_json::to_vec(state).expect("a JSON value serializes");
    for (index, hook) in stage.hooks(spec).iter().enumerate() {
        log::debug!("running {} hook #{index}: {}", stage.name(), hook.path().display());
        run_one(hook, &state, netns).map_err(|failure| failure.into_error(stage, index, hook))?;
    }
    Ok(())
}

/// Run `stage`'s hooks as the spec asks for poststart and poststop: a failure is a warning.
pub fn run_warning(spec: &Spec, stage: Stage, state: &serde_json::Value) {
    if let Err(e) = run(spec, stage, state, None) {
        log::warn!("{e}");
    }
}

enum Failure {
    Start(std::io::Error),
    Exit { status: String, stdout: String, stderr: String },
}

impl Failure {
    fn into_error(self, stage: Stage, index: usize, hook: &Hook) -> HookError {
        let (stage, path) = (stage.name(), hook.path().display().to_string());
        match self {
            Failure::Start(source) => HookError::Start { stage, index, path, source },
            Failure::Exit { status, stdout, stderr } => {
                HookError::Failed { stage, index, path, status, stdout, stderr }
            }
        }
    }
}

fn run_one(hook: &Hook, state: &[u8], netns: Option<&File>) -> Result<(), Failure> {
    let mut cmd = Command::new(hook.path());
    if let Some(args) = hook.args() {
        if let Some((arg0, rest)) = args.split_first() {
            cmd.arg0(arg0).args(rest);
        }
    }
    cmd.env_clear();
    for entry in hook.env().as_deref().unwrap_or_default() {
        match entry.split_once('=') {
            Some((key, value)) => cmd.env(key, value),
            None => cmd.env(entry, ""),
        };
    }
    // Output goes to memory files, not pipes: a hook that leaves a daemon holding its stdout
    // must not keep husk waiting for EOF.
    let stdout = memfd("hook-stdout").map_err(Failure::Start)?;
    let stderr = memfd("hook-stderr").map_err(Failure::Start)?;
    cmd.stdin(Stdio::piped())
        .stdout(stdout.try_clone().map_err(Failure::Start)?)
        .stderr(stderr.try_clone().map_err(Failure::Start)?);
    if let Some(netns) = netns {
        let fd = netns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; `fd` stays open in the child until exec (the
        // caller holds the file), and the child is single-threaded here.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }
    let mut child = cmd.spawn().map_err(Failure::Start)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook need not read its stdin: a broken pipe is not an error.
        let _ = stdin.write_all(state);
    }
    let timeout = hook.timeout().filter(|t| *t > 0).map(|t| Duration::from_secs(t as u64));
    let status = wait(&mut child, timeout).map_err(Failure::Start)?;
    match status {
        Some(status) if status.success() => Ok(()),
        status => Err(Failure::Exit {
            status: status.map_or_else(
                || format!("timed out after {} s", timeout.unwrap_or_default().as_secs()),
                |s| s.to_string(),
            ),
            stdout: read_back(stdout),
            stderr: read_back(stderr),
        }),
    }
}

/// Wait for `child`; `None` when it outlived `timeout` (it is killed and reaped then).
fn wait(
    child: &mut std::process::Child,
    timeout: Option<Duration>,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let Some(timeout) = timeout else { return child.wait().map(Some) };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn memfd(name: &str) -> std::io::Result<File> {
    let name = std::ffi::CString::new(name).expect("no NUL in the name");
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new descriptor.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor owned here.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The start of what a hook wrote to `file`, trimmed.
fn read_back(mut file: File) -> String {
    let mut text = String::new();
    let _ = file.rewind();
    let _ = (&mut file).take(OUTPUT_LIMIT).read_to_string(&mut text);
    text.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_tests::tiny_guest::TempDir;
    use serde_json::json;

    fn spec_with(stage: &str, hooks: serde_json::Value) -> Spec {
        let mut spec = serde_json::to_value(Spec::default()).unwrap();
        spec["hooks"] = json!({ stage: hooks });
        serde_json::from_value(spec).unwrap()
    }

    #[test]
    fn hooks_get_the_state_on_stdin_their_args_and_only_their_env() {
        let dir = TempDir::new("hooks");
        let out = dir.path().join("out");
        let script = format!(
            "tr '\\0' ' ' < /proc/$$/cmdline > {0}; echo; echo \"$1 FOO=$FOO HOME=${{HOME:-unset}}\"; cat",
            out.display()
        );
        let script = format!("({script}) >> {}", out.display());
        let spec = spec_with(
            "prestart",
            json!([{"path": "/bin/sh", "args": ["hook-name", "-c", script, "zero", "first"],
                    "env": ["FOO=bar"]}]),
        );
        let state = json!({"id": "c1", "pid": 42, "status": "creating"});
        run(&spec, Stage::Prestart, &state, None).unwrap();
        let written = std::fs::read_to_string(&out).unwrap();
        let lines: Vec<&str> = written.splitn(3, '\n').collect();
        assert!(lines[0].starts_with("hook-name -c "), "{written}");
        assert_eq!(lines[1], "first FOO=bar HOME=unset");
        assert_eq!(serde_json::from_str::<serde_json::Value>(lines[2]).unwrap(), state);
    }

    #[test]
    fn hooks_run_in_order_and_the_first_failure_stops_them() {
        let dir = TempDir::new("hooks");
        let out = dir.path().join("out");
        let hook = |text: &str, code: i32| {
            json!({"path": "/bin/sh",
                   "args": ["sh", "-c", format!("echo {text} >> {}; echo said-{text}; echo err-{text} >&2; exit {code}", out.display())]})
        };
        let spec =
            spec_with("createRuntime", json!([hook("one", 0), hook("two", 3), hook("three", 0)]));
        let err = run(&spec, Stage::CreateRuntime, &json!({}), None).unwrap_err().to_string();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one\ntwo\n");
        assert!(err.contains("createRuntime hook #1 (/bin/sh)"), "{err}");
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("said-two") && err.contains("err-two"), "{err}");
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed() {
        let spec = spec_with(
            "poststart",
            json!([{"path": "/bin/sh", "args": ["sh", "-c", "sleep 60"], "timeout": 1}]),
        );
        let started = Instant::now();
        let err = run(&spec, Stage::Poststart, &json!({}), None).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(err.contains("timed out after 1 s"), "{err}");
    }

    #[test]
    fn a_missing_hook_binary_is_an_error_that_names_it() {
        let spec = spec_with("poststop", json!([{"path": "/no/such/hook"}]));
        let err = run(&spec, Stage::Poststop, &json!({}), None).unwrap_err().to_string();
        assert!(err.contains("poststop hook #0 (/no/such/hook)"), "{err}");
    }

    #[test]
    fn hooks_enter_the_network_namespace_they_are_given() {
        let dir = TempDir::new("hooks");
        let out = dir.path().join("out");
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let spec = spec_with(
            "prestart",
            json!([{"path": "/bin/sh",
                    "args": ["sh", "-c", format!("readlink /proc/self/ns/net > {}", out.display())]}]),
        );
        // In a new namespace on a thread of its own, the hook is sent back to ours.
        let netns = File::open("/proc/self/ns/net").unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare changes only this thread's network namespace.
                assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
                let here = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
                assert_ne!(here, ours);
                run(&spec, Stage::Prestart, &json!({}), Some(&netns)).unwrap();
            });
        });
        let seen = std::fs::read_to_string(&out).unwrap();
        assert_eq!(seen.trim(), ours.to_str().unwrap());
    }
}
