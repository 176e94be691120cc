//! End-to-end tests of the vsock device: the test plays the guest driver in guest memory, host
//! clients and services are real Unix sockets (clients in other threads), and everything runs
//! through the real `EventManager` loop and the virtio-mmio transport.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{op, VsockHeader, HDR_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::test_support::*;
use super::{ListenerError, Vsock, VsockConfig, VsockError, HOST_CID};
use crate::devices::virtio::device::Interrupt;
use crate::devices::virtio::test_utils::{read_reg, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::devices::virtio::VirtioDevice;

const FIRST_HOST_PORT: u32 = 1 << 30;

/// The guest end of one stream, keeping the credit accounts a driver keeps.
struct GuestStream {
    guest_port: u32,
    host_port: u32,
    /// What we advertise.
    buf_alloc: u32,
    /// Bytes we consumed, and as the host last heard it.
    fwd_cnt: u32,
    fwd_told: u32,
    /// Bytes received from the host.
    received: u32,
    /// The host's window.
    host_buf_alloc: u32,
    host_fwd_cnt: u32,
    /// Bytes sent to the host.
    sent: u32,
}

impl GuestStream {
    fn new(guest_port: u32, host_port: u32, buf_alloc: u32) -> Self {
        GuestStream {
            guest_port,
            host_port,
            buf_alloc,
            fwd_cnt: 0,
            fwd_told: 0,
            received: 0,
            host_buf_alloc: 0,
            host_fwd_cnt: 0,
            sent: 0,
        }
    }

    fn hdr(&mut self, op: u16, flags: u32, len: usize) -> VsockHeader {
        self.fwd_told = self.fwd_cnt;
        VsockHeader {
            len: len as u32,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
            ..guest_hdr(self.guest_port, self.host_port, op)
        }
    }

    fn send(&mut self, h: &mut Harness, op: u16, flags: u32, payload: &[u8]) {
        let hdr = self.hdr(op, flags, payload.len());
        self.sent = self.sent.wrapping_add(payload.len() as u32);
        h.send(&hdr, payload);
    }

    /// Take in a packet from the host: its credit information, and for RW its data, which
    /// must fit the window we advertised.
    fn absorb(&mut self, pkt: &RxPacket) {
        assert_packet(pkt, pkt.hdr.op, self.guest_port, self.host_port);
        self.host_buf_alloc = pkt.hdr.buf_alloc;
        self.host_fwd_cnt = pkt.hdr.fwd_cnt;
        self.received = self.received.wrapping_add(pkt.payload.len() as u32);
        let in_flight = self.received.wrapping_sub(self.fwd_told);
        assert!(in_flight <= self.buf_alloc, "host overran our window: {in_flight} bytes");
    }

    fn host_credit(&self) -> u32 {
        self.host_buf_alloc.saturating_sub(self.sent.wrapping_sub(self.host_fwd_cnt))
    }
}

/// Connect to the device's socket and ask for guest port `port`.
fn connect_client(uds: &Path, port: u32) -> UnixStream {
    let mut stream = UnixStream::connect(uds).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    writeln!(stream, "CONNECT {port}").unwrap();
    stream
}

/// Read up to a newline, or everything until EOF.
fn read_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap() == 1 {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

/// Write `len` pattern bytes of `seed`, then close the write side.
fn write_pattern(mut stream: UnixStream, seed: u64, len: usize) {
    let mut offset = 0;
    while offset < len {
        let chunk: Vec<u8> =
            (offset..len.min(offset + 50_000)).map(|i| pattern_byte(seed, i as u64)).collect();
        stream.write_all(&chunk).unwrap();
        offset += chunk.len();
    }
    stream.shutdown(Shutdown::Write).unwrap();
}

/// Read to EOF, checking every byte against the pattern of `seed`; returns the count.
fn read_pattern(stream: &mut UnixStream, seed: u64) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            return total;
        }
        check_pattern(&buf[..n], seed, total);
        total += n;
    }
}

fn check_pattern(data: &[u8], seed: u64, offset: usize) {
    for (i, b) in data.iter().enumerate() {
        let at = (offset + i) as u64;
        assert_eq!(*b, pattern_byte(seed, at), "byte {at} of stream {seed} is wrong");
    }
}

/// Run the loop until the guest receives the REQUEST a host client caused.
fn expect_request(h: &mut Harness, guest_port: u32) -> u32 {
    let pkt = h.expect_packet();
    assert_eq!(pkt.hdr.op, op::REQUEST, "{:?}", pkt.hdr);
    assert_eq!(pkt.hdr.dst_port, guest_port);
    assert!(pkt.hdr.src_port >= FIRST_HOST_PORT, "host port {}", pkt.hdr.src_port);
    assert_packet(&pkt, op::REQUEST, guest_port, pkt.hdr.src_port);
    pkt.hdr.src_port
}

/// Open guest port `guest_port` -> host service `port` (listening at `<uds>_<port>`), and
/// return the service's end and the guest's.
fn guest_connect(h: &mut Harness, port: u32, guest_port: u32) -> (UnixStream, GuestStream) {
    let service = UnixListener::bind(format!("{}_{port}", h.uds.display())).unwrap();
    let mut gs = GuestStream::new(guest_port, port, 256 * 1024);
    gs.send(h, op::REQUEST, 0, &[]);
    let pkt = h.expect_packet();
    assert_packet(&pkt, op::RESPONSE, guest_port, port);
    gs.absorb(&pkt);
    let (peer, _) = service.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (peer, gs)
}

/// Run the loop until an RW packet arrives; return its payload.
fn expect_data(h: &mut Harness, gs: &mut GuestStream) -> Vec<u8> {
    let pkt = h.expect_packet();
    assert_packet(&pkt, op::RW, gs.guest_port, gs.host_port);
    gs.absorb(&pkt);
    pkt.payload
}

/// No packet reaches the guest for a while.
fn expect_silence(h: &mut Harness) {
    let packets = h.recv_within(Duration::from_millis(150));
    assert!(packets.is_empty(), "unexpected packets {packets:?}");
}

#[test]
fn host_connect_streams_megabytes_both_ways_through_small_credit() {
    const LEN: usize = 4 << 20;
    const TO_GUEST: u64 = 1;
    const TO_HOST: u64 = 2;
    let mut h = Harness::new();
    h.post_rx(64);
    let uds = h.uds.clone();
    let client = thread::spawn(move || {
        let mut stream = connect_client(&uds, 5000);
        let ok = read_line(&mut stream);
        let port: u32 = ok.strip_prefix("OK ").unwrap().trim_end().parse().unwrap();
        let writer = stream.try_clone().unwrap();
        let writer = thread::spawn(move || write_pattern(writer, TO_GUEST, LEN));
        let got = read_pattern(&mut stream, TO_HOST);
        writer.join().unwrap();
        (port, got)
    });

    let host_port = expect_request(&mut h, 5000);
    // A 16 KiB window forces the host to wait for credit updates all along.
    let mut gs = GuestStream::new(5000, host_port, 16 * 1024);
    gs.send(&mut h, op::RESPONSE, 0, &[]);
    let (mut host_eof, mut shut_sent) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(host_eof && shut_sent && client.is_finished()) {
        assert!(Instant::now() < deadline, "transfer stalled: {} bytes in", gs.received);
        h.run(1);
        let packets = h.recv();
        for pkt in &packets {
            let at = gs.received as usize;
            gs.absorb(pkt);
            match pkt.hdr.op {
                op::RW => check_pattern(&pkt.payload, TO_GUEST, at),
                op::CREDIT_UPDATE => {}
                op::SHUTDOWN => {
                    assert_ne!(pkt.hdr.flags & SHUTDOWN_SEND, 0);
                    host_eof = true;
                }
                other => panic!("unexpected op {other}"),
            }
        }
        // The guest consumes everything at once and reports it every half window.
        gs.fwd_cnt = gs.received;
        if gs.fwd_cnt.wrapping_sub(gs.fwd_told) >= gs.buf_alloc / 2 {
            let hdr = gs.hdr(op::CREDIT_UPDATE, 0, 0);
            h.place_tx(&hdr, &[]);
        }
        h.post_rx(packets.len());
        for _ in 0..32 {
            let left = LEN - gs.sent as usize;
            let chunk = left.min(gs.host_credit() as usize).min(8192);
            if chunk == 0 {
                break;
            }
            let data: Vec<u8> =
                (0..chunk).map(|i| pattern_byte(TO_HOST, (gs.sent as usize + i) as u64)).collect();
            let hdr = gs.hdr(op::RW, 0, chunk);
            gs.sent += chunk as u32;
            h.place_tx(&hdr, &data);
        }
        if gs.sent as usize == LEN && !shut_sent {
            let hdr = gs.hdr(op::SHUTDOWN, SHUTDOWN_SEND, 0);
            h.place_tx(&hdr, &[]);
            shut_sent = true;
        }
        h.kick_tx();
    }
    let (port, got) = client.join().unwrap();
    assert_eq!(port, host_port, "OK line names the host port");
    assert_eq!(got, LEN, "host got all the guest's bytes");
    assert_eq!(gs.received as usize, LEN, "guest got all the host's bytes");

    // Full close from the guest: the device answers with an RST.
    gs.send(&mut h, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
    let pkt = h.expect_packet();
    assert_rst(&pkt, 5000, host_port);
    assert!(h.interrupts() > 0);
}

#[test]
fn one_way_guest_upload_is_paced_by_credit_updates() {
    // Nothing flows back to the guest, so only CREDIT_UPDATE packets reopen its window.
    const LEN: usize = 2 << 20;
    let mut h = Harness::new();
    h.post_rx(16);
    let (mut peer, mut gs) = guest_connect(&mut h, 58, 1009);
    let reader = thread::spawn(move || read_pattern(&mut peer, 11));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut updates = 0;
    while (gs.sent as usize) < LEN {
        assert!(Instant::now() < deadline, "upload stalled at {} bytes", gs.sent);
        for _ in 0..16 {
            let chunk = (LEN - gs.sent as usize).min(gs.host_credit() as usize).min(32 * 1024);
            if chunk == 0 {
                break;
            }
            let data: Vec<u8> =
                (0..chunk).map(|i| pattern_byte(11, (gs.sent as usize + i) as u64)).collect();
            let hdr = gs.hdr(op::RW, 0, chunk);
            gs.sent += chunk as u32;
            h.place_tx(&hdr, &data);
        }
        h.kick_tx();
        h.run(5);
        let packets = h.recv();
        for pkt in &packets {
            assert_eq!(pkt.hdr.op, op::CREDIT_UPDATE, "{:?}", pkt.hdr);
            gs.absorb(pkt);
            updates += 1;
        }
        h.post_rx(packets.len());
    }
    gs.send(&mut h, op::SHUTDOWN, SHUTDOWN_SEND, &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "host never saw EOF");
        h.run(5);
    }
    assert_eq!(reader.join().unwrap(), LEN);
    assert!(updates >= LEN / (256 * 1024), "only {updates} credit updates");
}

#[test]
fn connect_to_port_the_guest_refuses_sees_eof_promptly() {
    let mut h = Harness::new();
    h.post_rx(8);
    let uds = h.uds.clone();
    let client = thread::spawn(move || {
        let mut stream = connect_client(&uds, 77);
        let start = Instant::now();
        let rest = read_line(&mut stream);
        (rest, start.elapsed())
    });
    let host_port = expect_request(&mut h, 77);
    let mut gs = GuestStream::new(77, host_port, 4096);
    gs.send(&mut h, op::RST, 0, &[]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.is_finished() && Instant::now() < deadline {
        h.run(10);
    }
    let (rest, waited) = client.join().unwrap();
    assert_eq!(rest, "", "client must see EOF, not an OK");
    assert!(waited < Duration::from_secs(1), "EOF took {waited:?}");
    expect_silence(&mut h);
}

#[test]
fn guest_that_never_answers_times_out() {
    let mut h = Harness::new();
    h.post_rx(8);
    let uds = h.uds.clone();
    let client = thread::spawn(move || {
        let mut stream = connect_client(&uds, 78);
        let start = Instant::now();
        let rest = read_line(&mut stream);
        (rest, start.elapsed())
    });
    let host_port = expect_request(&mut h, 78);
    let pkt = h.recv_within(Duration::from_secs(5));
    assert_eq!(pkt.len(), 1, "{pkt:?}");
    assert_rst(&pkt[0], 78, host_port);
    let (rest, waited) = client.join().unwrap();
    assert_eq!(rest, "");
    assert!(waited >= Duration::from_millis(1500), "gave up after {waited:?}");
    assert!(waited < Duration::from_secs(4), "gave up after {waited:?}");
    // A late answer finds no connection.
    let mut gs = GuestStream::new(78, host_port, 4096);
    gs.send(&mut h, op::RESPONSE, 0, &[]);
    assert_rst(&h.expect_packet(), 78, host_port);
}

#[test]
fn guest_connects_to_host_service_and_streams_both_ways() {
    let mut h = Harness::new();
    h.post_rx(16);
    let (mut peer, mut gs) = guest_connect(&mut h, 52, 1000);
    assert!(h.interrupts() > 0, "RESPONSE delivery raised an interrupt");

    gs.send(&mut h, op::RW, 0, b"hello host");
    h.run(10);
    let mut buf = [0u8; 10];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    peer.write_all(b"hello guest").unwrap();
    assert_eq!(expect_data(&mut h, &mut gs), b"hello guest");

    // Guest half-close: the service reads EOF but can still write.
    gs.send(&mut h, op::SHUTDOWN, SHUTDOWN_SEND, &[]);
    h.run(10);
    assert_eq!(peer.read(&mut buf).unwrap(), 0);
    peer.write_all(b"still here").unwrap();
    assert_eq!(expect_data(&mut h, &mut gs), b"still here");

    // The service closes: the guest hears it will neither send nor receive.
    drop(peer);
    let pkt = h.expect_packet();
    assert_packet(&pkt, op::SHUTDOWN, 1000, 52);
    assert_eq!(pkt.hdr.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);

    gs.send(&mut h, op::RST, 0, &[]);
    expect_silence(&mut h);
    gs.send(&mut h, op::RW, 0, b"late");
    assert_rst(&h.expect_packet(), 1000, 52);
}

#[test]
fn host_half_close_reaches_guest_as_send_shutdown() {
    let mut h = Harness::new();
    h.post_rx(16);
    let (mut peer, mut gs) = guest_connect(&mut h, 53, 1001);
    peer.shutdown(Shutdown::Write).unwrap();
    let pkt = h.expect_packet();
    assert_packet(&pkt, op::SHUTDOWN, 1001, 53);
    assert_eq!(pkt.hdr.flags, SHUTDOWN_SEND, "the host still reads");
    gs.send(&mut h, op::RW, 0, b"reply");
    h.run(10);
    let mut buf = [0u8; 5];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"reply");
    gs.send(&mut h, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
    assert_rst(&h.expect_packet(), 1001, 53);
    assert_eq!(peer.read(&mut buf).unwrap(), 0, "host socket closed after the guest's close");
}

#[test]
fn guest_connect_to_absent_service_is_reset() {
    let mut h = Harness::new();
    h.post_rx(8);
    let mut gs = GuestStream::new(1000, 52, 4096);
    gs.send(&mut h, op::REQUEST, 0, &[]);
    assert_rst(&h.expect_packet(), 1000, 52);
    // A socket file with no listener behind it is refused just as promptly.
    drop(UnixListener::bind(format!("{}_53", h.uds.display())).unwrap());
    let mut gs = GuestStream::new(1000, 53, 4096);
    gs.send(&mut h, op::REQUEST, 0, &[]);
    assert_rst(&h.expect_packet(), 1000, 53);
}

#[test]
fn malformed_connect_lines_are_dropped() {
    let mut h = Harness::new();
    h.post_rx(8);
    let lines: [&[u8]; 5] =
        [b"HELLO 5\n", b"CONNECT five\n", b"CONNECT 99999999999\n", b"CONNECT 1 2\n", &[b'C'; 200]];
    let mut clients = Vec::new();
    for line in lines {
        let mut stream = UnixStream::connect(&h.uds).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.write_all(line).unwrap();
        clients.push(stream);
    }
    // One that hangs up before its newline.
    let mut early = UnixStream::connect(&h.uds).unwrap();
    early.write_all(b"CONNECT 5").unwrap();
    early.shutdown(Shutdown::Write).unwrap();
    clients.push(early);
    h.settle(50);
    for (i, client) in clients.iter_mut().enumerate() {
        // Closing a socket with unread bytes makes the client's read fail with a reset.
        let mut rest = Vec::new();
        match client.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "client {i} got {rest:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "client {i}"),
        }
    }
    assert!(h.recv().is_empty(), "no REQUEST for a malformed line");
    // The listener still serves well-formed clients.
    let _good = connect_client(&h.uds, 9);
    expect_request(&mut h, 9);
}

#[test]
fn host_data_waits_for_rx_buffers() {
    const LEN: usize = 200 * 1024;
    let mut h = Harness::new();
    h.post_rx(1);
    let (peer, mut gs) = guest_connect(&mut h, 54, 1002);
    let writer = thread::spawn(move || write_pattern(peer, 7, LEN));
    // With no rx buffer the device stops reading and the loop goes quiet: nothing is polled
    // that cannot be served.
    h.settle(100);
    assert_eq!(h.run(300), 0, "event loop spins without rx buffers");
    assert!(h.recv().is_empty());
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < LEN {
        assert!(Instant::now() < deadline, "only {} bytes arrived", got.len());
        h.post_rx(8);
        h.run(10);
        for pkt in h.recv() {
            gs.absorb(&pkt);
            assert_eq!(pkt.hdr.op, op::RW, "{:?}", pkt.hdr);
            got.extend_from_slice(&pkt.payload);
        }
        gs.fwd_cnt = gs.received;
        let hdr = gs.hdr(op::CREDIT_UPDATE, 0, 0);
        h.send(&hdr, &[]);
    }
    check_pattern(&got, 7, 0);
    writer.join().unwrap();
    assert_eq!(got.len(), LEN);
}

#[test]
fn no_credit_from_the_guest_means_no_data() {
    let mut h = Harness::new();
    h.post_rx(8);
    let (mut peer, mut gs) = guest_connect(&mut h, 55, 1003);
    gs.buf_alloc = 10;
    gs.send(&mut h, op::CREDIT_UPDATE, 0, &[]);
    peer.write_all(b"0123456789abcdef").unwrap();
    assert_eq!(expect_data(&mut h, &mut gs), b"0123456789");
    h.settle(50);
    assert_eq!(h.run(200), 0, "event loop spins without guest credit");
    assert!(h.recv().is_empty(), "data beyond the window");
    gs.fwd_cnt = 10;
    gs.send(&mut h, op::CREDIT_UPDATE, 0, &[]);
    assert_eq!(expect_data(&mut h, &mut gs), b"abcdef");
}

#[test]
fn guest_credit_request_gets_a_credit_update() {
    let mut h = Harness::new();
    h.post_rx(8);
    let (mut peer, mut gs) = guest_connect(&mut h, 56, 1004);
    gs.send(&mut h, op::RW, 0, b"abc");
    h.run(10);
    let mut buf = [0u8; 3];
    peer.read_exact(&mut buf).unwrap();
    gs.send(&mut h, op::CREDIT_REQUEST, 0, &[]);
    let pkt = h.expect_packet();
    assert_packet(&pkt, op::CREDIT_UPDATE, 1004, 56);
    assert_eq!(pkt.hdr.fwd_cnt, 3, "forwarded count");
    assert_eq!(pkt.hdr.buf_alloc, 256 * 1024);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    const CHUNK: usize = 64 * 1024;
    const PACKETS: usize = 30;
    let mut h = Harness::new();
    h.post_rx(40);
    let (mut peer, mut gs) = guest_connect(&mut h, 57, 1005);
    let chunk = vec![0x5a; CHUNK];
    for _ in 0..PACKETS {
        let hdr = gs.hdr(op::RW, 0, CHUNK);
        h.place_tx(&hdr, &chunk);
    }
    h.kick_tx();
    h.settle(50);
    let packets = h.recv();
    assert!(packets.iter().all(|p| p.hdr.op == op::RST), "{packets:?}");
    // The offending packet resets the stream; every later one finds no stream.
    let accepted = PACKETS + 1 - packets.len() - 1;
    let mut forwarded = Vec::new();
    peer.read_to_end(&mut forwarded).unwrap();
    assert!(forwarded.iter().all(|&b| b == 0x5a));
    // The host socket took `forwarded` bytes; the device buffers at most its window beyond.
    let window = 256 * 1024;
    assert!(accepted * CHUNK <= forwarded.len() + window, "{accepted} packets accepted");
    assert!((accepted + 1) * CHUNK > forwarded.len() + window, "{accepted} packets accepted");
}

#[test]
fn packets_without_a_connection_are_reset() {
    let mut h = Harness::new();
    h.post_rx(16);
    for op in [op::RW, op::RESPONSE, op::SHUTDOWN, op::CREDIT_UPDATE, op::CREDIT_REQUEST, 0, 99] {
        h.send(&guest_hdr(2000, 60, op), &[]);
        assert_rst(&h.expect_packet(), 2000, 60);
    }
    h.send(&guest_hdr(2000, 60, op::RST), &[]);
    expect_silence(&mut h);
}

#[test]
fn wrong_type_or_destination_is_reset_and_spoofed_source_dropped() {
    let mut h = Harness::new();
    h.post_rx(16);
    let seqpacket = VsockHeader { type_: 2, ..guest_hdr(2001, 61, op::REQUEST) };
    h.send(&seqpacket, &[]);
    assert_rst(&h.expect_packet(), 2001, 61);
    let other_vm = VsockHeader { dst_cid: 7, ..guest_hdr(2001, 61, op::REQUEST) };
    h.send(&other_vm, &[]);
    assert_rst(&h.expect_packet(), 2001, 61);
    let spoofed = VsockHeader { src_cid: 9, ..guest_hdr(2001, 61, op::REQUEST) };
    h.send(&spoofed, &[]);
    expect_silence(&mut h);
}

#[test]
fn unknown_op_on_a_connection_resets_it() {
    let mut h = Harness::new();
    h.post_rx(16);
    let (mut peer, mut gs) = guest_connect(&mut h, 62, 1006);
    gs.send(&mut h, 42, 0, &[]);
    assert_rst(&h.expect_packet(), 1006, 62);
    let mut buf = [0u8; 1];
    assert_eq!(peer.read(&mut buf).unwrap(), 0, "host side closed");
}

#[test]
fn bad_lengths_reset_the_connection() {
    // Each case: the header's `len`, then the payload descriptor's length and flags.
    let cases = [
        // Longer than the payload present.
        (100, 10, 0),
        // Shorter than the payload present.
        (4, 10, 0),
        // Payload in a device-writable descriptor.
        (10, 10, VIRTQ_DESC_F_WRITE),
        // Beyond the largest packet, though present.
        (70_000, 70_000, 0),
    ];
    for (i, (len, payload_len, payload_flags)) in cases.into_iter().enumerate() {
        let mut h = Harness::new();
        h.post_rx(16);
        let port = 70 + i as u32;
        let (mut peer, mut gs) = guest_connect(&mut h, port, 1007);
        let hdr = gs.hdr(op::RW, 0, len);
        h.mem.write_slice(&hdr.to_bytes(), GuestAddress(SCRATCH)).unwrap();
        let head = h.tx_slot_index();
        h.send_raw_chain(&[
            (SCRATCH, HDR_LEN as u32, VIRTQ_DESC_F_NEXT, head + 1),
            (SCRATCH + 0x100, payload_len, payload_flags, 0),
        ]);
        assert_rst(&h.expect_packet(), 1007, port);
        let mut buf = [0u8; 1];
        assert_eq!(peer.read(&mut buf).unwrap(), 0, "case {i}: host side closed, nothing sent");
        let mut last = None;
        while let Some(entry) = h.txq.pop_used() {
            last = Some(entry);
        }
        assert_eq!(last, Some((u32::from(head), 0)), "case {i}: chain returned");
    }
}

#[test]
fn hostile_tx_chains_are_returned_and_the_device_goes_on() {
    let mut h = Harness::new();
    h.post_rx(16);
    let request = guest_hdr(3000, 90, op::REQUEST);
    h.mem.write_slice(&request.to_bytes(), GuestAddress(SCRATCH)).unwrap();
    let hdr_len = HDR_LEN as u32;
    let outside = GUEST_MEM as u64 + 0x1000;
    let head = h.tx_slot_index();
    let chains: Vec<Vec<(u64, u32, u16, u16)>> = vec![
        // Short header.
        vec![(SCRATCH, 20, 0, 0)],
        // Header in a device-writable descriptor.
        vec![(SCRATCH, hdr_len, VIRTQ_DESC_F_WRITE, 0)],
        // Outside guest memory.
        vec![(outside, hdr_len, 0, 0)],
        // Address plus length wraps around.
        vec![(u64::MAX - 8, hdr_len, 0, 0)],
        // Straddles the end of guest memory.
        vec![(GUEST_MEM as u64 - 20, hdr_len, 0, 0)],
        // Next index out of range.
        vec![(SCRATCH, 20, VIRTQ_DESC_F_NEXT, 999)],
        // Zero-length descriptors only.
        vec![(SCRATCH, 0, 0, 0)],
    ];
    for chain in &chains {
        h.send_raw_chain(chain);
    }
    // A chain that loops on itself, longer than the queue (over zeroed memory).
    let looping = h.tx_slot_index();
    h.send_raw_chain(&[(SCRATCH + 0x1000, 20, VIRTQ_DESC_F_NEXT, looping)]);
    h.settle(20);
    let mut used = Vec::new();
    while let Some(entry) = h.txq.pop_used() {
        used.push(entry);
    }
    assert_eq!(used.len(), chains.len() + 1, "every chain returned: {used:?}");
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(used[0].0, u32::from(head));
    assert!(h.recv().is_empty(), "no packet from garbage");
    // Zero-length and overlapping descriptors around a valid header still make a packet.
    let next = h.tx_slot_index();
    h.send_raw_chain(&[
        (SCRATCH, 0, VIRTQ_DESC_F_NEXT, next + 1),
        (SCRATCH, 30, VIRTQ_DESC_F_NEXT, next + 2),
        (SCRATCH + 30, 14, 0, 0),
    ]);
    assert_rst(&h.expect_packet(), 3000, 90);
}

#[test]
fn broken_available_index_does_not_hang_the_loop() {
    let mut h = Harness::new();
    h.post_rx(4);
    let idx = h.tx_slot_index();
    h.txq.set_avail_idx(idx.wrapping_add(1000));
    h.kick_tx();
    h.settle(20);
    assert_eq!(h.run(100), 0, "loop spins on a broken queue");
    h.txq.set_avail_idx(0);
    h.send(&guest_hdr(3001, 91, op::REQUEST), &[]);
    assert_rst(&h.expect_packet(), 3001, 91);
}

#[test]
fn unusable_rx_buffers_are_returned_empty_and_lose_nothing() {
    let mut h = Harness::new();
    let outside = GUEST_MEM as u64 + 0x1000;
    h.post_raw_rx(&[(SCRATCH, 4096, 0, 0)]);
    h.post_raw_rx(&[(SCRATCH, 20, VIRTQ_DESC_F_WRITE, 0)]);
    h.post_raw_rx(&[(SCRATCH, HDR_LEN as u32, VIRTQ_DESC_F_WRITE, 0)]);
    h.post_raw_rx(&[(outside, 4096, VIRTQ_DESC_F_WRITE, 0)]);
    h.send(&guest_hdr(3002, 92, op::REQUEST), &[]);
    h.settle(20);
    let mut used = Vec::new();
    while let Some(entry) = h.rxq.pop_used() {
        used.push(entry);
    }
    assert_eq!(used, vec![(0, 0), (1, 0), (2, 0), (3, 0)], "bad buffers returned with nothing");
    // The RST waited for a usable buffer; the header may straddle two descriptors.
    h.post_raw_rx(&[
        (rx_slot(4), 30, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 5),
        (rx_slot(4) + 30, 100, VIRTQ_DESC_F_WRITE, 0),
    ]);
    h.settle(20);
    assert_eq!(h.rxq.pop_used(), Some((4, HDR_LEN as u32)));
    let mut raw = [0u8; HDR_LEN];
    h.mem.read_slice(&mut raw, GuestAddress(rx_slot(4))).unwrap();
    let hdr = VsockHeader::from_bytes(&raw);
    assert_eq!((hdr.op, hdr.src_port, hdr.dst_port), (op::RST, 92, 3002));
}

#[test]
fn reset_drops_connections_and_keeps_listening() {
    let mut h = Harness::new();
    h.post_rx(8);
    let mut client = connect_client(&h.uds, 300);
    let host_port = expect_request(&mut h, 300);
    let mut gs = GuestStream::new(300, host_port, 4096);
    gs.send(&mut h, op::RESPONSE, 0, &[]);
    h.run(10);
    assert_eq!(read_line(&mut client), format!("OK {host_port}\n"));
    let (mut peer, _) = guest_connect(&mut h, 301, 1008);

    h.reset_device();
    h.settle(20);
    assert!(!h.vsock.lock().unwrap().is_activated());
    let mut buf = [0u8; 1];
    assert_eq!(client.read(&mut buf).unwrap(), 0, "host-initiated connection closed");
    assert_eq!(peer.read(&mut buf).unwrap(), 0, "guest-initiated connection closed");

    // While reset, clients wait in the backlog; once active again they are served.
    let _waiting = connect_client(&h.uds, 302);
    h.settle(20);
    h.activate(VERSION_1);
    h.post_rx(8);
    expect_request(&mut h, 302);
    // The old streams are gone.
    gs.send(&mut h, op::RW, 0, b"x");
    assert_rst(&h.expect_packet(), 300, host_port);
}

#[test]
fn queue_events_before_activation_are_ignored() {
    let dir = TempDir::new("vsock");
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let config = VsockConfig { guest_cid: GUEST_CID, uds_path: dir.path().join("v.sock") };
    let vsock = Arc::new(std::sync::Mutex::new(Vsock::new(config, interrupt).unwrap()));
    let mut em = event_manager::EventManager::<Arc<std::sync::Mutex<Vsock>>>::new().unwrap();
    event_manager::SubscriberOps::add_subscriber(&mut em, vsock.clone());
    vsock.lock().unwrap().activate_evt().write(1).unwrap();
    assert_eq!(em.run_with_timeout(50).unwrap(), 1);
    assert_eq!(em.run_with_timeout(50).unwrap(), 0, "queue events are not registered yet");
    assert!(!vsock.lock().unwrap().is_activated());
}

#[test]
fn event_idx_suppresses_and_requests_notifications() {
    let mut h = Harness::with_features(VERSION_1 | EVENT_IDX);
    assert_ne!(h.vsock.lock().unwrap().acked_features() & EVENT_IDX, 0);
    h.post_rx(8);
    let used_event = |q: &crate::devices::virtio::test_utils::QueueDriver| {
        q.avail_ring() + 4 + 2 * u64::from(q.size())
    };
    // The driver asks for an interrupt only after the 5th used rx buffer.
    h.mem.write_obj(4u16, GuestAddress(used_event(&h.rxq))).unwrap();
    h.interrupts();
    for port in 0..4 {
        h.send(&guest_hdr(4000 + port, 93, op::REQUEST), &[]);
        assert_rst(&h.expect_packet(), 4000 + port, 93);
    }
    let rx_interrupts = h.interrupts();
    h.send(&guest_hdr(4010, 93, op::REQUEST), &[]);
    assert_rst(&h.expect_packet(), 4010, 93);
    assert!(h.interrupts() > 0, "the 5th rx buffer interrupts");
    // The tx queue's used event is 0: after its first chain, no tx interrupts were asked for.
    assert!(rx_interrupts <= 1, "{rx_interrupts} interrupts before used_event was reached");
    // After draining tx the device asks to be kicked at the next new chain.
    let avail_event: u16 = h.mem.read_obj(GuestAddress(h.txq.used_ring() + 4 + 8 * 256)).unwrap();
    assert_eq!(avail_event, h.tx_slot_index());
}

#[test]
fn config_space_and_features() {
    let h = Harness::new();
    let mut t = h.transport;
    assert_eq!(read_reg(&mut t, 0x08), 19, "device id");
    let mut cid = [0u8; 8];
    crate::devices::bus::BusDevice::read(&mut t, 0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let vsock = h.vsock.lock().unwrap();
    assert_eq!(vsock.avail_features(), VERSION_1 | EVENT_IDX);
    assert_eq!(vsock.queues().len(), 3);
    let sizes: Vec<u16> = vsock.queues().iter().map(virtio_queue::QueueT::max_size).collect();
    assert_eq!(sizes, [64, 256, 256], "a small rx queue: each entry is a guest buffer");
}

#[test]
fn socket_path_in_use_is_an_error_and_drop_removes_the_file() {
    let h = Harness::new();
    let uds = h.uds.clone();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let config = VsockConfig { guest_cid: 4, uds_path: uds.clone() };
    let err = Vsock::new(config, interrupt).unwrap_err();
    assert!(matches!(err, VsockError::Listener(ListenerError::InUse(_))), "{err}");
    assert!(err.to_string().contains("socket path in use"), "{err}");
    assert!(uds.exists());
    let dir = h.into_dir();
    assert!(!uds.exists(), "socket file left behind");
    assert!(dir.path().exists(), "only the device went away");
}

#[test]
fn invalid_cids_and_missing_directories_are_refused() {
    let dir = TempDir::new("vsock");
    let interrupt = || Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    for cid in [0, 1, HOST_CID, u64::from(u32::MAX), 1 << 32] {
        let config = VsockConfig { guest_cid: cid, uds_path: dir.path().join("v.sock") };
        let err = Vsock::new(config, interrupt()).unwrap_err();
        assert!(matches!(err, VsockError::InvalidCid(c) if c == cid), "{err}");
    }
    let missing = dir.path().join("nope");
    let config = VsockConfig { guest_cid: 3, uds_path: missing.join("v.sock") };
    let err = Vsock::new(config, interrupt()).unwrap_err();
    assert!(err.to_string().contains(&*missing.to_string_lossy()), "{err}");
}

/// A vsock device with a connection has state a snapshot would lose, until the connection is
/// closed on both sides; restored from a snapshot taken then, on the same guest memory with a
/// socket of its own, it is activated again and serves the driver's saved queues: a guest
/// connection through it reaches its host service.
#[test]
fn a_device_is_saved_without_connections_and_restored_serving_its_queues() {
    let mut h = Harness::new();
    h.post_rx(16);
    let (peer, mut gs) = guest_connect(&mut h, 52, 1000);
    let busy = h.vsock.lock().unwrap().unsaved_state();
    assert!(busy.as_ref().is_some_and(|b| b.contains("1 connections")), "{busy:?}");
    drop(peer);
    assert_packet(&h.expect_packet(), op::SHUTDOWN, 1000, 52);
    gs.send(&mut h, op::RST, 0, &[]);
    expect_silence(&mut h);
    assert_eq!(h.vsock.lock().unwrap().unsaved_state(), None, "closed on both sides");
    let saved = h.transport.snapshot();

    let uds = h.dir.path().join("restored.sock");
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let config = VsockConfig { guest_cid: GUEST_CID, uds_path: uds.clone() };
    let restored = Arc::new(std::sync::Mutex::new(Vsock::new(config, interrupt).unwrap()));
    let mut transport = crate::devices::virtio::MmioTransport::new(h.mem.clone(), restored.clone());
    transport.restore(&saved).expect("the saved state fits");
    assert!(restored.lock().unwrap().is_activated());
    assert_eq!(read_reg(&mut transport, 0x70) & 0xf, 0xf, "the saved DRIVER_OK status");
    // The harness drives the restored device from now on, its driver's queues unchanged.
    h.vsock = restored.clone();
    h.transport = transport;
    h.uds = uds;
    h.em = event_manager::EventManager::new().unwrap();
    event_manager::SubscriberOps::add_subscriber(&mut h.em, restored);
    h.settle(10);
    let (mut peer, mut gs) = guest_connect(&mut h, 53, 1001);
    gs.send(&mut h, op::RW, 0, b"after the restore");
    h.run(10);
    let mut buf = [0u8; 17];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"after the restore");
}
