//! vsock end to end: host clients reach guest listeners through the hybrid Unix socket and the
//! `CONNECT <port>` handshake, guest clients reach host listeners at `<uds>_<port>`, a few MiB
//! each way with matching checksums, and connections to ports nobody listens on are refused.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use husk_tests::guest::GuestVm;

const MIB4: usize = 4 << 20;

fn sha256(bytes: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

fn payload(seed: u32) -> Vec<u8> {
    (0..MIB4 as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

/// What a host client gets for `CONNECT port`: the stream after `OK <n>\n`, or the bytes it
/// got instead (EOF: the guest refused).
fn hybrid_connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let mut stream =
        UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8];
    while !line.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return Err(String::from_utf8_lossy(&line).into_owned()),
        }
    }
    let text = String::from_utf8_lossy(&line);
    if text.starts_with("OK ") {
        Ok(stream)
    } else {
        Err(text.into_owned())
    }
}

/// Connect to guest port `port`, retrying while the guest has not started listening yet.
fn connect_when_listening(uds: &Path, port: u32) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match hybrid_connect(uds, port) {
            Ok(stream) => return stream,
            Err(e) if Instant::now() > deadline => panic!("guest port {port} never accepted: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn host_client_and_guest_listener_exchange_4_mib_each_way() {
    let guest = GuestVm::new("e2e-vsock-host-client");
    let uds = guest.dir().join("vsock.sock");
    let mut guest = guest
        .args(&["--vsock-uds", uds.to_str().unwrap()])
        .script(
            "head -c 4194304 /dev/urandom > /tmp/g2h\n\
             echo \"g2h=$(sha256sum < /tmp/g2h | cut -d' ' -f1)\"\n\
             (socat -u VSOCK-LISTEN:5000 STDOUT | sha256sum | cut -d' ' -f1 > /tmp/h2g) &\n\
             socat -u FILE:/tmp/g2h VSOCK-LISTEN:5001 &\n\
             wait\n\
             echo \"h2g=$(cat /tmp/h2g)\"",
        )
        .spawn();
    guest.wait_for("g2h=", Duration::from_secs(240));

    let data = payload(1);
    let mut to_guest = connect_when_listening(&uds, 5000);
    to_guest.write_all(&data).unwrap();
    to_guest.shutdown(Shutdown::Write).unwrap();
    let mut from_guest = connect_when_listening(&uds, 5001);
    let mut received = Vec::new();
    from_guest.read_to_end(&mut received).unwrap();

    let result = guest.wait();
    result.assert_success();
    assert_eq!(result.value("h2g"), Some(sha256(&data)), "host to guest");
    assert_eq!(received.len(), MIB4);
    assert_eq!(result.value("g2h"), Some(sha256(&received)), "guest to host");
}

#[test]
fn guest_client_and_host_listener_exchange_4_mib_each_way() {
    let guest = GuestVm::new("e2e-vsock-guest-client");
    let uds = guest.dir().join("vsock.sock");
    let g2h_listener = UnixListener::bind(format!("{}_6000", uds.display())).unwrap();
    let h2g_listener = UnixListener::bind(format!("{}_6001", uds.display())).unwrap();
    let data = payload(2);
    let expected_h2g = sha256(&data);
    let receiver = std::thread::spawn(move || {
        let (mut conn, _) = g2h_listener.accept().unwrap();
        let mut received = Vec::new();
        conn.read_to_end(&mut received).unwrap();
        received
    });
    let sender = std::thread::spawn(move || {
        let (mut conn, _) = h2g_listener.accept().unwrap();
        conn.write_all(&data).unwrap();
    });

    let result = guest
        .args(&["--vsock-uds", uds.to_str().unwrap()])
        .script(
            "head -c 4194304 /dev/urandom > /tmp/g2h\n\
             echo \"g2h=$(sha256sum < /tmp/g2h | cut -d' ' -f1)\"\n\
             socat -u FILE:/tmp/g2h VSOCK-CONNECT:2:6000\n\
             echo \"h2g=$(socat -u VSOCK-CONNECT:2:6001 STDOUT | sha256sum | cut -d' ' -f1)\"",
        )
        .run();
    result.assert_success();
    let received = receiver.join().unwrap();
    sender.join().unwrap();
    assert_eq!(received.len(), MIB4);
    assert_eq!(result.value("g2h"), Some(sha256(&received)), "guest to host");
    assert_eq!(result.value("h2g"), Some(expected_h2g), "host to guest");
}

#[test]
fn connections_to_ports_nobody_listens_on_are_refused_on_both_sides() {
    let guest = GuestVm::new("e2e-vsock-refused");
    let uds = guest.dir().join("vsock.sock");
    let mut guest = guest
        .args(&["--vsock-uds", uds.to_str().unwrap()])
        .script(
            "if socat -u VSOCK-CONNECT:2:7777 STDOUT 2> /tmp/err; then echo guest_connect=accepted; \
             else echo \"guest_connect=$(grep -o 'Connection [a-z ]*' /tmp/err | head -1)\"; fi\n\
             echo ready\n\
             socat -u VSOCK-LISTEN:5000 STDOUT > /dev/null",
        )
        .spawn();
    guest.wait_for("ready", Duration::from_secs(240));

    // The guest RSTs at once; the device's own 2 s handshake timeout must not be what ends it.
    let started = Instant::now();
    let refused = hybrid_connect(&uds, 7777);
    let elapsed = started.elapsed();
    assert_eq!(refused.err().as_deref(), Some(""), "EOF without OK for a port nobody listens on");
    assert!(
        elapsed < Duration::from_secs(2),
        "refused by the guest, not by the timeout: {elapsed:?}"
    );

    drop(connect_when_listening(&uds, 5000));
    let result = guest.wait();
    result.assert_success();
    assert_eq!(
        result.value("guest_connect").as_deref(),
        Some("Connection reset by peer"),
        "{result:#?}"
    );
}
