//! Traffic control over rtnetlink: the ingress qdisc and the u32 match-all filter whose
//! `mirred egress redirect` action moves every frame an interface receives out of another one,
//! as `tc` would with
//!
//! ```text
//! tc qdisc add dev FROM ingress
//! tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0 \
//!     action mirred egress redirect dev TO
//! ```

use super::netlink::{Message, NetlinkError, Socket, NLM_F_CREATE, NLM_F_EXCL};

const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;

const TCA_U32_SEL: u16 = 5;
const TCA_U32_ACT: u16 = 7;
const TC_U32_TERMINAL: u8 = 1;

const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_MIRRED_PARMS: u16 = 2;
/// `TC_ACT_STOLEN`: the frame is consumed by the action (it leaves through the other device).
const TC_ACT_STOLEN: i32 = 4;
const TCA_EGRESS_REDIR: i32 = 1;

/// `TC_H_INGRESS`: the ingress attach point.
const TC_H_INGRESS: u32 = 0xffff_fff1;
/// `ffff:`: the handle of the ingress qdisc and so the parent of its filters.
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// `struct tcmsg`: family, interface index, handle, parent, info.
fn tcmsg(index: u32, handle: u32, parent: u32, info: u32) -> [u8; 20] {
    let mut header = [0u8; 20];
    header[0] = libc::AF_UNSPEC as u8;
    header[4..8].copy_from_slice(&index.to_ne_bytes());
    header[8..12].copy_from_slice(&handle.to_ne_bytes());
    header[12..16].copy_from_slice(&parent.to_ne_bytes());
    header[16..20].copy_from_slice(&info.to_ne_bytes());
    header
}

/// Add the ingress qdisc to interface `index` (called `name`). Fails with `EEXIST` when it has
/// one already.
pub fn add_ingress_qdisc(sock: &mut Socket, index: u32, name: &str) -> Result<(), NetlinkError> {
    let header = tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0);
    let op = format!("RTM_NEWQDISC ingress on {name}");
    let mut request = Message::new(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL, &header, op);
    request.attr_str(TCA_KIND, "ingress");
    sock.request(request)
}

/// Remove the ingress qdisc of interface `index` (called `name`), and its filters with it.
/// Returns false when there was none.
pub fn delete_ingress_qdisc(
    sock: &mut Socket,
    index: u32,
    name: &str,
) -> Result<bool, NetlinkError> {
    let header = tcmsg(index, INGRESS_HANDLE, TC_H_INGRESS, 0);
    let op = format!("RTM_DELQDISC ingress on {name}");
    match sock.request(Message::new(RTM_DELQDISC, 0, &header, op)) {
        Ok(()) => Ok(true),
        // No ingress qdisc: ENOENT, or EINVAL from kernels that find the default one.
        Err(e) if matches!(e.errno(), Some(libc::ENOENT | libc::EINVAL)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// On the ingress qdisc of interface `from`, a filter matching every frame whose action sends
/// it out of interface `to` (the names are for errors).
pub fn add_redirect(
    sock: &mut Socket,
    (from, from_name): (u32, &str),
    (to, to_name): (u32, &str),
) -> Result<(), NetlinkError> {
    // Priority 0 lets the kernel choose; the protocol (ETH_P_ALL, network order) is the low
    // half of `info`.
    let protocol = u32::from((libc::ETH_P_ALL as u16).to_be());
    let header = tcmsg(from, 0, INGRESS_HANDLE, protocol);
    let op = format!("RTM_NEWTFILTER u32 mirred redirect {from_name} -> {to_name}");
    let mut request = Message::new(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL, &header, op);
    request.attr_str(TCA_KIND, "u32").nested(TCA_OPTIONS, |options| {
        options.attr(TCA_U32_SEL, &match_all_selector()).nested(TCA_U32_ACT, |actions| {
            // Actions are listed under their order, from 1.
            actions.nested(1, |action| {
                action.attr_str(TCA_ACT_KIND, "mirred").nested(TCA_ACT_OPTIONS, |mirred| {
                    mirred.attr(TCA_MIRRED_PARMS, &mirred_redirect(to));
                });
            });
        });
    });
    sock.request(request)
}

/// `struct tc_u32_sel` with one key that matches everything (`match u8 0 0`: mask 0 at offset
/// 0) and the terminal flag.
fn match_all_selector() -> [u8; 32] {
    let mut sel = [0u8; 32];
    sel[0] = TC_U32_TERMINAL; // flags
    sel[2] = 1; // nkeys
                // offmask, off, offoff, hoff, hmask: 0. The key (mask, val, off, offmask): all 0.
    sel
}

/// `struct tc_mirred`: the generic action fields (index, capab, action, refcnt, bindcnt), then
/// the mirred action and the target interface.
fn mirred_redirect(to: u32) -> [u8; 28] {
    let mut parms = [0u8; 28];
    parms[8..12].copy_from_slice(&TC_ACT_STOLEN.to_ne_bytes());
    parms[20..24].copy_from_slice(&TCA_EGRESS_REDIR.to_ne_bytes());
    parms[24..28].copy_from_slice(&to.to_ne_bytes());
    parms
}
