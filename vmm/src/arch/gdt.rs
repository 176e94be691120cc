//! The boot GDT: descriptor encoding, and the matching KVM segment registers.

use kvm_bindings::kvm_segment;

/// Flat 64-bit code segment (present, ring 0, execute/read, L bit).
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Flat data segment (present, ring 0, read/write, 4 KiB granularity, 32-bit).
pub const DATA_FLAGS: u16 = 0xc093;
/// 64-bit TSS (present, busy).
pub const TSS_FLAGS: u16 = 0x808b;

/// Encode a segment descriptor from its access/flags bits, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32) | ((entry & 0x0000_00ff_ffff_0000) >> 16)
}

/// The limit in bytes, scaled by the granularity bit as the CPU does.
fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    if entry & (1 << 55) != 0 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The segment register KVM should load for descriptor `entry` at GDT index `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let type_ = ((entry >> 40) & 0xf) as u8;
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        // An unusable segment is one whose descriptor is not present.
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_round_trips() {
        let seg = kvm_segment_from_gdt(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 1);
        assert_eq!(seg.selector, 8);
        assert_eq!((seg.l, seg.db, seg.g, seg.present, seg.s, seg.type_), (1, 0, 1, 1, 1, 0xb));
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn base_and_limit_decode() {
        let entry = gdt_entry(0x008b, 0x1234_5678, 0x67);
        assert_eq!(base(entry), 0x1234_5678);
        assert_eq!(limit(entry), 0x67);
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
        assert_eq!(limit(gdt_entry(TSS_FLAGS, 0, 0x67)), 0x67fff, "4 KiB granularity");
    }
}
