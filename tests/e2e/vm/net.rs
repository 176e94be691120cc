//! virtio-net end to end: the guest's NIC on a host tap exchanges ICMP and TCP with the host.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

use husk_tests::guest::GuestVm;

const HOST_IP: &str = "172.30.99.1";
const GUEST_IP: &str = "172.30.99.2";
const TRANSFER_BYTES: usize = 2 << 20;

/// A persistent host tap with an address, deleted when dropped.
struct HostTap(String);

impl HostTap {
    fn create(name: &str) -> Self {
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("ip runs");
            assert!(status.success(), "ip {args:?} failed");
        };
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        let tap = HostTap(name.to_owned());
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", name]);
        ip(&["link", "set", name, "up"]);
        tap
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

#[test]
fn guest_and_host_exchange_ping_and_tcp_over_the_tap() {
    let tap = HostTap::create("hke2e0");
    let from_guest = TcpListener::bind((HOST_IP, 9000)).unwrap();
    let to_guest = TcpListener::bind((HOST_IP, 9001)).unwrap();
    let payload: Vec<u8> =
        (0..TRANSFER_BYTES as u32).map(|i| (i.wrapping_mul(2_246_822_519) >> 13) as u8).collect();
    let payload_sha = sha256(&payload);

    let receiver = std::thread::spawn(move || {
        let (mut conn, _) = from_guest.accept().unwrap();
        let mut received = Vec::new();
        conn.read_to_end(&mut received).unwrap();
        received
    });
    let sender = std::thread::spawn(move || {
        let (mut conn, _) = to_guest.accept().unwrap();
        conn.write_all(&payload).unwrap();
    });

    let result = GuestVm::new("e2e-net")
        .args(&["--net", &format!("{},mac=02:00:00:00:99:02", tap.0)])
        .script(&format!(
            "ip addr add {GUEST_IP}/24 dev eth0\n\
             ip link set eth0 up\n\
             echo \"mac=$(cat /sys/class/net/eth0/address)\"\n\
             ping -c 3 -W 10 {HOST_IP} > /dev/null && echo ping=ok\n\
             head -c {TRANSFER_BYTES} /dev/urandom > /tmp/out\n\
             echo \"sent=$(sha256sum < /tmp/out | cut -d' ' -f1)\"\n\
             socat -u FILE:/tmp/out TCP:{HOST_IP}:9000\n\
             echo \"received=$(socat -u TCP:{HOST_IP}:9001 - | sha256sum | cut -d' ' -f1)\""
        ))
        .run();
    result.assert_success();
    assert_eq!(result.value("mac").as_deref(), Some("02:00:00:00:99:02"), "{result:#?}");
    assert_eq!(result.value("ping").as_deref(), Some("ok"), "{result:#?}");
    let received = receiver.join().unwrap();
    sender.join().unwrap();
    assert_eq!(received.len(), TRANSFER_BYTES);
    assert_eq!(result.value("sent"), Some(sha256(&received)), "guest to host over TCP");
    assert_eq!(result.value("received"), Some(payload_sha), "host to guest over TCP");
}
