//! The CPUID a vCPU reports: what KVM supports, with the topology fields set for this vCPU
//! (APIC id, CPU count), the hypervisor bit on, and the TSC-deadline timer announced when the
//! in-kernel LAPIC has it (a guest then arms its timer with one MSR write instead of LAPIC MMIO,
//! far fewer and cheaper exits).

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_SIZE: u32 = 8;

/// Level types of leaf 0xb / 0x1f.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `count` logical CPUs.
fn id_bits(count: u8) -> u32 {
    (u32::from(count.max(1)) - 1).checked_ilog2().map_or(0, |b| b + 1)
}

/// Patch `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `id` of `count`, all cores of one
/// socket with one thread each; `tsc_deadline`: KVM's LAPIC emulates the TSC-deadline timer.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, count: u8, tsc_deadline: bool) {
    let apic_id = u32::from(id);
    let count32 = u32::from(count);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (apic_id << 24) | (count32 << 16) | (CLFLUSH_SIZE << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                } else {
                    entry.ecx &= !ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package - 1 in 31:26; threads sharing this cache - 1 in 25:14
                // (caches up to level 2 are per core, level 3 is shared by all).
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count32 - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                let (shift, logical, level_type) = match entry.index {
                    0 => (0, 1, LEVEL_SMT),
                    1 => (id_bits(count), count32, LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = logical;
                entry.ecx = (level_type << 8) | (entry.index & 0xff);
                entry.edx = apic_id;
            }
            LEAF_AMD_SIZES => {
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | (count32 - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx &= !0x7ff;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    #[test]
    fn sets_apic_id_count_and_hypervisor_bit() {
        let mut cpuid = CpuId::from_entries(&[leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1)]).unwrap();
        filter_cpuid(&mut cpuid, 3, 4, true);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].ebx, e[1].edx), (1, 3));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 4, LEVEL_CORE));
    }

    #[test]
    fn tsc_deadline_follows_the_lapic() {
        let mut cpuid = CpuId::from_entries(&[leaf(1, 0)]).unwrap();
        cpuid.as_mut_slice()[0].ecx = ECX_TSC_DEADLINE;
        filter_cpuid(&mut cpuid, 0, 1, false);
        assert_eq!(cpuid.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn id_bits_counts_bits() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }
}
