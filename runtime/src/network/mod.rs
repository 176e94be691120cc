//! The container's network, host side: the guest takes over the interface that Docker or a
//! CNI plugin put into the container's network namespace, as Kata Containers' "tcfilter"
//! model does.
//!
//! When the OCI spec names a network namespace by path, or the VM process made a new one that
//! Docker's prestart hook filled ([`placement`]), [`setup`]:
//! 1. inspects it: every interface that is up, not loopback, Ethernet-like, not a tap, and has
//!    an IPv4 address (normally the one veth) is taken, with its MAC, MTU, IPv4 addresses and
//!    the main table's IPv4 routes through it;
//! 2. creates, for each taken interface, a persistent tap `tap<N>_husk` in that namespace with
//!    the interface's MTU, brings it up, and mirrors the two into each other with tc: an
//!    ingress qdisc on both and on each a u32 match-all filter whose action is `mirred egress
//!    redirect` to the other. Every frame the veth receives leaves through the tap (to the
//!    guest) and every frame the guest sends leaves through the veth;
//! 3. returns what the guest must be told ([`GuestNetwork`]: NICs with the veth's MAC, so
//!    that the MAC and IP pair the bridge or CNI plugin knows stays valid, its MTU and
//!    addresses; routes), in types that map one to one to the agent protocol's `Interface`,
//!    `IpAddress` and `Route`, and the [`NetworkRecord`] that [`teardown`] needs.
//!
//! The VMM opens each tap by name in the network namespace of the thread that opens
//! `/dev/net/tun`, so the VM process first enters the container's namespace for good
//! ([`enter_netns`]) and then builds the VM with [`Network::net_configs`]. The taps are
//! persistent, so they exist before the VMM attaches and survive the VM process however it
//! ends: [`teardown`], from any process and with nothing but the serialized record, removes
//! the veth's ingress qdisc (and its filter) and deletes the taps (and theirs). It tolerates
//! every part, or the whole namespace, being gone already.
//!
//! Without a namespace path in the spec, or with one that holds only loopback (or nothing the
//! guest can take), nothing is done and the guest has loopback only. Only IPv4 is carried over
//! (IPv6 traffic is mirrored like the rest, but the guest gets no IPv6 addresses or routes).
//!
//! [`Interface::mtu`] is the veth's MTU as it is. The VMM offers the guest no MTU and its
//! receive buffers take frames of at most 1500 bytes of payload: the runtime must refuse (or
//! cap) a larger one.
//!
//! All namespace work runs on a thread of its own that enters the namespace (`netns`); the
//! kernel is spoken to over rtnetlink (`netlink`, `link`, `inspect`, `tc`) and tun ioctls
//! (`tap`), without iproute2.

mod inspect;
mod link;
mod netlink;
mod netns;
mod tap;
mod tc;
#[cfg(test)]
mod tests;

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};
use vmm::devices::virtio::net::NetConfig;

pub use netlink::NetlinkError;

/// An address and its prefix length: an interface's address ("10.0.0.2", 24) or a network
/// ("10.0.0.0", 24). The agent protocol's `IpAddress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpAddress {
    pub address: IpAddr,
    pub prefix_len: u8,
}

/// A guest NIC. The agent protocol's `Interface`: the agent finds the NIC by `mac`, renames it
/// `name`, and gives it `mtu` and `addresses`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// The host interface's name (usually "eth0"), which the guest NIC takes.
    pub name: String,
    /// The host interface's MAC, which the guest NIC takes (the VMM's `NetConfig::mac`).
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<IpAddress>,
}

/// A guest route. The agent protocol's `Route`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The destination network; `None` for the default route.
    pub destination: Option<IpAddress>,
    /// The next hop; `None` for a directly connected (link scope) route.
    pub gateway: Option<IpAddr>,
    /// The name of the guest NIC (an [`Interface::name`]).
    pub device: String,
    /// The preferred source address.
    pub source: Option<IpAddr>,
}

/// What the guest is told about its network: its NICs and its routes, those without a
/// gateway first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNetwork {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
}

/// One host interface mirrored into a tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirror {
    /// The interface the guest took over (the veth).
    pub veth: String,
    /// The tap the VMM attaches to.
    pub tap: String,
}

/// What [`teardown`] needs to undo a [`setup`]; the runtime keeps it with the container's
/// state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The namespace path from the spec.
    pub netns: PathBuf,
    /// The kernel's cookie of the namespace the path named at setup (`SO_NETNS_COOKIE`, never
    /// reused), so that a path that names another namespace later (a reused PID of
    /// `/proc/PID/ns/net`, a recreated `/var/run/netns/NAME`) is not taken for it.
    pub netns_cookie: u64,
    /// One per guest NIC, in the order of [`GuestNetwork::interfaces`].
    pub mirrors: Vec<Mirror>,
}

/// A namespace set up for the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub guest: GuestNetwork,
    pub record: NetworkRecord,
}

impl Network {
    /// The VMM's network cards: one per guest NIC, on its tap, with the host interface's MAC.
    pub fn net_configs(&self) -> Vec<NetConfig> {
        let nics = self.record.mirrors.iter().zip(&self.guest.interfaces);
        nics.map(|(mirror, nic)| NetConfig { tap_name: mirror.tap.clone(), mac: Some(nic.mac) })
            .collect()
    }
}

/// Why the network could not be inspected, set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot open network namespace {}", .path.display())]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a network namespace")]
    Unshare(#[source] io::Error),
    #[error("{} is not a network namespace", .path.display())]
    NotANetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {}", .path.display())]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a thread for the network namespace")]
    Thread(#[source] io::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("cannot create tap {tap}: {step}")]
    CreateTap {
        tap: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "interface {tap} already exists in network namespace {}: is another container using \
         this namespace?",
        .netns.display()
    )]
    TapExists { tap: String, netns: PathBuf },
    #[error(
        "{veth} in network namespace {} already has an ingress qdisc: is another container or \
         tool using it?",
        .netns.display()
    )]
    IngressBusy { veth: String, netns: PathBuf },
}

/// Where the spec puts the container's network.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement<'a> {
    /// No network namespace: the host's network (the guest has loopback only).
    Host,
    /// A network namespace without a path: a new one, which the VM process makes for itself
    /// ([`unshare_netns`]) and which the prestart hooks (Docker's libnetwork) fill.
    New,
    /// The namespace at this path, where a CNI plugin or the caller put a veth.
    Path(&'a Path),
}

/// Where `spec` puts the container's network.
pub fn placement(spec: &Spec) -> Placement<'_> {
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    let network = namespaces.and_then(|namespaces| {
        namespaces.iter().find(|ns| ns.typ() == LinuxNamespaceType::Network)
    });
    match network {
        None => Placement::Host,
        Some(ns) => ns.path().as_deref().map_or(Placement::New, Placement::Path),
    }
}

/// Move the calling thread, which must be the process's main thread, into a new network
/// namespace for good; returns the namespace's path through the process
/// (`/proc/<pid>/ns/net`), which is what hooks and [`setup`] are given.
pub fn unshare_netns() -> Result<PathBuf, NetworkError> {
    let pid = std::process::id();
    // SAFETY: gettid has no arguments and no memory effects.
    if unsafe { libc::gettid() } as u32 != pid {
        return Err(NetworkError::Unshare(io::Error::other("not called on the main thread")));
    }
    // SAFETY: unshare with CLONE_NEWNET changes only the calling thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(NetworkError::Unshare(io::Error::last_os_error()));
    }
    Ok(PathBuf::from(format!("/proc/{pid}/ns/net")))
}

/// Move the calling thread into the network namespace at `netns` for good: the VM process
/// does this before it builds the VM, so that the VMM finds the taps (it opens them by name
/// in the namespace of the thread that opens `/dev/net/tun`). Threads spawned afterwards
/// start in that namespace too.
pub fn enter_netns(netns: &Path) -> Result<(), NetworkError> {
    netns::enter(netns)
}

/// What the guest would get from the namespace at `netns`, without changing anything.
#[cfg(test)]
pub fn inspect(netns: &Path) -> Result<GuestNetwork, NetworkError> {
    netns::run_in(netns, || {
        let found = inspect::inspect(&mut netlink::Socket::open()?)?;
        let interfaces = found.taken.into_iter().map(|t| t.interface).collect();
        Ok(GuestNetwork { interfaces, routes: found.routes })
    })
}

/// Take over the namespace at `netns` for the guest (see the module documentation). `None`
/// when it holds nothing the guest can take. On failure, what was done is undone.
pub fn setup(netns: &Path) -> Result<Option<Network>, NetworkError> {
    netns::run_in(netns, || {
        let mut sock = netlink::Socket::open()?;
        let netns_cookie = sock.netns_cookie()?;
        let found = inspect::inspect(&mut sock)?;
        if found.taken.is_empty() {
            return Ok(None);
        }
        let mut mirrors: Vec<Mirror> = Vec::new();
        for (n, taken) in found.taken.iter().enumerate() {
            let mirror = Mirror { veth: taken.interface.name.clone(), tap: format!("tap{n}_husk") };
            if let Err(e) = add_mirror(&mut sock, netns, taken.index, &mirror, taken.interface.mtu)
            {
                for done in &mirrors {
                    if let Err(undo) = remove_mirror(&mut sock, Some(&done.veth), &done.tap) {
                        log::warn!("undoing the network setup in {}: {undo}", netns.display());
                    }
                }
                return Err(e);
            }
            mirrors.push(mirror);
        }
        let interfaces = found.taken.into_iter().map(|t| t.interface).collect();
        let guest = GuestNetwork { interfaces, routes: found.routes };
        let record = NetworkRecord { netns: netns.to_owned(), netns_cookie, mirrors };
        Ok(Some(Network { guest, record }))
    })
}

/// Create `mirror.tap` with `mtu` and mirror it and `mirror.veth` (interface `veth_index`) into
/// each other. On failure, this mirror's steps are undone.
fn add_mirror(
    sock: &mut netlink::Socket,
    netns: &Path,
    veth_index: u32,
    mirror: &Mirror,
    mtu: u32,
) -> Result<(), NetworkError> {
    let (veth, tap) = (mirror.veth.as_str(), mirror.tap.as_str());
    if link::by_name(sock, tap)?.is_some() {
        return Err(NetworkError::TapExists { tap: tap.to_owned(), netns: netns.to_owned() });
    }
    tap::create_persistent(tap)?;
    let mut veth_qdisc_added = false;
    let mut steps = || {
        let tap_index = match link::by_name(sock, tap)? {
            Some(link) => link.index,
            None => {
                let source = io::ErrorKind::NotFound.into();
                return Err(NetworkError::CreateTap {
                    tap: tap.to_owned(),
                    step: "find it",
                    source,
                });
            }
        };
        tap::disable_ipv6(tap)?;
        link::set_mtu_up(sock, tap_index, tap, mtu)?;
        match tc::add_ingress_qdisc(sock, veth_index, veth) {
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                let veth = veth.to_owned();
                return Err(NetworkError::IngressBusy { veth, netns: netns.to_owned() });
            }
            result => result?,
        }
        veth_qdisc_added = true;
        tc::add_ingress_qdisc(sock, tap_index, tap)?;
        tc::add_redirect(sock, (veth_index, veth), (tap_index, tap))?;
        tc::add_redirect(sock, (tap_index, tap), (veth_index, veth))?;
        Ok(())
    };
    let result = steps();
    if result.is_err() {
        // An ingress qdisc the veth had before is not ours: it stays.
        let veth = veth_qdisc_added.then_some(veth);
        if let Err(e) = remove_mirror(sock, veth, tap) {
            log::warn!("undoing the network setup in {}: {e}", netns.display());
        }
    }
    result
}

/// Remove the ingress qdisc of `veth` (when given) and delete `tap`, whichever still exists.
fn remove_mirror(
    sock: &mut netlink::Socket,
    veth: Option<&str>,
    tap: &str,
) -> Result<(), NetlinkError> {
    let mut qdisc_removed = Ok(());
    if let Some(veth) = veth {
        qdisc_removed = link::by_name(sock, veth).and_then(|link| match link {
            Some(link) => tc::delete_ingress_qdisc(sock, link.index, veth).map(drop),
            None => Ok(()),
        });
    }
    // Deleting the tap removes its qdisc and filter with it.
    let tap_removed = link::by_name(sock, tap).and_then(|link| match link {
        Some(link) if link.kind == "tun" => link::delete(sock, link.index, tap),
        Some(_) => {
            log::warn!("{tap} is not a tap any more: left alone");
            Ok(())
        }
        None => Ok(()),
    });
    qdisc_removed.and(tap_removed)
}

/// Keep `record` with a container's state in `dir` (before anything else can fail, so that a
/// delete finds it).
pub fn save_record(dir: &Path, record: &NetworkRecord) -> io::Result<()> {
    let json = serde_json::to_vec(record).expect("a record serializes");
    std::fs::write(dir.join(RECORD_FILE), json)
}

/// The record [`save_record`] kept in `dir`, if any.
pub fn load_record(dir: &Path) -> io::Result<Option<NetworkRecord>> {
    match std::fs::read(dir.join(RECORD_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The record's file name in a container's state directory.
const RECORD_FILE: &str = "network.json";

/// Undo [`setup`] from its record: remove the veth's ingress qdisc and filter, delete the taps
/// with theirs. Done already when the namespace is gone.
pub fn teardown(record: &NetworkRecord) -> Result<(), NetworkError> {
    let ns = match netns::Netns::open(&record.netns) {
        Ok(ns) => ns,
        Err(NetworkError::OpenNetns { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            log::debug!("network namespace {} is gone", record.netns.display());
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    ns.run(&record.netns, || {
        let mut sock = netlink::Socket::open()?;
        if sock.netns_cookie()? != record.netns_cookie {
            log::debug!("{} names another network namespace now", record.netns.display());
            return Ok(());
        }
        let mut first_error = None;
        for mirror in &record.mirrors {
            if let Err(e) = remove_mirror(&mut sock, Some(&mirror.veth), &mirror.tap) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    })
}
