//! Test support shared by husk's crates: tiny x86-64 test guests packaged as ELF "kernels"
//! that go through the VMM's real boot path; Linux guests for the end-to-end suites in the
//! nested KVM test host; a private Docker daemon, and a pty to drive its client, for the Docker
//! suite.

pub mod agent_vm;
pub mod cpio;
pub mod docker;
pub mod guest;
pub mod oci;
pub mod procfs;
pub mod pty;
pub mod rootfs;
pub mod runtime;
pub mod tiny_guest;
