//! Guest virtual to guest physical translation by walking the guest's aarch64 stage-1 tables
//! (EL1&0 regime) as the MMU does: TTBR1_EL1 for the upper half, TTBR0_EL1 for the lower,
//! 4 KiB granule with 48-bit addresses (four levels, 1 GiB and 2 MiB blocks), the layout of
//! Debian's arm64 kernels. Any other TCR_EL1 layout (16/64 KiB granules, LPA2 or 52-bit) is
//! refused by name rather than walked wrongly.

use crate::guest_memory::GuestPhysMemory;
use crate::pagewalk::{Translation, WalkError};

/// The page tables a vCPU's system registers select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressSpace {
    /// TTBR0_EL1.
    pub ttbr0: u64,
    /// TTBR1_EL1.
    pub ttbr1: u64,
    /// TCR_EL1.
    pub tcr: u64,
}

const VALID: u64 = 1;
const TABLE: u64 = 1 << 1;
/// AP[1]: EL0 may access.
const AP_EL0: u64 = 1 << 6;
/// AP[2]: read-only.
const AP_RO: u64 = 1 << 7;
const PXN: u64 = 1 << 53;
/// GP: a guarded page (BTI).
const GP: u64 = 1 << 50;
const PXN_TABLE: u64 = 1 << 59;
const AP_TABLE_NO_EL0: u64 = 1 << 61;
const AP_TABLE_RO: u64 = 1 << 62;
/// Output address bits 47:12.
const ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;

/// Checks that `tcr` selects the layout this walker implements for the half `upper` selects.
fn check_layout(tcr: u64, upper: bool) -> Result<(), WalkError> {
    let (tsz, tg, expected_tg, epd) = if upper {
        ((tcr >> 16) & 0x3f, (tcr >> 30) & 3, 2, tcr & (1 << 23) != 0)
    } else {
        (tcr & 0x3f, (tcr >> 14) & 3, 0, tcr & (1 << 7) != 0)
    };
    let lpa2 = tcr & (1 << 59) != 0;
    if tsz != 16 || tg != expected_tg || lpa2 {
        return Err(WalkError::UnsupportedLayout(format!(
            "TCR_EL1 {tcr:#x}: only the 4 KiB granule with 48-bit addresses is walked (T{n}SZ {tsz}, TG{n} {tg}{})",
            if lpa2 { ", LPA2" } else { "" },
            n = u8::from(upper),
        )));
    }
    if epd {
        return Err(WalkError::UnsupportedLayout(format!(
            "TCR_EL1 {tcr:#x}: walks through TTBR{} are disabled",
            u8::from(upper)
        )));
    }
    Ok(())
}

/// Translates `va` through the tables of `space`.
pub fn translate(
    mem: &dyn GuestPhysMemory,
    space: AddressSpace,
    va: u64,
) -> Result<Translation, WalkError> {
    let upper = match va >> 48 {
        0xffff => true,
        0 => false,
        _ => return Err(WalkError::NonCanonical(va)),
    };
    check_layout(space.tcr, upper)?;
    let mut table = if upper { space.ttbr1 } else { space.ttbr0 } & ADDR_MASK;
    let (mut writable, mut user, mut no_execute) = (true, true, false);
    for level in 0u8..=3 {
        let shift = 39 - 9 * u32::from(level);
        let entry_addr = table + ((va >> shift) & 0x1ff) * 8;
        let entry = mem
            .read_phys_u64(entry_addr)
            .ok_or(WalkError::OutsideMemory(entry_addr))?;
        if entry & VALID == 0 {
            return Err(WalkError::NotPresent { va, level });
        }
        let is_table = entry & TABLE != 0;
        if level < 3 && is_table {
            writable &= entry & AP_TABLE_RO == 0;
            user &= entry & AP_TABLE_NO_EL0 == 0;
            no_execute |= entry & PXN_TABLE != 0;
            table = entry & ADDR_MASK;
            continue;
        }
        // A block at level 0, or a "block" encoding at level 3, is reserved with this layout.
        if level == 0 || (level == 3 && !is_table) {
            return Err(WalkError::ReservedBit { va, level });
        }
        let page_size = 1u64 << shift;
        let base = entry & ADDR_MASK & !(page_size - 1);
        return Ok(Translation {
            gpa: base | (va & (page_size - 1)),
            page_size,
            writable: writable && entry & AP_RO == 0,
            user: user && entry & AP_EL0 != 0,
            no_execute: no_execute || entry & PXN != 0,
            guarded: entry & GP != 0,
        });
    }
    unreachable!("the loop returns at level 3")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagewalk::testing::FakeMem;

    /// TCR_EL1 as Linux sets it for 4 KiB pages and 48-bit VAs (T0SZ = T1SZ = 16, TG1 = 4K).
    pub(crate) const TCR: u64 = 16 | (16 << 16) | (2 << 30);
    const KTEXT: u64 = 0xffff_8000_0801_0000;

    fn idx(va: u64, level: u32) -> u64 {
        (va >> (39 - 9 * level)) & 0x1ff
    }

    fn space(ttbr1: u64) -> AddressSpace {
        AddressSpace {
            ttbr0: 0x9000,
            ttbr1,
            tcr: TCR,
        }
    }

    #[test]
    fn pages_and_blocks_through_ttbr1_with_permissions() {
        let mut m = FakeMem::new(64 << 20);
        let (l0, l1, l2, l3) = (0x1000, 0x2000, 0x3000, 0x4000);
        m.set(l0, idx(KTEXT, 0), l1 | 3);
        m.set(l1, idx(KTEXT, 1), l2 | 3);
        // A 2 MiB read-only block for the kernel text.
        m.set(l2, idx(KTEXT, 2), 0x0120_0000 | AP_RO | 1);
        // A 4 KiB writable, never-executable page in the next 2 MiB.
        let data = KTEXT + (2 << 20) + 0x5123;
        m.set(l2, idx(data, 2), l3 | 3);
        m.set(l3, idx(data, 3), 0x0030_0000 | PXN | 3);
        // A guarded (BTI) page next to it.
        let guarded = data + 0x1000;
        m.set(l3, idx(guarded, 3), 0x0031_0000 | GP | 3);

        let t = translate(&m, space(l0 | (5 << 48)), KTEXT + 0x1234).unwrap();
        assert_eq!(t.gpa, 0x0120_0000 + (KTEXT & 0x1f_ffff) + 0x1234);
        assert_eq!(t.page_size, 2 << 20);
        assert!(!t.writable && !t.no_execute && !t.user);

        let t = translate(&m, space(l0), data).unwrap();
        assert_eq!((t.gpa, t.page_size), (0x0030_0123, 4096));
        assert!(t.writable && t.no_execute && !t.guarded);
        assert!(translate(&m, space(l0), guarded).unwrap().guarded);

        // A table descriptor's APTable read-only bit takes writes away below it.
        m.set(l1, idx(KTEXT, 1), l2 | 3 | AP_TABLE_RO);
        assert!(!translate(&m, space(l0), data).unwrap().writable);
    }

    #[test]
    fn a_root_the_vcpu_did_not_read_gets_no_walk_through() {
        // Tables at the low addresses a zeroed root would select: never reached.
        let mut m = FakeMem::new(64 << 20);
        m.set(0, idx(KTEXT, 0), 0x2000 | 3);
        m.set(0x2000, idx(KTEXT, 1), 0x0120_0000 | 1);
        let unread = AddressSpace {
            ttbr0: crate::arch::aarch64::UNREAD_TABLE,
            ttbr1: crate::arch::aarch64::UNREAD_TABLE,
            tcr: TCR,
        };
        assert!(translate(&m, unread, KTEXT).is_err());
        assert!(translate(&m, unread, 0x40_0000).is_err());
        assert!(translate(&m, space(0), KTEXT).is_ok());
    }

    #[test]
    fn bad_addresses_layouts_and_tables_fail_cleanly() {
        let mut m = FakeMem::new(1 << 20);
        assert_eq!(
            translate(&m, space(0x1000), 0x00ff_0000_0000_0000),
            Err(WalkError::NonCanonical(0x00ff_0000_0000_0000))
        );
        assert_eq!(
            translate(&m, space(0x1000), KTEXT),
            Err(WalkError::NotPresent {
                va: KTEXT,
                level: 0
            })
        );
        // 64 KiB granule, 52-bit: refused by name.
        let other = AddressSpace {
            tcr: 12 | (12 << 16) | (3 << 30),
            ..space(0x1000)
        };
        let err = translate(&m, other, KTEXT).unwrap_err();
        assert!(
            err.to_string().contains("4 KiB granule with 48-bit"),
            "{err}"
        );
        // A block descriptor at level 0 is reserved.
        m.set(0x1000, idx(KTEXT, 0), 0x4000_0000 | 1);
        assert_eq!(
            translate(&m, space(0x1000), KTEXT),
            Err(WalkError::ReservedBit {
                va: KTEXT,
                level: 0
            })
        );
        // A table past the end of memory; a table pointing at itself ends after four levels.
        m.set(0x1000, idx(KTEXT, 0), 0x7fff_f000 | 3);
        assert!(matches!(
            translate(&m, space(0x1000), KTEXT),
            Err(WalkError::OutsideMemory(_))
        ));
        for level in 0..=3 {
            m.set(0x1000, idx(KTEXT, level), 0x1000 | 3);
        }
        assert_eq!(
            translate(&m, space(0x1000), KTEXT).unwrap().gpa,
            0x1000 | (KTEXT & 0xfff)
        );
    }
}
