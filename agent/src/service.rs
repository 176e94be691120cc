//! The ttrpc service: each request checked and turned into a container operation, each error
//! into a ttrpc status with its message.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_agent_protocol::agent::{self as pb, rootfs::Source};
use husk_agent_protocol::agent_ttrpc::Agent;
use ttrpc::TtrpcContext;

use crate::container::host_files::HostFile;
use crate::container::{Containers, CreateRequest, StdioRequest};
use crate::error::{Error, Result};
use crate::init::config::{RootfsMode, RootfsSource};
use crate::sync::lock;

/// How long the power-off waits for the answer that set it going to leave (ttrpc sends the
/// answer after the handler returns).
const ANSWER_GRACE: Duration = Duration::from_millis(100);

/// What Shutdown does (power the VM off, or end a host-mode agent); it runs after the answer
/// has had time to go out.
pub type ShutdownFn = Box<dyn Fn() + Send + Sync>;

pub struct Service {
    containers: Arc<Containers>,
    shutdown: Arc<ShutdownFn>,
    /// The agent is the guest's PID 1, so the hostname, network and clock of its namespaces
    /// are the guest's to change. Anywhere else (tests on a host) they would be the host's.
    guest: bool,
    power_off: Arc<Mutex<PowerOff>>,
}

/// Where the way to powering off stands.
#[derive(Default)]
struct PowerOff {
    /// Shutdown with `when_idle` came: power off once no container is left.
    when_idle: bool,
    /// Plain Shutdown came: power off whatever is left.
    now: bool,
    /// A power-off thread is on its way (at most one).
    pending: bool,
}

impl Service {
    pub fn new(containers: Arc<Containers>, shutdown: ShutdownFn, guest: bool) -> Self {
        Self {
            containers,
            shutdown: Arc::new(shutdown),
            guest,
            power_off: Arc::new(Mutex::new(PowerOff::default())),
        }
    }

    /// Power off after the current answer has gone out: kill and remove every container, then
    /// run the shutdown function. Unless `now` (here or from an earlier call), the power-off
    /// thread looks again after its wait and backs off if a container was created meanwhile;
    /// the RemoveContainer that removes it sets it going again.
    fn power_off_soon(&self, now: bool) -> Result<()> {
        let mut state = lock(&self.power_off);
        state.now |= now;
        if state.pending {
            return Ok(());
        }
        let containers = self.containers.clone();
        let shutdown = self.shutdown.clone();
        let power_off = self.power_off.clone();
        std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || {
                std::thread::sleep(ANSWER_GRACE);
                {
                    // Under the lock, so that a RemoveContainer finishing now finds `pending`
                    // cleared and sets the power-off going itself.
                    let mut state = lock(&power_off);
                    if !state.now && !containers.is_empty() {
                        log::info!("a container was created meanwhile: not powering off yet");
                        state.pending = false;
                        return;
                    }
                }
                containers.remove_all();
                shutdown();
            })
            .map_err(|e| Error::internal("starting the shutdown thread", &e))?;
        state.pending = true;
        Ok(())
    }

    /// After a request that may have left the guest without containers: power off if the host
    /// asked for that (Shutdown with `when_idle`) and none is left.
    fn power_off_if_idle(&self) {
        let when_idle = lock(&self.power_off).when_idle;
        if when_idle && self.containers.is_empty() {
            log::info!("no container left: powering off, as the host asked");
            if let Err(e) = self.power_off_soon(false) {
                log::warn!("{e}");
            }
        }
    }

    /// Refuse a change to guest-wide settings unless the agent is the guest's PID 1.
    fn guest_only(&self, what: &str) -> Result<()> {
        if self.guest {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "{what}: this agent is not the guest's PID 1 (it would change its host's settings)"
        )))
    }
}

/// Log a failed request and turn its error into a ttrpc status.
fn reply<T>(what: &str, r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        log::warn!("{what}: {e}");
        e.into()
    })
}

fn stdio(s: &protobuf::MessageField<pb::Stdio>) -> StdioRequest {
    s.as_ref().map_or_else(StdioRequest::default, |s| StdioRequest {
        stdin: s.stdin,
        stdout: s.stdout,
        stderr: s.stderr,
    })
}

fn rootfs(r: &protobuf::MessageField<pb::Rootfs>) -> Result<(RootfsSource, RootfsMode)> {
    let r = r.as_ref().ok_or_else(|| Error::InvalidArgument("no rootfs".into()))?;
    let source = match &r.source {
        Some(Source::Directory(d)) => RootfsSource::Directory(d.into()),
        Some(Source::Block(b)) => {
            RootfsSource::Block { device: b.device.clone().into(), fstype: b.fstype.clone() }
        }
        None => return Err(Error::InvalidArgument("the rootfs names no source".into())),
        Some(_) => return Err(Error::InvalidArgument("unknown rootfs source".into())),
    };
    let mode = match r.mode.enum_value() {
        Ok(pb::RootfsMode::READ_ONLY) => RootfsMode::ReadOnly,
        Ok(pb::RootfsMode::OVERLAY) => RootfsMode::Overlay,
        Ok(pb::RootfsMode::WRITABLE) => RootfsMode::Writable,
        Err(n) => return Err(Error::InvalidArgument(format!("unknown rootfs mode {n}"))),
    };
    Ok((source, mode))
}

impl Agent for Service {
    fn check(&self, _: &TtrpcContext, _: pb::CheckRequest) -> ttrpc::Result<pb::CheckResponse> {
        Ok(pb::CheckResponse { serving: true, ..Default::default() })
    }

    fn version(
        &self,
        _: &TtrpcContext,
        _: pb::VersionRequest,
    ) -> ttrpc::Result<pb::VersionResponse> {
        Ok(pb::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: husk_agent_protocol::PROTOCOL_VERSION,
            ..Default::default()
        })
    }

    fn create_container(
        &self,
        _: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("CreateContainer {}", req.container_id);
        let r = rootfs(&req.rootfs).and_then(|(rootfs, mode)| {
            self.containers.create(CreateRequest {
                id: req.container_id,
                spec_json: req.oci_spec_json,
                rootfs,
                mode,
                stdio: stdio(&req.stdio),
                host_files: req
                    .host_files
                    .into_iter()
                    .map(|f| HostFile { source: f.source.into(), content: f.content })
                    .collect(),
            })
        });
        // A failed create may leave no container.
        self.power_off_if_idle();
        reply(&what, r).map(|()| pb::Empty::new())
    }

    fn start_container(
        &self,
        _: &TtrpcContext,
        req: pb::StartContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("StartContainer {}", req.container_id);
        reply(&what, self.containers.start(&req.container_id)).map(|()| pb::Empty::new())
    }

    fn exec_process(
        &self,
        _: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("ExecProcess {}/{}", req.container_id, req.exec_id);
        let r = self.containers.exec(
            &req.container_id,
            &req.exec_id,
            &req.process_json,
            stdio(&req.stdio),
        );
        reply(&what, r).map(|()| pb::Empty::new())
    }

    fn signal_process(
        &self,
        _: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("SignalProcess {}/{} {}", req.container_id, req.exec_id, req.signal);
        let r = self.containers.signal(&req.container_id, &req.exec_id, req.signal, req.all);
        reply(&what, r).map(|()| pb::Empty::new())
    }

    fn wait_process(
        &self,
        _: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> ttrpc::Result<pb::WaitProcessResponse> {
        let what = format!("WaitProcess {}/{}", req.container_id, req.exec_id);
        let (status, oom) = reply(&what, self.containers.wait(&req.container_id, &req.exec_id))?;
        Ok(pb::WaitProcessResponse {
            exit_status: status.code(),
            signal: match status {
                crate::reaper::ExitStatus::Signaled(s) => s as u32,
                crate::reaper::ExitStatus::Exited(_) => 0,
            },
            oom_killed: oom,
            ..Default::default()
        })
    }

    fn close_stdin(
        &self,
        _: &TtrpcContext,
        req: pb::CloseStdinRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("CloseStdin {}/{}", req.container_id, req.exec_id);
        let r = self.containers.close_stdin(&req.container_id, &req.exec_id);
        reply(&what, r).map(|()| pb::Empty::new())
    }

    fn tty_win_resize(
        &self,
        _: &TtrpcContext,
        req: pb::TtyWinResizeRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("TtyWinResize {}/{}", req.container_id, req.exec_id);
        let r = self.containers.resize(&req.container_id, &req.exec_id, req.rows, req.columns);
        reply(&what, r).map(|()| pb::Empty::new())
    }

    fn list_processes(
        &self,
        _: &TtrpcContext,
        req: pb::ListProcessesRequest,
    ) -> ttrpc::Result<pb::ListProcessesResponse> {
        let what = format!("ListProcesses {}", req.container_id);
        let processes = reply(&what, self.containers.list(&req.container_id))?;
        Ok(pb::ListProcessesResponse { processes, ..Default::default() })
    }

    fn remove_process(
        &self,
        _: &TtrpcContext,
        req: pb::RemoveProcessRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("RemoveProcess {}/{}", req.container_id, req.exec_id);
        let r = self.containers.remove_process(&req.container_id, &req.exec_id);
        reply(&what, r).map(|()| pb::Empty::new())
    }

    fn remove_container(
        &self,
        _: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("RemoveContainer {}", req.container_id);
        let r = self.containers.remove(&req.container_id, req.force);
        self.power_off_if_idle();
        reply(&what, r).map(|()| pb::Empty::new())
    }

    fn pause_container(
        &self,
        _: &TtrpcContext,
        req: pb::PauseContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("PauseContainer {}", req.container_id);
        reply(&what, self.containers.pause(&req.container_id)).map(|()| pb::Empty::new())
    }

    fn resume_container(
        &self,
        _: &TtrpcContext,
        req: pb::ResumeContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("ResumeContainer {}", req.container_id);
        reply(&what, self.containers.resume(&req.container_id)).map(|()| pb::Empty::new())
    }

    fn stats_container(
        &self,
        _: &TtrpcContext,
        req: pb::StatsContainerRequest,
    ) -> ttrpc::Result<pb::StatsContainerResponse> {
        let what = format!("StatsContainer {}", req.container_id);
        let mut stats = reply(&what, self.containers.stats(&req.container_id))?;
        stats.networks = crate::net::counters();
        Ok(stats)
    }

    fn update_container(
        &self,
        _: &TtrpcContext,
        req: pb::UpdateContainerRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let what = format!("UpdateContainer {}", req.container_id);
        let r = self.containers.update(&req.container_id, &req.resources_json);
        reply(&what, r).map(|()| pb::Empty::new())
    }

    fn set_hostname(
        &self,
        _: &TtrpcContext,
        req: pb::SetHostnameRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let r = if let Err(e) = self.guest_only("SetHostname") {
            Err(e)
        } else if req.hostname.is_empty() || req.hostname.len() > 64 || req.hostname.contains('\0')
        {
            Err(Error::InvalidArgument(format!("invalid hostname {:?}", req.hostname)))
        } else {
            nix::unistd::sethostname(&req.hostname)
                .map_err(|e| Error::internal(format!("sethostname {}", req.hostname), &e))
        };
        reply("SetHostname", r).map(|()| pb::Empty::new())
    }

    fn update_interface(
        &self,
        _: &TtrpcContext,
        req: pb::UpdateInterfaceRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let r = self.guest_only("UpdateInterface").and_then(|()| match req.interface.as_ref() {
            Some(iface) => crate::net::update_interface(iface),
            None => Err(Error::InvalidArgument("no interface".into())),
        });
        reply("UpdateInterface", r).map(|()| pb::Empty::new())
    }

    fn update_routes(
        &self,
        _: &TtrpcContext,
        req: pb::UpdateRoutesRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let r =
            self.guest_only("UpdateRoutes").and_then(|()| crate::net::update_routes(&req.routes));
        reply("UpdateRoutes", r).map(|()| pb::Empty::new())
    }

    fn set_time(&self, _: &TtrpcContext, req: pb::SetTimeRequest) -> ttrpc::Result<pb::Empty> {
        let r = crate::clock::set_if_off(req.seconds, req.nanos, self.guest);
        reply("SetTime", r).map(|_| pb::Empty::new())
    }

    fn add_entropy(
        &self,
        _: &TtrpcContext,
        req: pb::AddEntropyRequest,
    ) -> ttrpc::Result<pb::Empty> {
        let r = self.guest_only("AddEntropy").and_then(|()| crate::entropy::add(&req.data));
        reply("AddEntropy", r).map(|()| pb::Empty::new())
    }

    fn shutdown(&self, _: &TtrpcContext, req: pb::ShutdownRequest) -> ttrpc::Result<pb::Empty> {
        if req.when_idle {
            log::info!("shutdown requested once no container is left");
            lock(&self.power_off).when_idle = true;
            self.power_off_if_idle();
            return Ok(pb::Empty::new());
        }
        log::info!("shutdown requested");
        reply("Shutdown", self.power_off_soon(true)).map(|()| pb::Empty::new())
    }
}
