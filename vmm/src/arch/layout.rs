//! The guest physical memory map: where the VMM puts boot structures, the kernel, the MMIO
//! devices, and which ranges are RAM.
//!
//! ```text
//! 0x0000_0500  GDT                  0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack           0x0000_9000  identity page tables (PML4, PDPT, 4 PDs)
//! 0x0002_0000  kernel command line  0x0009_fc00  EBDA: MP table
//! 0x0010_0000  RAM for the kernel and initramfs ... up to 0xd000_0000
//! 0xd000_0000  MMIO gap: boot timer, then one 4 KiB window per virtio device
//! 0xfec0_0000  IOAPIC               0xfee0_0000  LAPIC
//! 0x1_0000_0000  RAM above 4 GiB (when the guest has more than 3.25 GiB)
//! ```

use vm_memory::GuestAddress;

/// Global descriptor table.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty; Linux sets up its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux's zero page (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// First of the page directories of the boot identity mapping (2 MiB pages), one per GiB.
pub const PDE_START: u64 = 0xb000;
/// GiB covered by the boot identity mapping: all of the 32-bit space, MMIO gap included.
pub const BOOT_IDENTITY_MAP_GIB: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line x86 Linux accepts (COMMAND_LINE_SIZE), terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// End of the EBDA (start of the legacy video hole).
pub const EBDA_END: u64 = 0xa0000;
/// Where the kernel and everything Linux may use as RAM begins.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// The boot timer's MMIO window.
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// Size of the boot timer's window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = BOOT_TIMER_START + BOOT_TIMER_SIZE;
/// IOAPIC base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC base.
pub const APIC_START: u64 = 0xfee0_0000;
/// The three pages KVM needs for the real-mode TSS (Intel), inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// The page KVM needs for the real-mode identity map (Intel), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// COM1's interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// First interrupt line for virtio devices.
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last interrupt line for virtio devices (the IOAPIC has 24 pins).
pub const LAST_VIRTIO_IRQ: u32 = 23;
/// Most vCPUs the MP table in the EBDA has room for.
pub const MAX_VCPUS: u8 = 32;

// The fixed boot structures must not overlap each other; checked when compiling.
const _: () = assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(PDE_START + BOOT_IDENTITY_MAP_GIB * 4096 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(KVM_IDENTITY_MAP_ADDRESS + 4096 <= KVM_TSS_ADDRESS);
const _: () = assert!(
    VIRTIO_MMIO_START + 0x1000 * (LAST_VIRTIO_IRQ - FIRST_VIRTIO_IRQ + 1) as u64 <= IOAPIC_START
);

/// The RAM regions of a guest with `size` bytes of memory: everything from 0 up to the MMIO gap,
/// and the rest above 4 GiB.
pub fn memory_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let below_gap = size.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), below_gap as usize)];
    if size > MMIO_GAP_START {
        regions.push((GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize));
    }
    regions
}

/// The e820 map Linux is given for a guest with `size` bytes: (start, length) of each RAM range.
/// The EBDA..1 MiB hole is left out (it holds the MP table and is not RAM to the guest).
pub fn e820_ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let mut ranges = vec![(0, EBDA_START)];
    let below_gap_end = size.min(MMIO_GAP_START);
    if below_gap_end > HIMEM_START {
        ranges.push((HIMEM_START, below_gap_end - HIMEM_START));
    }
    if size > MMIO_GAP_START {
        ranges.push((MMIO_GAP_END, size - MMIO_GAP_START));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(memory_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(
            e820_ram_ranges(256 << 20),
            vec![(0, EBDA_START), (HIMEM_START, (256 << 20) - HIMEM_START)]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let size = 4u64 << 30;
        let regions = memory_regions(size);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(regions[1], (GuestAddress(1 << 32), (size - MMIO_GAP_START) as usize));
        let ram: u64 = e820_ram_ranges(size).iter().map(|r| r.1).sum();
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
    }
}
