//! x86-64 specifics of the micro-VM: the guest physical memory map, and the vCPU state Linux's
//! 64-bit boot protocol expects (GDT, identity page tables, registers, CPUID, MSRs, LAPIC) plus
//! the MP table that tells the guest about its CPUs and interrupt routing.

pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
