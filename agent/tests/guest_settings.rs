//! The guest-wide settings the agent makes as PID 1: its NICs, routes and clock. The agent runs
//! in namespaces of its own (`Agent::start_as_pid1`); the test gives its network namespace a
//! veth pair to configure, so this host's own network is never touched. The clock has no
//! namespace, so SetTime only goes to an agent that is not PID 1, which never sets the clock:
//! one that is right is left alone there, one that is off is refused.

mod common;

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use husk_agent_protocol::agent as pb;

/// `ip ARGS` in the agent's network namespace; its stdout.
fn ip(agent: &Agent, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", agent.pid()))
        .arg("--")
        .arg("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2) through nsenter (util-linux)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn interface(mac: &str, name: &str, mtu: u32, addresses: &[(&str, u32)]) -> pb::Interface {
    pb::Interface {
        mac: mac.into(),
        name: name.into(),
        mtu,
        addresses: addresses
            .iter()
            .map(|(a, p)| pb::IpAddress {
                address: a.to_string(),
                prefix_len: *p,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn update_interface(agent: &Agent, iface: pb::Interface) -> ttrpc::Result<pb::Empty> {
    let req = pb::UpdateInterfaceRequest { interface: Some(iface).into(), ..Default::default() };
    agent.client.update_interface(ctx(), &req)
}

fn route(destination: &str, gateway: &str, device: &str) -> pb::Route {
    pb::Route {
        destination: destination.into(),
        gateway: gateway.into(),
        device: device.into(),
        ..Default::default()
    }
}

fn update_routes(agent: &Agent, routes: Vec<pb::Route>) -> ttrpc::Result<pb::Empty> {
    let req = pb::UpdateRoutesRequest { routes, ..Default::default() };
    agent.client.update_routes(ctx(), &req)
}

const MAC: &str = "02:00:0a:01:00:02";

#[test]
fn nic_addresses_and_routes_in_the_guests_namespace() {
    let agent = Agent::start_as_pid1();
    // The guest's NIC: one end of a veth pair whose other end is up, so that it has a carrier.
    ip(&agent, &["link", "add", "v0", "address", MAC, "type", "veth", "peer", "name", "v1"]);
    ip(&agent, &["link", "set", "v1", "up"]);

    let iface = interface(MAC, "eth0", 1400, &[("10.1.0.2", 24), ("fd00::2", 64)]);
    update_interface(&agent, iface).unwrap();
    let link = ip(&agent, &["-o", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400") && link.contains(",UP"), "{link}");
    let addrs = ip(&agent, &["-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("inet 10.1.0.2/24"), "{addrs}");
    assert!(addrs.contains("inet6 fd00::2/64"), "{addrs}");

    // Again, with other addresses: they replace the old ones (the link-local one stays).
    ip(&agent, &["addr", "add", "192.168.9.9/24", "dev", "eth0"]);
    let iface = interface(MAC, "", 0, &[("10.1.0.3", 24)]);
    update_interface(&agent, iface).unwrap();
    let addrs = ip(&agent, &["-o", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("inet 10.1.0.3/24"), "{addrs}");
    for gone in ["10.1.0.2", "fd00::2", "192.168.9.9"] {
        assert!(!addrs.contains(gone), "{gone} is still there: {addrs}");
    }
    assert!(ip(&agent, &["-o", "link", "show", "eth0"]).contains("mtu 1400"));

    // Routes: a stray one goes, the kernel's subnet route stays, gatewayed routes go in after
    // the link routes that reach their gateways, whatever the request's order.
    ip(&agent, &["route", "add", "10.9.0.0/16", "dev", "eth0"]);
    let routes = vec![
        route("", "10.2.0.1", "eth0"),
        route("10.3.0.0/16", "10.2.0.1", "eth0"),
        route("10.2.0.0/16", "", "eth0"),
        route("fd01::/64", "", "eth0"),
    ];
    update_routes(&agent, routes).unwrap();
    let v4 = ip(&agent, &["-4", "route", "show"]);
    assert!(v4.contains("default via 10.2.0.1 dev eth0"), "{v4}");
    assert!(v4.contains("10.3.0.0/16 via 10.2.0.1 dev eth0"), "{v4}");
    assert!(v4.contains("10.2.0.0/16 dev eth0 scope link"), "{v4}");
    assert!(v4.contains("10.1.0.0/24 dev eth0 proto kernel"), "{v4}");
    assert!(!v4.contains("10.9.0.0"), "{v4}");
    assert!(ip(&agent, &["-6", "route", "show"]).contains("fd01::/64 dev eth0"));
    // A second call replaces them all.
    update_routes(&agent, vec![route("", "10.1.0.1", "eth0")]).unwrap();
    let v4 = ip(&agent, &["-4", "route", "show"]);
    assert!(v4.contains("default via 10.1.0.1 dev eth0"), "{v4}");
    assert!(!v4.contains("10.2.0.0") && !v4.contains("10.3.0.0"), "{v4}");
    assert!(!ip(&agent, &["-6", "route", "show"]).contains("fd01::"));

    // Bad requests change nothing.
    let (code, msg) =
        status(update_interface(&agent, interface("02:00:00:00:00:99", "", 0, &[])).unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{msg}");
    let (code, msg) =
        status(update_interface(&agent, interface(MAC, "", 0, &[("10.1.0.300", 24)])).unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    let bad = vec![route("10.5.0.0/16", "", "eth0"), route("", "10.1.0.1", "eth7")];
    let (code, msg) = status(update_routes(&agent, bad).unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("eth7"), "{msg}");
    assert!(!ip(&agent, &["-4", "route", "show"]).contains("10.5.0.0"));

    // A NIC found by the MAC it has (a restored template's) takes the one asked for, here
    // while up (as an interface that was configured before is).
    let mut iface = interface("02:00:0a:01:00:07", "eth0", 0, &[("10.1.0.3", 24)]);
    iface.guest_mac = MAC.into();
    update_interface(&agent, iface).unwrap();
    let link = ip(&agent, &["-o", "link", "show", "eth0"]);
    assert!(link.contains("link/ether 02:00:0a:01:00:07") && link.contains(",UP"), "{link}");
    let mut iface = interface("02:00:0a:01:00:08", "", 0, &[]);
    iface.guest_mac = MAC.into();
    let (code, msg) = status(update_interface(&agent, iface).unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{msg}");
    assert!(msg.contains(MAC), "the MAC it looked for: {msg}");

    // The guest's NICs in a container's stats: the agent's sysfs is its namespace's.
    let rootfs = busybox_rootfs();
    agent
        .create("s", &spec(process(&["sleep", "1000"])), rootfs.path(), (false, false, false))
        .unwrap();
    let names: Vec<String> =
        agent.stats("s").unwrap().networks.iter().map(|n| n.name.clone()).collect();
    assert_eq!(names, ["eth0", "v1"]);
    agent.remove("s", false).unwrap();
}

fn set_time(agent: &Agent, offset_s: i64) -> ttrpc::Result<pb::Empty> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let req = pb::SetTimeRequest {
        seconds: now.as_secs() as i64 + offset_s,
        nanos: now.subsec_nanos(),
        ..Default::default()
    };
    agent.client.set_time(ctx(), &req)
}

#[test]
fn an_agent_that_is_not_pid_1_leaves_the_hosts_settings_alone() {
    let agent = Agent::start();
    // Nothing to change: fine anywhere.
    set_time(&agent, 0).unwrap();
    let req = pb::SetTimeRequest { seconds: 1, nanos: 1_000_000_000, ..Default::default() };
    let (code, _) = status(agent.client.set_time(ctx(), &req).unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    let refused = |r: ttrpc::Result<pb::Empty>| {
        let (code, msg) = status(r.unwrap_err());
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
        assert!(msg.contains("not the guest's PID 1"), "{msg}");
    };
    refused(set_time(&agent, -3600));
    refused(update_interface(&agent, interface(MAC, "eth0", 1400, &[])));
    refused(update_routes(&agent, vec![route("", "10.1.0.1", "eth0")]));
    let entropy = pb::AddEntropyRequest { data: vec![7; 64], ..Default::default() };
    refused(agent.client.add_entropy(ctx(), &entropy));
    agent.shutdown();
}
