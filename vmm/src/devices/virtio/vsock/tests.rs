//! End-to-end tests of the vsock device: the test plays the guest driver in guest memory, host
//! clients and services are real Unix sockets in other threads, and everything runs through the
//! real `EventManager` loop and the virtio-mmio transport.

use super::packet::op;
use super::test_support::*;

#[test]
fn guest_connect_to_absent_service_is_reset() {
    let mut h = Harness::new();
    h.post_rx(8);
    h.send(&guest_hdr(1000, 52, op::REQUEST), &[]);
    let pkt = h.expect_packet();
    assert_rst(&pkt, 1000, 52);
}
