//! The guest's network, which all its containers share (the VM is their network boundary): its
//! NICs configured as the host says (found by MAC: name, MTU, addresses, up), its routes
//! through them, and their counters. Changes go through rtnetlink (`netlink`).

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::Path;

use husk_agent_protocol::agent as pb;

use crate::error::{Error, Result};
use crate::netlink::{self, attrs, put_attr, u32_at, Netlink};

/// ARPHRD_LOOPBACK, the `type` of a loopback interface.
const LOOPBACK: &str = "772";

// <linux/if.h>, <linux/if_link.h>, <linux/if_addr.h>, <linux/rtnetlink.h>
const IFF_UP: u32 = 0x1;
const IFF_LOOPBACK: u32 = 0x8;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_KERNEL: u8 = 2;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
/// The fixed headers: struct ifinfomsg, ifaddrmsg, rtmsg.
const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;
const RTMSG_LEN: usize = 12;

/// A network interface as RTM_GETLINK reports it.
struct Link {
    index: u32,
    name: String,
    mac: Vec<u8>,
    flags: u32,
}

fn links(nl: &mut Netlink) -> io::Result<Vec<Link>> {
    let dump = nl.dump(netlink::RTM_GETLINK, &ifinfomsg(0, 0, 0))?;
    Ok(dump
        .iter()
        .filter(|m| m.kind == netlink::RTM_NEWLINK && m.body.len() >= IFINFOMSG_LEN)
        .map(|m| {
            let mut link = Link {
                index: u32_at(&m.body, 4),
                name: String::new(),
                mac: Vec::new(),
                flags: u32_at(&m.body, 8),
            };
            for (kind, data) in attrs(&m.body, IFINFOMSG_LEN) {
                match kind {
                    IFLA_ADDRESS => link.mac = data.to_vec(),
                    IFLA_IFNAME => {
                        let name = data.split(|&b| b == 0).next().unwrap_or_default();
                        link.name = String::from_utf8_lossy(name).into_owned();
                    }
                    _ => {}
                }
            }
            link
        })
        .collect())
}

/// struct ifinfomsg for link `index`: family AF_UNSPEC, `flags` where `change` says.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![0u8; 4];
    b.extend_from_slice(&index.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&change.to_ne_bytes());
    b
}

fn family(a: &IpAddr) -> u8 {
    match a {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn octets(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn ip_from(family: u8, data: &[u8]) -> Option<IpAddr> {
    match family as i32 {
        libc::AF_INET => <[u8; 4]>::try_from(data).ok().map(IpAddr::from),
        libc::AF_INET6 => <[u8; 16]>::try_from(data).ok().map(IpAddr::from),
        _ => None,
    }
}

fn mac_text(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn parse_mac(s: &str) -> Result<Vec<u8>> {
    let bytes: Vec<_> = s.split(':').map(|b| u8::from_str_radix(b, 16)).collect();
    match bytes.into_iter().collect::<std::result::Result<Vec<u8>, _>>() {
        Ok(mac) if mac.len() == 6 && s.len() == 17 => Ok(mac),
        _ => Err(Error::InvalidArgument(format!("invalid MAC address {s:?}"))),
    }
}

/// An interface name the kernel takes (dev_valid_name).
fn check_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name.contains(['/', ':', '\0'])
        || name.contains(char::is_whitespace);
    if bad {
        return Err(Error::InvalidArgument(format!("invalid interface name {name:?}")));
    }
    Ok(())
}

/// An address and prefix length, checked.
fn parse_cidr(address: &str, prefix: u32) -> Result<(IpAddr, u8)> {
    let ip: IpAddr = address
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("invalid IP address {address:?}")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(Error::InvalidArgument(format!("invalid prefix length {address}/{prefix}")));
    }
    Ok((ip, prefix as u8))
}

fn netlink_error(what: String) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::internal(what, &e)
}

/// Configure the NIC whose MAC is `iface.mac` (or `iface.guest_mac`, which it then trades for
/// `iface.mac`): rename it (it must be down for that), set its MTU, bring it up, then replace
/// its addresses (after the link is up: IPv6 drops a down link's addresses). The kernel's own
/// IPv6 link-local addresses stay unless asked for.
pub fn update_interface(iface: &pb::Interface) -> Result<()> {
    let mac = parse_mac(&iface.mac)?;
    let found_by = match iface.guest_mac.is_empty() {
        true => mac.clone(),
        false => parse_mac(&iface.guest_mac)?,
    };
    if !iface.name.is_empty() {
        check_name(&iface.name)?;
    }
    let wanted = iface
        .addresses
        .iter()
        .map(|a| parse_cidr(&a.address, a.prefix_len))
        .collect::<Result<Vec<_>>>()?;
    let mut nl = Netlink::open().map_err(|e| Error::internal("opening rtnetlink", &e))?;
    let link = links(&mut nl)
        .map_err(|e| Error::internal("listing the NICs", &e))?
        .into_iter()
        .find(|l| l.mac == found_by)
        .ok_or_else(|| Error::NotFound(format!("no NIC with MAC {}", mac_text(&found_by))))?;
    let index = link.index;
    let mut name = link.name;
    let mut up = link.flags & IFF_UP != 0;
    if found_by != mac {
        let what = format!("setting the MAC of {name} to {}", iface.mac);
        set_while_down(&mut nl, index, &mut up, IFLA_ADDRESS, &mac, &what)?;
    }
    if !iface.name.is_empty() && iface.name != name {
        let what = format!("renaming {name} to {}", iface.name);
        let value = format!("{}\0", iface.name);
        set_while_down(&mut nl, index, &mut up, IFLA_IFNAME, value.as_bytes(), &what)?;
        name.clone_from(&iface.name);
    }
    if iface.mtu != 0 {
        let mut body = ifinfomsg(index, 0, 0);
        put_attr(&mut body, IFLA_MTU, &iface.mtu.to_ne_bytes());
        nl.request(netlink::RTM_NEWLINK, 0, &body)
            .map_err(netlink_error(format!("setting the MTU of {name} to {}", iface.mtu)))?;
    }
    nl.request(netlink::RTM_NEWLINK, 0, &ifinfomsg(index, IFF_UP, IFF_UP))
        .map_err(netlink_error(format!("bringing {name} up")))?;
    replace_addresses(&mut nl, index, &name, &wanted)?;
    log::info!("NIC {} is {name} with {} addresses", iface.mac, wanted.len());
    Ok(())
}

/// Set link attribute `attr` of NIC `index` to `value`, which the kernel takes only while the
/// link is down: first taking it down if `up` (which then says it is down). `what` names the
/// change in errors.
fn set_while_down(
    nl: &mut Netlink,
    index: u32,
    up: &mut bool,
    attr: u16,
    value: &[u8],
    what: &str,
) -> Result<()> {
    if *up {
        nl.request(netlink::RTM_NEWLINK, 0, &ifinfomsg(index, 0, IFF_UP))
            .map_err(netlink_error(format!("taking the link down for {what}")))?;
        *up = false;
    }
    let mut body = ifinfomsg(index, 0, 0);
    put_attr(&mut body, attr, value);
    nl.request(netlink::RTM_NEWLINK, 0, &body).map_err(netlink_error(what.to_string()))
}

fn replace_addresses(
    nl: &mut Netlink,
    index: u32,
    name: &str,
    wanted: &[(IpAddr, u8)],
) -> Result<()> {
    let mut missing = wanted.to_vec();
    let dump = nl
        .dump(netlink::RTM_GETADDR, &[0u8; IFADDRMSG_LEN])
        .map_err(netlink_error(format!("listing the addresses of {name}")))?;
    for m in dump.iter().filter(|m| m.kind == netlink::RTM_NEWADDR) {
        if m.body.len() < IFADDRMSG_LEN || u32_at(&m.body, 4) != index {
            continue;
        }
        let (fam, prefix) = (m.body[0], m.body[1]);
        let a = attrs(&m.body, IFADDRMSG_LEN);
        let local =
            a.iter().find(|(k, _)| *k == IFA_LOCAL).or(a.iter().find(|(k, _)| *k == IFA_ADDRESS));
        let Some(ip) = local.and_then(|(_, data)| ip_from(fam, data)) else { continue };
        if let Some(i) = missing.iter().position(|w| *w == (ip, prefix)) {
            missing.remove(i);
            continue;
        }
        if matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80) {
            continue;
        }
        // The dumped message names the address exactly: send it back to delete it.
        nl.request(netlink::RTM_DELADDR, 0, &m.body)
            .map_err(netlink_error(format!("removing {ip}/{prefix} from {name}")))?;
    }
    for (ip, prefix) in missing {
        // ifaddrmsg: family, prefix length, flags, scope, index. No duplicate address
        // detection: the host gave the VM this address.
        let flags = if ip.is_ipv6() { IFA_F_NODAD } else { 0 };
        let mut body = vec![family(&ip), prefix, flags, RT_SCOPE_UNIVERSE];
        body.extend_from_slice(&index.to_ne_bytes());
        put_attr(&mut body, IFA_LOCAL, &octets(&ip));
        put_attr(&mut body, IFA_ADDRESS, &octets(&ip));
        let flags = netlink::NLM_F_CREATE | netlink::NLM_F_REPLACE;
        nl.request(netlink::RTM_NEWADDR, flags, &body)
            .map_err(netlink_error(format!("adding {ip}/{prefix} to {name}")))?;
    }
    Ok(())
}

/// A route to add, checked.
struct NewRoute {
    destination: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    device: u32,
    source: Option<IpAddr>,
    family: u8,
}

fn parse_route(r: &pb::Route, links: &[Link]) -> Result<NewRoute> {
    let what = || format!("route {:?} via {:?} dev {:?}", r.destination, r.gateway, r.device);
    let ip = |s: &str| -> Result<Option<IpAddr>> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(|_| Error::InvalidArgument(format!("{}: {s:?}", what())))
    };
    let destination = match r.destination.as_str() {
        "" | "default" => None,
        d => {
            let (address, prefix) = match d.split_once('/') {
                Some((a, p)) => {
                    let p = p.parse().map_err(|_| Error::InvalidArgument(what()))?;
                    (a, p)
                }
                None => (d, if d.contains(':') { 128 } else { 32 }),
            };
            Some(parse_cidr(address, prefix)?)
        }
    };
    let (gateway, source) = (ip(&r.gateway)?, ip(&r.source)?);
    let families: Vec<u8> =
        destination.map(|d| d.0).iter().chain(&gateway).chain(&source).map(family).collect();
    let family = families.first().copied().unwrap_or(libc::AF_INET as u8);
    if families.iter().any(|&f| f != family) {
        return Err(Error::InvalidArgument(format!("{}: mixes IPv4 and IPv6", what())));
    }
    let device = links
        .iter()
        .find(|l| l.name == r.device)
        .ok_or_else(|| Error::InvalidArgument(format!("{}: no device {:?}", what(), r.device)))?
        .index;
    Ok(NewRoute { destination, gateway, device, source, family })
}

/// Replace the main table's routes through the guest's NICs with `routes`. Loopback's stay, and
/// so do the kernel's own (the subnet routes of the NICs' addresses, IPv6 link-local), which go
/// with the addresses. Every route is checked before any is changed; routes without a gateway
/// go in first, as the gateways are reached through them.
pub fn update_routes(routes: &[pb::Route]) -> Result<()> {
    let mut nl = Netlink::open().map_err(|e| Error::internal("opening rtnetlink", &e))?;
    let links = links(&mut nl).map_err(|e| Error::internal("listing the NICs", &e))?;
    let mut new = routes
        .iter()
        .map(|r| parse_route(r, &links).map(|new| (new, r)))
        .collect::<Result<Vec<_>>>()?;
    new.sort_by_key(|(r, _)| r.gateway.is_some());
    let loopbacks: Vec<u32> =
        links.iter().filter(|l| l.flags & IFF_LOOPBACK != 0).map(|l| l.index).collect();
    let dump = nl
        .dump(netlink::RTM_GETROUTE, &[0u8; RTMSG_LEN])
        .map_err(|e| Error::internal("listing the routes", &e))?;
    for m in dump.iter().filter(|m| m.kind == netlink::RTM_NEWROUTE && m.body.len() >= RTMSG_LEN) {
        // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let (mut table, protocol, kind) = (u32::from(m.body[4]), m.body[5], m.body[7]);
        let mut oif = None;
        for (k, data) in attrs(&m.body, RTMSG_LEN) {
            match (k, data.len()) {
                (RTA_TABLE, 4) => table = u32_at(data, 0),
                (RTA_OIF, 4) => oif = Some(u32_at(data, 0)),
                _ => {}
            }
        }
        let through_loopback = oif.is_some_and(|i| loopbacks.contains(&i));
        if table != u32::from(RT_TABLE_MAIN)
            || kind != RTN_UNICAST
            || protocol == RTPROT_KERNEL
            || through_loopback
        {
            continue;
        }
        match nl.request(netlink::RTM_DELROUTE, 0, &m.body) {
            // Gone with a route deleted before it.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            r => r.map_err(|e| Error::internal("removing a route", &e))?,
        }
    }
    for (r, pb) in new {
        let scope = if r.gateway.is_none() && r.family == libc::AF_INET as u8 {
            RT_SCOPE_LINK
        } else {
            RT_SCOPE_UNIVERSE
        };
        let dst_len = r.destination.map_or(0, |d| d.1);
        let mut body =
            vec![r.family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST];
        body.extend_from_slice(&0u32.to_ne_bytes());
        if let Some((dst, _)) = r.destination {
            put_attr(&mut body, RTA_DST, &octets(&dst));
        }
        if let Some(gw) = r.gateway {
            put_attr(&mut body, RTA_GATEWAY, &octets(&gw));
        }
        put_attr(&mut body, RTA_OIF, &r.device.to_ne_bytes());
        if let Some(src) = r.source {
            put_attr(&mut body, RTA_PREFSRC, &octets(&src));
        }
        let flags = netlink::NLM_F_CREATE | netlink::NLM_F_REPLACE;
        nl.request(netlink::RTM_NEWROUTE, flags, &body).map_err(netlink_error(format!(
            "adding route {:?} via {:?} dev {}",
            pb.destination, pb.gateway, pb.device
        )))?;
    }
    log::info!("{} routes set", routes.len());
    Ok(())
}

/// The counters of every NIC but loopback, from /sys/class/net (the guest's sysfs); a NIC that
/// disappears while it is read is left out.
pub fn counters() -> Vec<pb::NetworkStats> {
    let Ok(entries) = fs::read_dir("/sys/class/net") else { return Vec::new() };
    let mut out: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let kind = fs::read_to_string(dir.join("type")).ok()?;
            if kind.trim() == LOOPBACK {
                return None;
            }
            let stat = |name: &str| read_u64(&dir.join("statistics").join(name));
            Some(pb::NetworkStats {
                name: e.file_name().to_string_lossy().into_owned(),
                rx_bytes: stat("rx_bytes")?,
                rx_packets: stat("rx_packets")?,
                rx_errors: stat("rx_errors")?,
                rx_dropped: stat("rx_dropped")?,
                tx_bytes: stat("tx_bytes")?,
                tx_packets: stat("tx_packets")?,
                tx_errors: stat("tx_errors")?,
                tx_dropped: stat("tx_dropped")?,
                ..Default::default()
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        assert_eq!(parse_mac("02:00:0a:FF:00:01").unwrap(), [2, 0, 10, 255, 0, 1]);
        for bad in ["02:00:0a:ff:00", "02:00:0a:ff:00:01:02", "2:0:a:ff:0:1:", "zz:00:0a:ff:00:01"]
        {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert!(check_name("eth0").is_ok());
        for bad in ["", "a/b", "a b", "..", "sixteen-chars-xx"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_cidr("10.0.0.2", 24).unwrap(), ("10.0.0.2".parse().unwrap(), 24));
        assert!(parse_cidr("10.0.0.2", 33).is_err());
        assert!(parse_cidr("fd00::2", 64).is_ok());
        assert!(parse_cidr("10.0.0", 8).is_err());

        let links = [Link { index: 2, name: "eth0".into(), mac: vec![], flags: 0 }];
        let route = |dst: &str, gw: &str, dev: &str| pb::Route {
            destination: dst.into(),
            gateway: gw.into(),
            device: dev.into(),
            ..Default::default()
        };
        let r = parse_route(&route("", "10.0.0.1", "eth0"), &links).unwrap();
        assert_eq!((r.destination, r.device, r.family), (None, 2, libc::AF_INET as u8));
        let r = parse_route(&route("fd01::/64", "", "eth0"), &links).unwrap();
        assert_eq!(r.destination, Some(("fd01::".parse().unwrap(), 64)));
        assert_eq!(r.family, libc::AF_INET6 as u8);
        let r = parse_route(&route("10.1.2.3", "", "eth0"), &links).unwrap();
        assert_eq!(r.destination.unwrap().1, 32);
        let invalid = |r: pb::Route| match parse_route(&r, &links) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("{:?}", other.map(|_| ())),
        };
        assert!(invalid(route("10.0.0.0/8", "fd00::1", "eth0")).contains("mixes"));
        assert!(invalid(route("10.0.0.0/8", "", "eth9")).contains("no device"));
        invalid(route("10.0.0.0/x", "", "eth0"));
        invalid(route("", "gateway", "eth0"));
    }
}
