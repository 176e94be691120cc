//! Tests against the real kernel, as root: each builds its own network namespaces with
//! iproute2 (`husk-test-PID-N`, joined by a veth pair to a peer namespace) and deletes them
//! when it ends, failed or not. The host's own network is never touched.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::*;

const CONTAINER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const MTU: u32 = 1400;

/// Run `program args`, and panic with its stderr unless it succeeds; returns stdout.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {program}: {e}");
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {}: {stderr}", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new(suffix: &str) -> TestNetns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("husk-test-{}-{n}{suffix}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = TestNetns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `ip -n NAME args`.
    fn ip(&self, args: &[&str]) -> String {
        run("ip", &[&["-n", self.name.as_str()], args].concat())
    }

    /// `tc -n NAME args`.
    fn tc(&self, args: &[&str]) -> String {
        run("tc", &[&["-n", self.name.as_str()], args].concat())
    }

    /// The MAC of interface `dev`.
    fn mac(&self, dev: &str) -> [u8; 6] {
        let json: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "link", "show", dev])).unwrap();
        let text = json[0]["address"].as_str().unwrap();
        let bytes: Vec<u8> = text.split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
        bytes.try_into().unwrap()
    }

    fn delete(&self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// A container namespace whose `eth0` (192.0.2.2/24 and 203.0.113.5/28, MTU 1400, default route
/// and a route to 198.51.100.0/24 via 192.0.2.1) is a veth to `peer0` (192.0.2.1/24) in a peer
/// namespace, as Docker's bridge network would leave it.
struct Fixture {
    container: TestNetns,
    peer: TestNetns,
}

impl Fixture {
    fn new() -> Fixture {
        let container = TestNetns::new("");
        let peer = TestNetns::new("-peer");
        let c = |args: &str| container.ip(&args.split(' ').collect::<Vec<_>>());
        let p = |args: &str| peer.ip(&args.split(' ').collect::<Vec<_>>());
        c("link add eth0 mtu 1400 type veth peer name peer0 mtu 1400");
        c(&format!("link set peer0 netns {}", peer.name));
        c("addr add 192.0.2.2/24 dev eth0");
        c("addr add 203.0.113.5/28 dev eth0");
        c("link set eth0 up");
        c("route add default via 192.0.2.1");
        c("route add 198.51.100.0/24 via 192.0.2.1 dev eth0");
        p("addr add 192.0.2.1/24 dev peer0");
        p("link set peer0 up");
        Fixture { container, peer }
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn addr(address: IpAddr, prefix_len: u8) -> IpAddress {
    IpAddress { address, prefix_len }
}

/// What the fixture's container namespace holds for the guest.
fn expected_guest(mac: [u8; 6]) -> GuestNetwork {
    let route = |destination, gateway, source| Route {
        destination,
        gateway,
        device: "eth0".into(),
        source,
    };
    let gateway = Some(v4(192, 0, 2, 1));
    GuestNetwork {
        interfaces: vec![Interface {
            name: "eth0".into(),
            mac,
            mtu: MTU,
            addresses: vec![addr(v4(192, 0, 2, 2), 24), addr(v4(203, 0, 113, 5), 28)],
        }],
        routes: vec![
            route(Some(addr(v4(192, 0, 2, 0), 24)), None, Some(v4(192, 0, 2, 2))),
            route(Some(addr(v4(203, 0, 113, 0), 28)), None, Some(v4(203, 0, 113, 5))),
            route(None, gateway, None),
            route(Some(addr(v4(198, 51, 100, 0), 24)), gateway, None),
        ],
    }
}

/// Run `work` on a thread that has entered the namespace at `path`.
fn in_netns<T: Send + 'static>(path: &Path, work: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path.to_owned();
    std::thread::spawn(move || {
        enter_netns(&path).unwrap();
        work()
    })
    .join()
    .unwrap()
}

#[test]
fn the_network_placement_comes_from_the_spec() {
    let spec = |namespaces: &str| -> Spec {
        let json = format!(r#"{{"ociVersion": "1.0.2", "linux": {{"namespaces": {namespaces}}}}}"#);
        serde_json::from_str(&json).unwrap()
    };
    let joined = spec(r#"[{"type": "pid"}, {"type": "network", "path": "/proc/42/ns/net"}]"#);
    assert_eq!(placement(&joined), Placement::Path(Path::new("/proc/42/ns/net")));
    assert_eq!(placement(&spec(r#"[{"type": "pid"}, {"type": "network"}]"#)), Placement::New);
    assert_eq!(placement(&spec(r#"[{"type": "pid"}]"#)), Placement::Host);
    let no_linux: Spec = serde_json::from_str(r#"{"ociVersion": "1.0.2"}"#).unwrap();
    assert_eq!(placement(&no_linux), Placement::Host);
}

#[test]
fn nothing_to_take_in_a_namespace_with_loopback_only() {
    let ns = TestNetns::new("");
    // An interface that is down, and one that is up without an IPv4 address, are not taken.
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ns.ip(&["addr", "add", "192.0.2.9/24", "dev", "v0"]);
    ns.ip(&["link", "set", "v1", "up"]);
    let empty = GuestNetwork { interfaces: vec![], routes: vec![] };
    assert_eq!(inspect(&ns.path()).unwrap(), empty);
    assert_eq!(setup(&ns.path()).unwrap(), None);
    assert!(!ns.ip(&["link", "show"]).contains("husk"));
}

#[test]
fn inspect_finds_the_veth_its_addresses_and_routes() {
    let fixture = Fixture::new();
    let mac = fixture.container.mac("eth0");
    assert_eq!(inspect(&fixture.container.path()).unwrap(), expected_guest(mac));
}

#[test]
fn setup_mirrors_veth_and_tap_and_teardown_undoes_it() {
    let fixture = Fixture::new();
    let ns = &fixture.container;
    let mac = ns.mac("eth0");
    let network = setup(&ns.path()).unwrap().expect("the veth is taken");
    assert_eq!(network.guest, expected_guest(mac));
    let mirror = Mirror { veth: "eth0".into(), tap: "tap0_husk".into() };
    assert_eq!(network.record.mirrors, vec![mirror]);
    assert_eq!(network.record.netns, ns.path());
    let config = NetConfig { tap_name: "tap0_husk".into(), mac: Some(mac) };
    assert_eq!(network.net_configs(), vec![config]);

    let tap = ns.ip(&["-d", "link", "show", "tap0_husk"]);
    assert!(
        tap.contains("mtu 1400") && tap.contains(",UP") && tap.contains("tun type tap"),
        "{tap}"
    );
    assert!(!ns.ip(&["addr", "show", "tap0_husk"]).contains("inet6"), "IPv6 is off on the tap");
    let veth_filters = ns.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(veth_filters.contains("u32"), "{veth_filters}");
    assert!(veth_filters.contains("match 00000000/00000000 at 0"), "{veth_filters}");
    assert!(
        veth_filters.contains("mirred (Egress Redirect to device tap0_husk)"),
        "{veth_filters}"
    );
    let tap_filters = ns.tc(&["filter", "show", "dev", "tap0_husk", "ingress"]);
    assert!(tap_filters.contains("mirred (Egress Redirect to device eth0)"), "{tap_filters}");

    // The record is all teardown needs, in another process as well.
    let json = serde_json::to_string(&network.record).unwrap();
    let record: NetworkRecord = serde_json::from_str(&json).unwrap();
    teardown(&record).unwrap();
    assert!(!ns.ip(&["link", "show"]).contains("tap0_husk"));
    assert!(!ns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"));
    assert!(ns.tc(&["filter", "show", "dev", "eth0", "ingress"]).is_empty());
    // The veth and its configuration are the container's: they stay.
    assert_eq!(inspect(&ns.path()).unwrap(), expected_guest(mac));
    // Again: nothing left to do.
    teardown(&record).unwrap();
}

#[test]
fn teardown_after_the_namespace_is_gone() {
    let fixture = Fixture::new();
    let network = setup(&fixture.container.path()).unwrap().unwrap();
    fixture.container.delete();
    teardown(&network.record).unwrap();
}

#[test]
fn teardown_leaves_another_namespace_at_the_same_path_alone() {
    let fixture = Fixture::new();
    let network = setup(&fixture.container.path()).unwrap().unwrap();
    // The same name, a new namespace: not the one set up.
    fixture.container.delete();
    run("ip", &["netns", "add", &fixture.container.name]);
    let ns = &fixture.container;
    ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "tap0_husk"]);
    ns.tc(&["qdisc", "add", "dev", "eth0", "ingress"]);
    teardown(&network.record).unwrap();
    assert!(ns.ip(&["link", "show"]).contains("tap0_husk"));
    assert!(ns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"));
}

#[test]
fn a_second_setup_in_the_same_namespace_is_refused() {
    let fixture = Fixture::new();
    let ns = &fixture.container;
    let network = setup(&ns.path()).unwrap().unwrap();
    let err = setup(&ns.path()).unwrap_err();
    assert!(matches!(&err, NetworkError::TapExists { tap, .. } if tap == "tap0_husk"), "{err}");
    // The first one is intact.
    let filters = ns.tc(&["filter", "show", "dev", "eth0", "ingress"]);
    assert!(filters.contains("Redirect to device tap0_husk"), "{filters}");
    teardown(&network.record).unwrap();
}

#[test]
fn an_ingress_qdisc_already_on_the_veth_is_refused_and_kept() {
    let fixture = Fixture::new();
    let ns = &fixture.container;
    ns.tc(&["qdisc", "add", "dev", "eth0", "ingress"]);
    let err = setup(&ns.path()).unwrap_err();
    assert!(matches!(&err, NetworkError::IngressBusy { veth, .. } if veth == "eth0"), "{err}");
    // The tap made before the refusal is gone again; the qdisc that was there stays.
    assert!(!ns.ip(&["link", "show"]).contains("tap0_husk"));
    assert!(ns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"));
}

#[test]
fn setup_of_a_missing_namespace_fails_clearly() {
    let err = setup(Path::new("/var/run/netns/husk-test-none")).unwrap_err();
    assert!(matches!(err, NetworkError::OpenNetns { .. }), "{err}");
    let err = setup(Path::new("/proc/self/ns/pid")).unwrap_err();
    assert!(matches!(err, NetworkError::NotANetns { .. }), "{err}");
}

/// Open the tap `name` as the VMM would (without the virtio-net header), from a thread in the
/// namespace at `path`.
fn open_tap(path: &Path, name: &str) -> File {
    let name = name.to_owned();
    in_netns(path, move || {
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .unwrap();
        // SAFETY: `ifreq` is plain data; all-zero bytes are a valid value of it.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        until_not_busy(|| {
            // SAFETY: TUNSETIFF reads and writes the valid `ifreq` it is given; the fd is open.
            let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
            match ret {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        })
        .unwrap_or_else(|e| panic!("TUNSETIFF {name}: {e}"));
        tun
    })
}

/// `attach()` until it does not fail with the tap busy, for up to 5 s. The other tests of
/// this process start programs all the time, and a child holds a copy of every descriptor
/// until it execs: for that moment the tap that `setup` just made and closed may still be
/// attached to its descriptor there.
fn until_not_busy<T, E: std::error::Error + 'static>(
    mut attach: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match attach() {
            Err(e) if Instant::now() < deadline && is_busy(&e) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            result => return result,
        }
    }
}

/// Whether `error` (or one of its sources) is EBUSY or the VMM's busy tap.
fn is_busy(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        let io_busy = e.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error());
        let tap_busy = e.downcast_ref::<vmm::devices::virtio::net::TapError>();
        if io_busy == Some(libc::EBUSY)
            || matches!(tap_busy, Some(vmm::devices::virtio::net::TapError::Busy { .. }))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The next frame from `tap` that `wanted` accepts, within `deadline`.
fn read_frame(tap: &mut File, deadline: Instant, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no such frame arrived on the tap in time");
        let mut pfd = libc::pollfd { fd: tap.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: `pfd` is one valid pollfd that outlives the call.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis() as libc::c_int) };
        match tap.read(&mut buf) {
            Ok(n) if wanted(&buf[..n]) => return buf[..n].to_vec(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("read from the tap: {e}"),
        }
    }
}

const ETH_ARP: [u8; 2] = [0x08, 0x06];
const ETH_IPV4: [u8; 2] = [0x08, 0x00];

/// An ARP request (Ethernet type 0x0806, opcode 1) for `target`.
fn is_arp_request_for(frame: &[u8], target: Ipv4Addr) -> bool {
    frame.len() >= 42
        && frame[12..14] == ETH_ARP
        && frame[20..22] == [0, 1]
        && frame[38..42] == target.octets()
}

/// The ARP reply from `mac`/`ip` to the request `request`.
fn arp_reply(request: &[u8], mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let (asker_mac, asker_ip) = (&request[22..28], &request[28..32]);
    let mut frame = Vec::new();
    frame.extend_from_slice(asker_mac);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_ARP);
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(asker_mac);
    frame.extend_from_slice(asker_ip);
    frame
}

/// The UDP payload of an IPv4 frame to port `port`, if it is one.
fn udp_payload(frame: &[u8], port: u16) -> Option<&[u8]> {
    let ip = frame.get(14..).filter(|_| frame[12..14] == ETH_IPV4)?;
    let header_len = usize::from(ip.first()? & 0xf) * 4;
    let udp = ip.get(header_len..).filter(|_| ip[9] == libc::IPPROTO_UDP as u8)?;
    (udp.get(2..4)? == port.to_be_bytes()).then(|| udp.get(8..)).flatten()
}

/// An Ethernet frame carrying the UDP datagram `payload` (no UDP checksum).
fn udp_frame(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else { unreachable!() };
    let udp_len = 8 + payload.len() as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let sum = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let checksum = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    ip.extend_from_slice(&src.port().to_be_bytes());
    ip.extend_from_slice(&dst.port().to_be_bytes());
    ip.extend_from_slice(&udp_len.to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(payload);
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETH_IPV4);
    frame.extend_from_slice(&ip);
    frame
}

/// The proof that the mirroring works: the tap plays the guest. The peer's ARP request and UDP
/// datagram for the container's address arrive as frames on the tap, and the ARP reply and
/// UDP datagram written to the tap reach the peer through the veth.
#[test]
fn frames_flow_between_the_peer_and_the_tap() {
    let fixture = Fixture::new();
    let ns = &fixture.container;
    let network = setup(&ns.path()).unwrap().unwrap();
    let guest_mac = network.guest.interfaces[0].mac;
    let peer_mac = fixture.peer.mac("peer0");
    let mut tap = open_tap(&ns.path(), &network.record.mirrors[0].tap);
    let peer = in_netns(&fixture.peer.path(), || UdpSocket::bind((PEER_IP, 0)).unwrap());
    peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let container_addr = SocketAddr::from((CONTAINER_IP, 7777));

    peer.send_to(b"husk ping", container_addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let request = read_frame(&mut tap, deadline, |f| is_arp_request_for(f, CONTAINER_IP));
    assert_eq!(request[6..12], peer_mac, "the ARP request comes from the peer");
    tap.write_all(&arp_reply(&request, guest_mac, CONTAINER_IP)).unwrap();
    let datagram = read_frame(&mut tap, deadline, |f| udp_payload(f, 7777).is_some());
    assert_eq!(udp_payload(&datagram, 7777), Some(&b"husk ping"[..]));
    assert_eq!(datagram[0..6], guest_mac, "the peer learned the guest's MAC from the reply");

    let peer_addr = peer.local_addr().unwrap();
    let reply = udp_frame((guest_mac, peer_mac), container_addr, peer_addr, b"husk pong");
    tap.write_all(&reply).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).expect("the peer receives the tap's datagram");
    assert_eq!((&buf[..n], from), (&b"husk pong"[..], container_addr));

    // Teardown while the VMM (here: the test) still holds the tap.
    teardown(&network.record).unwrap();
    assert!(!ns.ip(&["link", "show"]).contains("tap0_husk"));
}

/// The VMM's network device, built in the namespace as the VM process would, attaches to the
/// tap that setup made (the tap gets its carrier), and the tap outlives the device until
/// teardown.
#[test]
fn the_vmm_attaches_to_the_tap() {
    use std::sync::Arc;
    use vmm::devices::virtio::net::Net;
    use vmm::devices::virtio::Interrupt;
    use vmm_sys_util::eventfd::EventFd;

    let fixture = Fixture::new();
    let ns = &fixture.container;
    let network = setup(&ns.path()).unwrap().unwrap();
    let config = network.net_configs().remove(0);
    let net = in_netns(&ns.path(), move || {
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        until_not_busy(|| Net::new(config.clone(), interrupt.clone())).unwrap()
    });
    assert_eq!(net.mac(), network.guest.interfaces[0].mac);
    let tap = ns.ip(&["link", "show", "tap0_husk"]);
    assert!(tap.contains("LOWER_UP"), "the tap has its carrier: {tap}");

    drop(net);
    let tap = ns.ip(&["link", "show", "tap0_husk"]);
    assert!(tap.contains("NO-CARRIER"), "the tap stays, without carrier: {tap}");
    teardown(&network.record).unwrap();
    assert!(!ns.ip(&["link", "show"]).contains("tap0_husk"));
}
