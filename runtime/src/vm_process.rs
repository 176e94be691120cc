//! A container's VM process: the host process that owns the container's micro-VM (the VMM
//! library runs in it, on its own threads), creates the container through the guest agent,
//! carries its stdio or terminal and the signals it gets, and exits with the container's exit
//! status (128 + the signal when a signal ended it). `create` starts it in the background
//! (`husk vm-process`) and returns once the container is created; `run` without --detach is
//! one itself.

use std::fs::File;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use husk_agent_protocol::agent as pb;
use husk_agent_protocol::client::AgentClient;
use husk_agent_protocol::hybrid_vsock::SocketPath;
use vmm::config::{ConsoleConfig, ConsoleOutput, VmConfig};
use vmm::devices::virtio::block::BlockConfig;
use vmm::devices::virtio::net::format_mac;
use vmm::devices::virtio::vsock::VsockConfig;
use vmm::micro_vm::{MicroVm, VmOutcome, VmmError};
use vmm::zero_pages::ZeroPageReclaim;
use vmm_sys_util::eventfd::EventFd;

use crate::agent::{self, ctx, describe};
use crate::boot_files::{self, BootFile};
use crate::bundle::Bundle;
use crate::container::{console_path, vsock_path, Record};
use crate::hooks::{self, Stage};
use crate::host_cgroup;
use crate::network::{self, GuestNetwork, Network, NetworkRecord, Placement};
use crate::session::{Session, TerminalMode};
use crate::settings::Settings;
use crate::vm_template;

/// The guest's context id on its vsock device.
const GUEST_CID: u64 = 3;
/// The largest MTU a guest NIC gets: the VMM's receive buffers hold 1500-byte frames.
const MAX_GUEST_MTU: u32 = 1500;
/// The rootfs disk in the guest: the first virtio-blk device.
const ROOTFS_DEVICE: &str = "/dev/vda";
/// Kernel parameters of every container's guest, before the user's. No kernel memory
/// accounting in the guest's cgroups: the VM's memory is what bounds the container's kernel
/// memory, and with accounting on, each per-CPU memory chunk the guest kernel adds when the
/// agent makes the container's cgroups carries 4 MiB of accounting metadata (4 of the 48 MiB
/// an idle container cost the host, measured). User memory is still charged and limited.
const GUEST_CMDLINE: &str = "cgroup.memory=nokmem";
/// The guest kernel keeps its boot messages off the serial console (errors and worse still
/// reach it): every byte written there is a VM exit, and the whole boot log made `husk run
/// true` in the nested test host take 3277 instead of 2260 ms (medians of 10 interleaved
/// runs, 2026-12-05). `loglevel=7` in the user's parameters, which come after, brings it back.
const QUIET_CMDLINE: &str = "quiet";

/// The guest's kernel parameters after the VMM's own: husk's, then the user's (which win, as
/// later parameters do).
fn guest_cmdline(user: &str) -> String {
    [GUEST_CMDLINE, QUIET_CMDLINE, user]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A micro-VM running on its own threads, stopped when this is dropped.
struct VmHandle {
    stop: EventFd,
    zero_pages: ZeroPageReclaim,
    thread: Option<JoinHandle<Result<VmOutcome, VmmError>>>,
    /// The path the VMM has its vsock socket at, valid while this lives.
    _vsock: SocketPath,
}

impl VmHandle {
    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let given_back = self.zero_pages.reclaimed_bytes() >> 10;
            match thread.join() {
                Ok(Ok(outcome)) => {
                    log::debug!(
                        "the VM ended: {:?}; {given_back} KiB of zero pages given back",
                        outcome.exit
                    )
                }
                Ok(Err(e)) => log::error!("the VM failed: {}", vmm::error_chain::ErrorChain(&e)),
                Err(_) => log::error!("the VM thread panicked"),
            }
        }
    }
}

/// A container created in its VM, its process attached.
pub struct CreatedContainer {
    pub client: AgentClient,
    session: Session,
    vm: VmHandle,
    /// What to undo in the network namespace once the VM is gone.
    network: Option<NetworkRecord>,
}

/// Boot the VM for `record`'s container from `bundle` and create the container in it, with its
/// stdio attached as `terminal` says.
pub fn boot_and_create(
    settings: &Settings,
    dir: &Path,
    record: &Record,
    bundle: &Bundle,
    terminal: &TerminalMode,
    control_tty: bool,
) -> anyhow::Result<CreatedContainer> {
    let vsock = vsock_path(dir);
    // Under Docker's state directories the socket's path is too long for a socket address.
    let vsock_socket = SocketPath::new(&vsock)
        .with_context(|| format!("cannot open the container's directory {}", dir.display()))?;
    host_cgroup::join(&bundle.oci);
    let network = join_network(dir, record, bundle)?;
    let kernel = boot_files::pinned(BootFile::Kernel, &settings.kernel, &settings.cache_dir)?;
    let initrd = boot_files::pinned(BootFile::Initramfs, &settings.initrd, &settings.cache_dir)?;
    let config = VmConfig {
        kernel,
        share_boot_files: true,
        small_boot_pages: true,
        initrd: Some(initrd),
        extra_cmdline: guest_cmdline(&settings.kernel_cmdline),
        mem_mib: bundle.guest_mem_mib(settings),
        vcpus: bundle.guest_vcpus(settings),
        console: ConsoleConfig {
            output: ConsoleOutput::File(console_path(dir)),
            read_stdin: false,
        },
        disks: vec![BlockConfig { path: record.image.path.clone(), read_only: true, id: None }],
        nets: network.as_ref().map(Network::net_configs).unwrap_or_default(),
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: vsock_socket.path().to_path_buf(),
        }),
    };
    // Without it (a socket that cannot be made), the health check is polled alone.
    let ready = agent::ReadySignal::listen(vsock_socket.path())
        .map_err(|e| log::debug!("no readiness socket for the agent: {e}"))
        .ok();
    let (vm, template) = match settings.vm_templates {
        true => restore_or_boot(settings, &config)?,
        false => (MicroVm::new(&config).context("cannot start the micro-VM")?, None),
    };
    let stop = vm.stop_event().context("cannot create the VM's stop event")?;
    let zero_pages = vm.zero_page_reclaim().context("cannot create the VM's reclaim event")?;
    let thread = crate::threads::try_spawn("vmm", move || vm.run())
        .context("cannot start the VMM thread")?;
    let vm = VmHandle { stop, zero_pages, thread: Some(thread), _vsock: vsock_socket };
    let client = agent::wait_ready(&vsock, settings.boot_timeout, ready.as_ref(), || vm.running());
    // Its socket goes now, while the directory it was made through is still held.
    drop(ready);
    let client = client.ok_or_else(|| {
        anyhow!(
            "the guest agent did not answer (the VM {}; its console: {})",
            if vm.running() { "still boots" } else { "ended" },
            console_path(dir).display()
        )
    })?;
    if template.is_some() {
        add_guest_entropy(&client)?;
    }
    set_guest_clock(&client);
    if let Some(network) = &network {
        configure_guest_network(&client, &network.guest, template.is_some())?;
    }
    create_container(&client, record, bundle)?;
    // The guest has booted and made the container: what its boot left zeroed goes back now.
    // (A restored guest's memory is the template's file, which the reclaim leaves alone.)
    if template.is_none() {
        if let Err(e) = vm.zero_pages.request() {
            log::warn!("cannot ask for the guest's zero pages: {e}");
        }
    }
    let session = Session::attach(client.clone(), &vsock, &record.id, "", terminal, control_tty)?;
    Ok(CreatedContainer { client, session, vm, network: network.map(|n| n.record) })
}

/// The VM of `config` restored from its template (made now if there is none), and the
/// template's directory; where no template can be made or restored from (a KVM that cannot
/// save some state), a warning and the VM booted instead.
fn restore_or_boot(
    settings: &Settings,
    config: &VmConfig,
) -> anyhow::Result<(MicroVm, Option<std::path::PathBuf>)> {
    let restored = vm_template::ready(settings, config).and_then(|dir| {
        let vm = MicroVm::restore(config, &dir).with_context(|| {
            format!("cannot restore the micro-VM from the template {}", dir.display())
        })?;
        Ok((vm, dir))
    });
    match restored {
        Ok((vm, dir)) => Ok((vm, Some(dir))),
        Err(e) => {
            log::warn!("no VM template ({e:#}); booting the guest");
            Ok((MicroVm::new(config).context("cannot start the micro-VM")?, None))
        }
    }
}

/// Put this process (its main thread: the VMM's threads start from it) where the spec puts
/// the container's network: a new network namespace, or the spec's. Run the prestart and
/// createRuntime hooks there, with this process's pid (they may fill the namespace: Docker's
/// libnetwork moves the veth in). Then take over the namespace's interfaces (see `network`),
/// and record that for `delete`.
fn join_network(dir: &Path, record: &Record, bundle: &Bundle) -> anyhow::Result<Option<Network>> {
    let host_netns =
        File::open("/proc/self/ns/net").context("cannot open husk's network namespace")?;
    let netns = match network::placement(&bundle.oci) {
        Placement::Host => None,
        Placement::New => Some(network::unshare_netns()?),
        Placement::Path(path) => {
            network::enter_netns(path).with_context(|| {
                format!("cannot enter the network namespace {}", path.display())
            })?;
            Some(path.to_path_buf())
        }
    };
    let mut state = record.to_oci_state();
    state["pid"] = std::process::id().into();
    for stage in [Stage::Prestart, Stage::CreateRuntime] {
        hooks::run(&bundle.oci, stage, &state, Some(&host_netns))?;
    }
    let Some(netns) = netns else { return Ok(None) };
    let Some(network) = network::setup(&netns)
        .with_context(|| format!("cannot set up the network of {}", netns.display()))?
    else {
        return Ok(None);
    };
    network::save_record(dir, &network.record)?;
    Ok(Some(network))
}

/// Give the guest NICs the MACs, addresses, MTU and routes of the interfaces they took over;
/// a guest `restored` from a VM template has the template's NICs, found by their MACs.
fn configure_guest_network(
    client: &AgentClient,
    guest: &GuestNetwork,
    restored: bool,
) -> anyhow::Result<()> {
    for (index, nic) in guest.interfaces.iter().enumerate() {
        let mut req = pb::UpdateInterfaceRequest::new();
        let i = req.interface.mut_or_insert_default();
        i.mac = format_mac(&nic.mac);
        if restored {
            i.guest_mac = format_mac(&vm_template::nic_mac(index));
        }
        i.name = nic.name.clone();
        if nic.mtu > MAX_GUEST_MTU {
            log::warn!("{}: MTU {} capped to {MAX_GUEST_MTU} in the guest", nic.name, nic.mtu);
        }
        i.mtu = nic.mtu.min(MAX_GUEST_MTU);
        for a in &nic.addresses {
            let mut address = pb::IpAddress::new();
            address.address = a.address.to_string();
            address.prefix_len = a.prefix_len.into();
            i.addresses.push(address);
        }
        client
            .update_interface(ctx(), &req)
            .map_err(|e| anyhow!("cannot configure the guest's {}: {}", nic.name, describe(&e)))?;
    }
    let mut req = pb::UpdateRoutesRequest::new();
    for r in &guest.routes {
        let mut route = pb::Route::new();
        route.destination =
            r.destination.map(|d| format!("{}/{}", d.address, d.prefix_len)).unwrap_or_default();
        route.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
        route.device = r.device.clone();
        route.source = r.source.map(|s| s.to_string()).unwrap_or_default();
        req.routes.push(route);
    }
    client
        .update_routes(ctx(), &req)
        .map(drop)
        .map_err(|e| anyhow!("cannot set the guest's routes: {}", describe(&e)))
}

/// How many random bytes a restored guest gets from the host.
const ENTROPY_BYTES: usize = 64;

/// Give a guest restored from a template randomness of its own: its random number generator
/// is the template's, as is every other guest's restored from it.
fn add_guest_entropy(client: &AgentClient) -> anyhow::Result<()> {
    let mut req = pb::AddEntropyRequest::new();
    req.data = vec![0; ENTROPY_BYTES];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut req.data))
        .context("cannot read host randomness")?;
    client.add_entropy(ctx(), &req).map_err(|e| {
        anyhow!("cannot reseed the guest's random number generator: {}", describe(&e))
    })?;
    log::debug!("the guest's random number generator reseeded with {ENTROPY_BYTES} host bytes");
    Ok(())
}

/// Give the guest the host's time: its clock starts from the RTC-less boot's guess.
fn set_guest_clock(client: &AgentClient) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut req = pb::SetTimeRequest::new();
    req.seconds = now.as_secs() as i64;
    req.nanos = now.subsec_nanos();
    if let Err(e) = client.set_time(ctx(), &req) {
        log::warn!("cannot set the guest's clock: {}", describe(&e));
    }
}

fn create_container(client: &AgentClient, record: &Record, bundle: &Bundle) -> anyhow::Result<()> {
    let mut req = pb::CreateContainerRequest::new();
    req.container_id = record.id.clone();
    req.oci_spec_json = serde_json::to_vec(&bundle.spec).expect("a JSON value serializes");
    let rootfs = req.rootfs.mut_or_insert_default();
    let mut block = pb::BlockDevice::new();
    block.device = ROOTFS_DEVICE.into();
    block.fstype = record.image.fstype.clone();
    rootfs.set_block(block);
    // An overlay even for a read-only root: the spec's mount points may have to be made in it
    // (Docker's --read-only --tmpfs /scratch); the agent makes the root read-only afterwards,
    // as runc does.
    rootfs.mode = pb::RootfsMode::OVERLAY.into();
    let stdio = req.stdio.mut_or_insert_default();
    (stdio.stdin, stdio.stdout, stdio.stderr) = (true, true, true);
    for (source, content) in bundle.host_files() {
        let mut file = pb::HostFile::new();
        file.source = source;
        file.content = content;
        req.host_files.push(file);
    }
    client
        .create_container(ctx(), &req)
        .map(drop)
        .map_err(|e| anyhow!("the guest could not create the container: {}", describe(&e)))
}

impl CreatedContainer {
    /// Start the container's process (for `run`; `start` asks the agent itself).
    pub fn start(&self, id: &str) -> anyhow::Result<()> {
        let mut req = pb::StartContainerRequest::new();
        req.container_id = id.into();
        self.client
            .start_container(ctx(), &req)
            .map(drop)
            .map_err(|e| anyhow!("cannot start the container: {}", describe(&e)))
    }

    /// Pass signals on, wait for the container's process to exit, stop the VM; the exit
    /// status to exit with.
    pub fn serve(self) -> i32 {
        self.session.forward_signals();
        let code = match self.session.wait() {
            Ok(status) => status.exit_status,
            Err(e) => {
                log::error!("the container's VM ended before its process reported an exit: {e:#}");
                255
            }
        };
        drop(self.vm);
        // Undo the network set-up now, while the namespace is surely there: a new one may
        // outlive this process (Docker holds it) and `delete` finds it through our pid.
        if let Some(record) = &self.network {
            if let Err(e) = network::teardown(record) {
                log::warn!("cannot undo the container's network set-up: {e}");
            }
        }
        code
    }
}

/// `husk vm-process`: the background VM process `create` starts; reports to `create` through
/// the sync pipe once the container is created, then serves it.
pub fn main(global: &crate::cli::GlobalArgs, args: &crate::cli::VmProcessArgs) -> i32 {
    let Some(sync) = crate::sync_pipe::SyncWriter::from_env() else {
        log::error!("husk vm-process is started by husk create");
        return 1;
    };
    crate::signals::block_forwarded();
    // SAFETY: setsid has no memory effects; `create` started this process, which is not a
    // process group leader: it becomes the leader of a new session without a terminal, out
    // of reach of the caller's terminal signals, and able to take the pty as its terminal.
    unsafe { libc::setsid() };
    let created = (|| {
        let settings = crate::commands::settings(global)?;
        let dir = global.root.join(&args.id);
        let record = crate::container::peek(&global.root, &args.id)?;
        let bundle = Bundle::load(&record.bundle)?;
        // `create` refused a terminal without a console socket.
        let terminal = TerminalMode::for_process(bundle.terminal(), args.console_socket.as_deref());
        boot_and_create(&settings, &dir, &record, &bundle, &terminal, true)
    })();
    match created {
        Ok(created) => {
            if !sync.report(Ok(())) {
                log::error!("husk create went away before the container was reported; ending it");
                return 1;
            }
            created.serve()
        }
        Err(e) => {
            log::error!("{e:#}");
            sync.report(Err(format!("{e:#}")));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_cmdline_is_quiet_and_the_users_comes_last() {
        assert_eq!(guest_cmdline(""), "cgroup.memory=nokmem quiet");
        assert_eq!(guest_cmdline("loglevel=7"), "cgroup.memory=nokmem quiet loglevel=7");
    }
}
