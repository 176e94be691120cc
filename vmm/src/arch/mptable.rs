//! The Intel MultiProcessor table (MP spec 1.4) in the EBDA: how a guest without ACPI learns
//! its CPUs, its IOAPIC and how ISA interrupts reach it. Linux finds the floating pointer by
//! scanning the last KiB of base memory.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_END, EBDA_START, IOAPIC_START};
use crate::memory::GuestMemoryMmap;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6, as a plausible signature.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 1 | (1 << 9);
/// Interrupt types of entries 3 and 4.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Pins of the IOAPIC.
const IOAPIC_PINS: u8 = 24;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More CPUs than fit in the EBDA.
    #[error("an MP table for {0} CPUs does not fit in the EBDA")]
    TooManyCpus(u8),
    /// Guest memory does not cover the EBDA.
    #[error("cannot write the MP table")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Two's complement of the byte sum, so that the structure sums to 0.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

fn processor_entry(apic_id: u8) -> Vec<u8> {
    let flags = CPU_ENABLED | if apic_id == 0 { CPU_BOOTSTRAP } else { 0 };
    let mut e = vec![0, apic_id, APIC_VERSION, flags];
    e.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
    e.extend_from_slice(&CPU_FEATURES.to_le_bytes());
    e.extend_from_slice(&[0; 8]);
    e
}

fn bus_entry() -> Vec<u8> {
    let mut e = vec![1, 0];
    e.extend_from_slice(b"ISA   ");
    e
}

fn ioapic_entry(id: u8) -> Vec<u8> {
    let mut e = vec![2, id, IOAPIC_VERSION, 1];
    e.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    e
}

/// ISA interrupt `irq` to IOAPIC pin `irq`.
fn interrupt_entry(ioapic_id: u8, irq: u8) -> Vec<u8> {
    vec![3, MP_INT, 0, 0, 0, irq, ioapic_id, irq]
}

/// A local interrupt source: `kind` on LAPIC pin `lint` of `dest_apic` (0xff: all).
fn local_interrupt_entry(kind: u8, dest_apic: u8, lint: u8) -> Vec<u8> {
    vec![4, kind, 0, 0, 0, 0, dest_apic, lint]
}

/// The configuration table (header and entries) for `cpus` CPUs, to be placed at `addr`.
fn config_table(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus + 1;
    let mut entries: Vec<Vec<u8>> = (0..cpus).map(processor_entry).collect();
    entries.push(bus_entry());
    entries.push(ioapic_entry(ioapic_id));
    entries.extend((0..IOAPIC_PINS).map(|irq| interrupt_entry(ioapic_id, irq)));
    entries.push(local_interrupt_entry(MP_EXTINT, 0, 0));
    entries.push(local_interrupt_entry(MP_NMI, 0xff, 1));

    let body: Vec<u8> = entries.concat();
    let length = (44 + body.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum
    table.extend_from_slice(b"HUSK    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]);
    table.extend_from_slice(&body);
    table[7] = checksum(&table);
    table
}

/// The 16-byte floating pointer structure pointing at the configuration table at `table_addr`.
fn floating_pointer(table_addr: u32) -> Vec<u8> {
    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, rev 1.4
    mpf[10] = checksum(&mpf);
    mpf
}

/// Write the floating pointer and the configuration table for `cpus` CPUs into the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), MptableError> {
    let table_addr = EBDA_START + 16;
    let table = config_table(cpus);
    if cpus == 0 || table_addr + table.len() as u64 > EBDA_END {
        return Err(MptableError::TooManyCpus(cpus));
    }
    mem.write_slice(&floating_pointer(table_addr as u32), GuestAddress(EBDA_START))?;
    mem.write_slice(&table, GuestAddress(table_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::MAX_VCPUS;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn structures_checksum_to_zero_and_are_linked() {
        let mem = crate::memory::create_guest_memory(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 2).unwrap();
        let mut mpf = [0u8; 16];
        mem.read_slice(&mut mpf, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&mpf[..4], b"_MP_");
        assert_eq!(sum(&mpf), 0);
        let table_addr = u32::from_le_bytes(mpf[4..8].try_into().unwrap());
        let mut header = [0u8; 44];
        mem.read_slice(&mut header, GuestAddress(u64::from(table_addr))).unwrap();
        assert_eq!(&header[..4], b"PCMP");
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(u64::from(table_addr))).unwrap();
        assert_eq!(sum(&table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        // The first processor entry is the bootstrap processor.
        assert_eq!((table[44], table[45], table[47]), (0, 0, CPU_ENABLED | CPU_BOOTSTRAP));
        assert_eq!((table[64], table[65], table[67]), (0, 1, CPU_ENABLED));
    }

    #[test]
    fn max_vcpus_fit_and_more_do_not() {
        let mem = crate::memory::create_guest_memory(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, MAX_VCPUS).unwrap();
        assert!(matches!(setup_mptable(&mem, 0), Err(MptableError::TooManyCpus(0))));
        assert!(matches!(setup_mptable(&mem, 64), Err(MptableError::TooManyCpus(64))));
    }
}
