//! Initial vCPU registers for Linux's 64-bit boot protocol: long mode with paging on, an
//! identity mapping of the first 4 GiB (RAM below the MMIO gap and the gap itself, so code that
//! runs before setting up its own page tables can reach the boot timer and the devices), flat
//! segments, `rsi` pointing at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{gdt_entry, kvm_segment_from_gdt, CODE64_FLAGS, DATA_FLAGS, TSS_FLAGS};
use super::layout::*;
use crate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Why the boot register state could not be set.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("cannot write boot structures into guest memory")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// A KVM register ioctl failed.
    #[error("cannot set vCPU {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// General-purpose registers: entry point, boot stack, zero page in `rsi`.
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("registers"))
}

/// x87 control word and MXCSR as after reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm_err("FPU state"))
}

/// Write the GDT, an empty IDT and the identity page tables into guest memory.
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    // PML4[0] -> PDPT; PDPT[0..4] -> four page directories of 2 MiB pages, one per GiB.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    for gib in 0..BOOT_IDENTITY_MAP_GIB {
        let pd = PDE_START + gib * 4096;
        mem.write_obj(pd | 0x03, GuestAddress(PDPTE_START + gib * 8))?;
        for i in 0..512u64 {
            let page = (gib << 30) | (i << 21);
            mem.write_obj(page | 0x83, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(CODE64_FLAGS, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// Segment and control registers for long mode, using the structures of
/// [`write_boot_structures`].
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("special registers"))?;
    let gdt = boot_gdt();
    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_err("special registers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_structures_identity_map_the_first_4_gib() {
        let mem = crate::memory::create_guest_memory(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let last_pde: u64 = mem.read_obj(GuestAddress(PDE_START + 3 * 4096 + 511 * 8)).unwrap();
        assert_eq!(last_pde, (3 << 30) | (511 << 21) | 0x83, "the top of the 4 GiB is mapped");
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        assert_eq!(pdpte, (PDE_START + 3 * 4096) | 3);
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, gdt_entry(CODE64_FLAGS, 0, 0xfffff));
    }
}
