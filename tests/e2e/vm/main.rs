//! End to end: `husk vm run` boots the guest kernel with the test initramfs on real KVM (the
//! nested test host) and the guest uses every device: boot and sizing, block, vsock, net.

mod block;
mod boot;
mod net;
mod vsock;
