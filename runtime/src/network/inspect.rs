//! Reading a namespace's network: which interfaces the guest takes over, and their IPv4
//! addresses and routes.
//!
//! An interface is taken when it is up, not loopback, Ethernet-like with a MAC, not a tun/tap
//! (husk's own taps among them) and has at least one IPv4 address: the veth that Docker or a
//! CNI plugin put there, or any other such interface. Its routes are the IPv4 unicast routes of
//! the main table that leave through it; link routes (no gateway) come first, so that the
//! guest can add every gateway route after the route to its gateway.

use std::net::{IpAddr, Ipv4Addr};

use super::link::{self, Link, ARPHRD_ETHER};
use super::netlink::{self, Message, NetlinkError, Socket};
use super::{Interface, IpAddress, Route};

const RTM_GETADDR: u16 = 22;
const RTM_GETROUTE: u16 = 26;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;

const RT_TABLE_MAIN: u32 = 254;
const RTN_UNICAST: u8 = 1;

/// An interface the guest takes over, with its host index.
#[derive(Debug)]
pub struct Taken {
    pub index: u32,
    pub interface: Interface,
}

/// What the namespace holds for the guest: its interfaces, in index order, and their routes.
#[derive(Debug)]
pub struct Found {
    pub taken: Vec<Taken>,
    pub routes: Vec<Route>,
}

/// Read the interfaces, addresses and routes of the socket's namespace.
pub fn inspect(sock: &mut Socket) -> Result<Found, NetlinkError> {
    let addresses = ipv4_addresses(sock)?;
    let mut taken: Vec<Taken> = link::list(sock)?
        .into_iter()
        .filter(candidate)
        .map(|link| {
            let addresses =
                addresses.iter().filter(|(index, _)| *index == link.index).map(|(_, a)| *a);
            let interface = Interface {
                name: link.name,
                mac: link.address.try_into().expect("candidate links have 6-byte addresses"),
                mtu: link.mtu,
                addresses: addresses.collect(),
            };
            Taken { index: link.index, interface }
        })
        .filter(|taken| !taken.interface.addresses.is_empty())
        .collect();
    taken.sort_by_key(|t| t.index);

    let mut routes = Vec::new();
    for (oif, route) in ipv4_routes(sock)? {
        if let Some(t) = taken.iter().find(|t| t.index == oif) {
            routes.push(Route { device: t.interface.name.clone(), ..route });
        }
    }
    routes.sort_by_key(|route| route.gateway.is_some());
    Ok(Found { taken, routes })
}

/// Whether the guest could take `link` over (before looking at its addresses).
fn candidate(link: &Link) -> bool {
    let up = link.flags & libc::IFF_UP as u32 != 0;
    let loopback = link.flags & libc::IFF_LOOPBACK as u32 != 0;
    up && !loopback && link.hw_type == ARPHRD_ETHER && link.address.len() == 6 && link.kind != "tun"
}

/// `struct ifaddrmsg` or `struct rtmsg` asking for IPv4 only: the family, then zeros.
fn ipv4_header<const N: usize>() -> [u8; N] {
    let mut header = [0u8; N];
    header[0] = libc::AF_INET as u8;
    header
}

fn ipv4(value: &[u8]) -> Option<IpAddr> {
    let octets: [u8; 4] = value.try_into().ok()?;
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// Every IPv4 address of the namespace, with the index of its interface.
fn ipv4_addresses(sock: &mut Socket) -> Result<Vec<(u32, IpAddress)>, NetlinkError> {
    let request = Message::new(RTM_GETADDR, 0, &ipv4_header::<8>(), "RTM_GETADDR dump");
    let mut found = Vec::new();
    for payload in sock.dump(request)? {
        let Some(header) = payload.get(..8) else { continue };
        if header[0] != libc::AF_INET as u8 {
            continue;
        }
        let prefix_len = header[1];
        let index = u32::from_ne_bytes(header[4..8].try_into().unwrap());
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
        // point-to-point links, and the same as IFA_LOCAL elsewhere.
        let (mut local, mut address) = (None, None);
        for (kind, value) in netlink::attrs(&payload[8..]) {
            match kind {
                IFA_LOCAL => local = ipv4(value),
                IFA_ADDRESS => address = ipv4(value),
                _ => {}
            }
        }
        if let Some(address) = local.or(address) {
            found.push((index, IpAddress { address, prefix_len }));
        }
    }
    Ok(found)
}

/// The IPv4 unicast routes of the main table with a single output interface, with its index.
/// `device` is left empty.
fn ipv4_routes(sock: &mut Socket) -> Result<Vec<(u32, Route)>, NetlinkError> {
    let request = Message::new(RTM_GETROUTE, 0, &ipv4_header::<12>(), "RTM_GETROUTE dump");
    let mut found = Vec::new();
    for payload in sock.dump(request)? {
        let Some(header) = payload.get(..12) else { continue };
        let (family, dst_len, src_len, table, kind) =
            (header[0], header[1], header[2], header[4], header[7]);
        if family != libc::AF_INET as u8 || kind != RTN_UNICAST || src_len != 0 {
            continue;
        }
        let mut table = u32::from(table);
        let (mut oif, mut destination, mut gateway, mut source) = (None, None, None, None);
        for (attr, value) in netlink::attrs(&payload[12..]) {
            match attr {
                RTA_TABLE => table = netlink::attr_u32(value).unwrap_or(table),
                RTA_OIF => oif = netlink::attr_u32(value),
                RTA_DST => destination = ipv4(value),
                RTA_GATEWAY => gateway = ipv4(value),
                RTA_PREFSRC => source = ipv4(value),
                _ => {}
            }
        }
        // Multipath routes have no RTA_OIF (their hops are in RTA_MULTIPATH): left out.
        let Some(oif) = oif.filter(|_| table == RT_TABLE_MAIN) else { continue };
        let destination = match (destination, dst_len) {
            (_, 0) => None,
            (Some(address), prefix_len) => Some(IpAddress { address, prefix_len }),
            (None, _) => continue,
        };
        found.push((oif, Route { destination, gateway, device: String::new(), source }));
    }
    Ok(found)
}
