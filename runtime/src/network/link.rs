//! Network interfaces over rtnetlink: listing them, finding one by name, bringing one up with
//! an MTU, deleting one.

use super::netlink::{self, Message, NetlinkError, Socket};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

/// `ARPHRD_ETHER`: the hardware type of Ethernet-like interfaces (veth, tap, bridge, ...).
pub const ARPHRD_ETHER: u16 = 1;

/// One interface as the kernel lists it.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `ARPHRD_*`.
    pub hw_type: u16,
    /// `IFF_*`.
    pub flags: u32,
    /// The hardware address; empty when it has none.
    pub address: Vec<u8>,
    pub mtu: u32,
    /// The driver's kind ("veth", "tun", ...); empty for interfaces without one.
    pub kind: String,
}

/// `struct ifinfomsg`: family, type, index, flags and the mask of flags to change.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[0] = libc::AF_UNSPEC as u8;
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    header[8..12].copy_from_slice(&flags.to_ne_bytes());
    header[12..16].copy_from_slice(&change.to_ne_bytes());
    header
}

fn parse(payload: &[u8]) -> Option<Link> {
    let header = payload.get(..16)?;
    let mut link = Link {
        hw_type: u16::from_ne_bytes([header[2], header[3]]),
        index: u32::from_ne_bytes(header[4..8].try_into().ok()?),
        flags: u32::from_ne_bytes(header[8..12].try_into().ok()?),
        name: String::new(),
        address: Vec::new(),
        mtu: 0,
        kind: String::new(),
    };
    for (kind, value) in netlink::attrs(&payload[16..]) {
        match kind {
            IFLA_IFNAME => link.name = netlink::attr_string(value),
            IFLA_ADDRESS => link.address = value.to_vec(),
            IFLA_MTU => link.mtu = netlink::attr_u32(value).unwrap_or(0),
            IFLA_LINKINFO => {
                let info_kind = netlink::attrs(value).find(|(k, _)| *k == IFLA_INFO_KIND);
                if let Some((_, kind)) = info_kind {
                    link.kind = netlink::attr_string(kind);
                }
            }
            _ => {}
        }
    }
    Some(link)
}

/// Every interface of the socket's namespace.
pub fn list(sock: &mut Socket) -> Result<Vec<Link>, NetlinkError> {
    let request = Message::new(RTM_GETLINK, 0, &ifinfomsg(0, 0, 0), "RTM_GETLINK dump");
    Ok(sock.dump(request)?.iter().filter_map(|payload| parse(payload)).collect())
}

/// The interface called `name`, or `None` when there is none.
pub fn by_name(sock: &mut Socket, name: &str) -> Result<Option<Link>, NetlinkError> {
    let mut request =
        Message::new(RTM_GETLINK, 0, &ifinfomsg(0, 0, 0), format!("RTM_GETLINK {name}"));
    request.attr_str(IFLA_IFNAME, name);
    match sock.get(request) {
        Ok(payload) => Ok(payload.as_deref().and_then(parse)),
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Set the MTU of interface `index` (called `name`) and bring it up.
pub fn set_mtu_up(sock: &mut Socket, index: u32, name: &str, mtu: u32) -> Result<(), NetlinkError> {
    let up = libc::IFF_UP as u32;
    let header = ifinfomsg(index, up, up);
    let mut request = Message::new(RTM_NEWLINK, 0, &header, format!("RTM_NEWLINK {name} up"));
    request.attr_u32(IFLA_MTU, mtu);
    sock.request(request)
}

/// Delete interface `index` (called `name`).
pub fn delete(sock: &mut Socket, index: u32, name: &str) -> Result<(), NetlinkError> {
    let header = ifinfomsg(index, 0, 0);
    sock.request(Message::new(RTM_DELLINK, 0, &header, format!("RTM_DELLINK {name}")))
}
