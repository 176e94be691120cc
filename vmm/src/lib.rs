//! husk's virtual machine monitor: a KVM micro-VM with guest memory from vm-memory, vCPUs set up
//! for Linux's 64-bit boot protocol, legacy PC devices (serial, i8042, boot timer) and
//! virtio-mmio block, net and vsock devices served from an event-manager loop.

pub mod arch;
pub mod boot;
pub mod config;
pub mod devices;
pub mod error_chain;
pub mod kvm_vm;
pub mod memory;
pub mod micro_vm;
pub mod snapshot;
pub mod vcpu;
pub mod zero_pages;
