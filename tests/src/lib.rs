//! Test support shared by husk's crates: tiny x86-64 test guests packaged as ELF "kernels"
//! that go through the VMM's real boot path.

pub mod tiny_guest;
