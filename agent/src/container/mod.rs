//! The containers the agent runs: creating one (its cgroup, then its helper, which sets it up),
//! starting it, exec, signals, waits, stdio attachment, pausing and removal.

pub mod cgroup;
pub mod host_files;
mod launch;
pub mod process;
mod procs;
pub mod spec;
mod stats;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use husk_agent_protocol::agent::{ProcessInfo, StatsContainerResponse};
use husk_agent_protocol::valid_id;

use crate::channel::{Channel, ChannelError};
use crate::error::{Error, Result};
use crate::init::config::{CreateSetup, FromInit, InitConfig, RootfsMode, RootfsSource, Setup};
use crate::reaper::{ExitStatus, Reaper, Spawned};
use crate::sync::{lock, read, write};
use cgroup::{Cgroup, CgroupRoot};
use host_files::HostFile;
use launch::{launch, PidNs};
use process::{Process, StdioPlan};
use spec::{Ns, NsPlan};

/// How long a helper may take to set a process up before the request fails.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long removal waits for a killed container to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pause or resume waits for the kernel to freeze or thaw the cgroup.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which stdio streams the host will attach.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdioRequest {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

pub struct CreateRequest {
    pub id: String,
    pub spec_json: Vec<u8>,
    pub rootfs: RootfsSource,
    pub mode: RootfsMode,
    pub stdio: StdioRequest,
    pub host_files: Vec<HostFile>,
}

/// The agent's containers and what it needs to make more.
pub struct Containers {
    reaper: Arc<Reaper>,
    /// The agent's own executable (run as `husk-agent init`).
    exe: PathBuf,
    cgroups: CgroupRoot,
    /// Each container's directory (`<state_dir>/<id>`): where its helper stages its root
    /// (`staging`) and its host files' copies (`files`).
    state_dir: PathBuf,
    map: Mutex<HashMap<String, Arc<Container>>>,
    /// Ids being created (so two creates of one id cannot race).
    creating: Mutex<HashSet<String>>,
}

struct Container {
    id: String,
    cgroup: Cgroup,
    namespaces: NsPlan,
    /// The seccomp profile, for execs too.
    seccomp: Option<oci_spec::runtime::LinuxSeccomp>,
    init: Arc<Process>,
    /// The channel to the helper until StartContainer.
    starter: Mutex<Option<Channel>>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Exec ids being started.
    starting: Mutex<HashSet<String>>,
    /// Frozen by PauseContainer. Start and exec hold it for reading while they run, so that a
    /// pause waits for them rather than freezing a helper half way.
    paused: RwLock<bool>,
    /// Its directory under the state directory.
    dir: PathBuf,
}

impl Containers {
    pub fn new(reaper: Arc<Reaper>, exe: PathBuf, cgroups: CgroupRoot, state_dir: PathBuf) -> Self {
        Self {
            reaper,
            exe,
            cgroups,
            state_dir,
            map: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.map)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no container {id:?}")))
    }

    /// The container's own process (empty `exec_id`) or one of its execs.
    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        let execs = lock(&c.execs);
        execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no process {exec_id:?} in container {id:?}")))
    }

    pub fn create(&self, req: CreateRequest) -> Result<()> {
        let id = req.id.clone();
        if !valid_id(&id) {
            return Err(Error::InvalidArgument(format!("invalid container id {id:?}")));
        }
        if lock(&self.map).contains_key(&id) || !lock(&self.creating).insert(id.clone()) {
            return Err(Error::AlreadyExists(format!("container {id:?} exists")));
        }
        // Into the map before out of `creating`, so that is_empty cannot miss it.
        let result = self.create_reserved(req).map(|container| {
            lock(&self.map).insert(id.clone(), Arc::new(container));
        });
        lock(&self.creating).remove(&id);
        result
    }

    /// No container exists, and none is being created.
    pub fn is_empty(&self) -> bool {
        // `creating` first: a create moves an id from it into the map in that order (see
        // create), so an id cannot slip between the two looks.
        lock(&self.creating).is_empty() && lock(&self.map).is_empty()
    }

    fn create_reserved(&self, req: CreateRequest) -> Result<Container> {
        let mut spec = spec::parse(&req.spec_json)?;
        let namespaces = spec::namespaces(&spec)?;
        check_rootfs(&req.rootfs)?;
        let dir = self.state_dir.join(&req.id);
        let (staging, files) = (dir.join("staging"), dir.join("files"));
        let copies = host_files::redirect(&mut spec, &req.host_files, &files)?;
        let process =
            spec.process().clone().ok_or_else(|| Error::InvalidArgument("no process".into()))?;
        let terminal = process.terminal().unwrap_or(false);
        let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        let cgroup = self
            .cgroups
            .create(&req.id)
            .map_err(|e| Error::internal(format!("creating the cgroup of {}", req.id), &e))?;
        let result = (|| {
            if let Some(r) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
                cgroup.apply(r).map_err(limits_error)?;
            }
            std::fs::create_dir_all(&staging)
                .map_err(|e| Error::internal(format!("mkdir {}", staging.display()), &e))?;
            host_files::write(&files, &copies)?;
            let pid_ns = match namespaces.join.iter().find(|(ns, _)| *ns == Ns::Pid) {
                Some((_, path)) => PidNs::JoinPath(path),
                None if namespaces.new.contains(&Ns::Pid) => PidNs::New,
                None => PidNs::Inherit,
            };
            let s = req.stdio;
            let mut plan = StdioPlan::new(s.stdin, s.stdout, s.stderr, terminal)?;
            let config = InitConfig {
                process,
                cgroup: cgroup.path().to_path_buf(),
                seccomp: seccomp.clone(),
                setup: Setup::Create(Box::new(CreateSetup {
                    spec,
                    rootfs: req.rootfs.clone(),
                    mode: req.mode,
                    namespaces: namespaces.clone(),
                    staging,
                })),
            };
            let oom_before = cgroup.oom_kills();
            let (spawned, chan) =
                launch(&self.reaper, &self.exe, config, plan.take_child(), pid_ns, None)?;
            let tty = match wait_ready(&chan, &spawned) {
                Ok(tty) => tty,
                Err(e) => {
                    kill_and_wait(&spawned);
                    return Err(e);
                }
            };
            let init = Process::new(spawned, plan, tty, oom_before)?;
            Ok((init, chan))
        })();
        match result {
            Ok((init, chan)) => {
                log::info!("container {} created (process {})", req.id, init.pid);
                Ok(Container {
                    id: req.id,
                    cgroup,
                    namespaces,
                    seccomp,
                    init: Arc::new(init),
                    starter: Mutex::new(Some(chan)),
                    execs: Mutex::new(HashMap::new()),
                    starting: Mutex::new(HashSet::new()),
                    paused: RwLock::new(false),
                    dir,
                })
            }
            Err(e) => {
                remove_cgroup(&cgroup);
                remove_dir(&dir);
                Err(e)
            }
        }
    }

    pub fn start(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        // A created container cannot be paused; this keeps a pause out until it runs.
        let _paused = read(&c.paused);
        let chan = lock(&c.starter).take().ok_or_else(|| {
            Error::FailedPrecondition(format!("container {id:?} was already started"))
        })?;
        if let Some(status) = c.init.exited() {
            return Err(Error::FailedPrecondition(format!(
                "container {id:?} exited before it was started ({status:?})"
            )));
        }
        chan.send(&crate::init::config::ToInit::Start, &[])
            .map_err(|e| Error::internal(format!("starting container {id:?}"), &e))?;
        wait_exec(&chan)?;
        log::info!("container {id} started");
        Ok(())
    }

    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: StdioRequest,
    ) -> Result<()> {
        if !valid_id(exec_id) {
            return Err(Error::InvalidArgument(format!("invalid exec id {exec_id:?}")));
        }
        let process = spec::parse_process(process_json)?;
        let c = self.get(id)?;
        let paused = read(&c.paused);
        if *paused {
            // The helper would freeze as soon as it joined the cgroup.
            return Err(Error::FailedPrecondition(format!("container {id:?} is paused")));
        }
        c.check_running()?;
        if lock(&c.execs).contains_key(exec_id) || !lock(&c.starting).insert(exec_id.into()) {
            return Err(Error::AlreadyExists(format!("process {exec_id:?} exists in {id:?}")));
        }
        let result = self.exec_reserved(&c, process, stdio);
        drop(paused);
        lock(&c.starting).remove(exec_id);
        let p = result?;
        log::info!("exec {exec_id} in {id} (process {})", p.pid);
        lock(&c.execs).insert(exec_id.to_string(), Arc::new(p));
        Ok(())
    }

    fn exec_reserved(
        &self,
        c: &Container,
        process: oci_spec::runtime::Process,
        stdio: StdioRequest,
    ) -> Result<Process> {
        let terminal = process.terminal().unwrap_or(false);
        let mut plan = StdioPlan::new(stdio.stdin, stdio.stdout, stdio.stderr, terminal)?;
        let config = InitConfig {
            process,
            cgroup: c.cgroup.path().to_path_buf(),
            seccomp: c.seccomp.clone(),
            setup: Setup::Exec { namespaces: c.namespaces.own() },
        };
        let init_pidfd = c.init.pidfd().as_fd();
        let pid_ns =
            if c.namespaces.has(Ns::Pid) { PidNs::JoinPidfd(init_pidfd) } else { PidNs::Inherit };
        let oom_before = c.cgroup.oom_kills();
        let (spawned, chan) =
            launch(&self.reaper, &self.exe, config, plan.take_child(), pid_ns, Some(init_pidfd))?;
        let tty = match wait_ready(&chan, &spawned).and_then(|tty| wait_exec(&chan).map(|()| tty)) {
            Ok(tty) => tty,
            Err(e) => {
                kill_and_wait(&spawned);
                return Err(e);
            }
        };
        Process::new(spawned, plan, tty, oom_before)
    }

    pub fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        if signal > libc::SIGRTMAX() as u32 {
            return Err(Error::InvalidArgument(format!("invalid signal {signal}")));
        }
        let signal = signal as i32;
        let p = self.process(id, exec_id)?;
        if !all {
            return p.signal(signal);
        }
        let c = self.get(id)?;
        if signal == libc::SIGKILL {
            return c.cgroup.kill().map_err(|e| Error::internal("killing the container", &e));
        }
        let pids = c.cgroup.pids().map_err(|e| Error::internal("listing the container", &e))?;
        for pid in pids {
            // SAFETY: kill takes a pid and a signal; no memory is involved. The pids were in
            // the container's cgroup a moment ago.
            unsafe { libc::kill(pid, signal) };
        }
        Ok(())
    }

    /// Wait for a process to exit: its status and whether the OOM killer ended it.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<(ExitStatus, bool)> {
        let c = self.get(id)?;
        let p = self.process(id, exec_id)?;
        let status = p.exit().wait();
        Ok((status, p.oom_killed(status, c.cgroup.oom_kills())))
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        self.process(id, exec_id)?.close_stdin()
    }

    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, columns: u32) -> Result<()> {
        let (Ok(rows), Ok(columns)) = (u16::try_from(rows), u16::try_from(columns)) else {
            return Err(Error::InvalidArgument(format!("window size {rows}x{columns}")));
        };
        self.process(id, exec_id)?.resize(rows, columns)
    }

    pub fn list(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        let c = self.get(id)?;
        let pids = c.cgroup.pids().map_err(|e| Error::internal("listing the container", &e))?;
        Ok(pids.into_iter().filter_map(procs::info).collect())
    }

    /// The container's cgroup counters.
    pub fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        let c = self.get(id)?;
        stats::read(c.cgroup.path())
            .map_err(|e| Error::internal(format!("reading the counters of {id:?}"), &e))
    }

    /// Change the container's limits (the OCI spec's linux.resources as JSON).
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let resources = serde_json::from_slice::<oci_spec::runtime::LinuxResources>(resources_json)
            .map_err(|e| Error::InvalidArgument(format!("the OCI resources are not valid: {e}")))?;
        let c = self.get(id)?;
        c.cgroup.apply(&resources).map_err(limits_error)?;
        log::info!("container {id} updated");
        Ok(())
    }

    /// Forget an exec that has exited (its exit status and stdio go with it).
    pub fn remove_process(&self, id: &str, exec_id: &str) -> Result<()> {
        if exec_id.is_empty() {
            return Err(Error::InvalidArgument(
                "the container's own process goes with RemoveContainer".into(),
            ));
        }
        let c = self.get(id)?;
        let mut execs = lock(&c.execs);
        let p = execs.get(exec_id).ok_or_else(|| {
            Error::NotFound(format!("no process {exec_id:?} in container {id:?}"))
        })?;
        if p.exited().is_none() {
            return Err(Error::FailedPrecondition(format!("process {exec_id:?} is running")));
        }
        execs.remove(exec_id);
        Ok(())
    }

    /// Freeze every process of a running container.
    pub fn pause(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut paused = write(&c.paused);
        if *paused {
            return Err(Error::FailedPrecondition(format!("container {id:?} is already paused")));
        }
        c.check_running()?;
        c.cgroup
            .set_frozen(true, FREEZE_TIMEOUT)
            .map_err(|e| Error::internal(format!("pausing container {id:?}"), &e))?;
        *paused = true;
        log::info!("container {id} paused");
        Ok(())
    }

    /// Thaw a paused container.
    pub fn resume(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let mut paused = write(&c.paused);
        if !*paused {
            return Err(Error::FailedPrecondition(format!("container {id:?} is not paused")));
        }
        c.cgroup
            .set_frozen(false, FREEZE_TIMEOUT)
            .map_err(|e| Error::internal(format!("resuming container {id:?}"), &e))?;
        *paused = false;
        log::info!("container {id} resumed");
        Ok(())
    }

    pub fn remove(&self, id: &str, force: bool) -> Result<()> {
        let c = self.get(id)?;
        let created = lock(&c.starter).is_some();
        if c.init.exited().is_none() && !created && !force {
            return Err(Error::FailedPrecondition(format!(
                "container {id:?} is running (kill it first, or force)"
            )));
        }
        lock(&self.map).remove(id);
        c.destroy()
    }

    /// Kill and remove every container (shutdown).
    pub fn remove_all(&self) {
        let all: Vec<_> = lock(&self.map).drain().map(|(_, c)| c).collect();
        for c in all {
            if let Err(e) = c.destroy() {
                log::warn!("removing container {}: {e}", c.id);
            }
        }
    }

    pub fn cgroup_root(&self) -> &Path {
        self.cgroups.path()
    }
}

impl Container {
    /// Started and its own process not exited.
    fn check_running(&self) -> Result<()> {
        let id = &self.id;
        if lock(&self.starter).is_some() {
            return Err(Error::FailedPrecondition(format!("container {id:?} is not started")));
        }
        if self.init.exited().is_some() {
            return Err(Error::FailedPrecondition(format!("container {id:?} is stopped")));
        }
        Ok(())
    }

    fn destroy(&self) -> Result<()> {
        // A created container's helper exits when its channel closes.
        drop(lock(&self.starter).take());
        if *read(&self.paused) {
            // Thawed first, so that nothing of it is left frozen when it is killed.
            if let Err(e) = self.cgroup.set_frozen(false, FREEZE_TIMEOUT) {
                log::warn!("thawing container {}: {e}", self.id);
            }
        }
        if self.init.exited().is_none() {
            if let Err(e) = self.cgroup.kill() {
                log::warn!("killing container {}: {e}", self.id);
            }
            let _ = crate::pidfd::send_signal(self.init.pidfd(), libc::SIGKILL);
            if self.init.exit().wait_timeout(KILL_TIMEOUT).is_none() {
                return Err(Error::Internal(format!(
                    "container {} did not die within {KILL_TIMEOUT:?}",
                    self.id
                )));
            }
        }
        // Processes outside the pid namespace (or without one) may still be there.
        let _ = self.cgroup.kill();
        lock(&self.execs).clear();
        let result = self
            .cgroup
            .remove(KILL_TIMEOUT)
            .map_err(|e| Error::internal(format!("removing the cgroup of {}", self.id), &e));
        remove_dir(&self.dir);
        log::info!("container {} removed", self.id);
        result
    }
}

/// Whether the rootfs the host named is there.
fn check_rootfs(r: &RootfsSource) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match r {
        RootfsSource::Directory(d) => {
            if !d.is_absolute() || !d.is_dir() {
                return Err(Error::InvalidArgument(format!(
                    "rootfs directory {} does not exist (or is not an absolute path)",
                    d.display()
                )));
            }
        }
        RootfsSource::Block { device, fstype } => {
            let is_blk = std::fs::metadata(device).is_ok_and(|m| m.file_type().is_block_device());
            if !is_blk {
                return Err(Error::InvalidArgument(format!(
                    "rootfs disk {} is missing (not a block device in the guest)",
                    device.display()
                )));
            }
            if fstype.is_empty() || fstype.contains(['\0', ',']) {
                return Err(Error::InvalidArgument(format!("rootfs fstype {fstype:?}")));
            }
        }
    }
    Ok(())
}

/// Wait for the helper's Ready (and the pty master with it).
fn wait_ready(chan: &Channel, spawned: &Spawned) -> Result<Option<OwnedFd>> {
    chan.set_timeout(Some(SETUP_TIMEOUT)).map_err(|e| Error::internal("channel", &e))?;
    match chan.recv::<FromInit>() {
        Ok((FromInit::Ready, mut fds)) => Ok(fds.pop()),
        Ok((FromInit::Failed(message), _)) => Err(Error::Internal(message)),
        Err(ChannelError::Eof) => {
            let status = spawned.exit.wait_timeout(Duration::from_secs(5));
            Err(Error::Internal(format!("the container process died during setup ({status:?})")))
        }
        Err(e) => Err(Error::internal("waiting for the container process to be set up", &e)),
    }
}

/// After Start (or Ready for an exec): the channel closes when execve succeeds.
fn wait_exec(chan: &Channel) -> Result<()> {
    match chan.recv::<FromInit>() {
        Err(ChannelError::Eof) => Ok(()),
        Ok((FromInit::Failed(message), _)) => Err(Error::FailedPrecondition(message)),
        Ok((FromInit::Ready, _)) => Err(Error::Internal("unexpected Ready".into())),
        Err(e) => Err(Error::internal("waiting for the program to start", &e)),
    }
}

fn kill_and_wait(spawned: &Spawned) {
    let _ = crate::pidfd::send_signal(&spawned.pidfd, libc::SIGKILL);
    if spawned.exit.wait_timeout(KILL_TIMEOUT).is_none() {
        log::warn!("process {} did not die", spawned.pid);
    }
}

/// A failure to set limits: the guest's if writing failed, else the request's.
fn limits_error(e: cgroup::CgroupError) -> Error {
    match e {
        cgroup::CgroupError::Io { .. } => Error::internal("setting cgroup limits", &e),
        _ => Error::InvalidArgument(e.to_string()),
    }
}

/// Remove a container's directory: the host files' copies and the empty staging directory (its
/// mounts were in the container's mount namespace). Not remove_dir_all, which would go down
/// into a mount left there by mistake.
fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir.join("files"));
    let _ = std::fs::remove_dir(dir.join("staging"));
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("removing {}: {e}", dir.display());
        }
    }
}

fn remove_cgroup(cgroup: &Cgroup) {
    let _ = cgroup.kill();
    if let Err(e) = cgroup.remove(KILL_TIMEOUT) {
        log::warn!("{e}");
    }
}
