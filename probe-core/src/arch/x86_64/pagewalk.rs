//! Guest virtual to guest physical translation by walking the guest's x86_64 page tables from
//! a CR3 value, as the MMU does: 4-level paging, or 5-level when CR4.LA57 is set, with 1 GiB and
//! 2 MiB pages. `KVM_TRANSLATE` does the same per vCPU with an ioctl per address; this walker
//! runs over guest memory directly and is testable without KVM.
//!
//! The walk has a fixed depth, so a hostile table that points back at itself cannot make it
//! loop; an entry that points past guest memory is an error, not a crash.

use crate::guest_memory::GuestPhysMemory;
use crate::pagewalk::{Translation, WalkError};

/// The page tables a vCPU's registers select: CR3 and the paging mode CR4 picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressSpace {
    /// The page-table root.
    pub cr3: u64,
    /// 4- or 5-level paging.
    pub mode: PagingMode,
}

/// Which paging mode the guest uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingMode {
    /// 4-level, 48-bit virtual addresses.
    FourLevel,
    /// 5-level (CR4.LA57), 57-bit virtual addresses.
    FiveLevel,
}

impl PagingMode {
    /// The mode a CR4 value selects.
    pub fn from_cr4(cr4: u64) -> PagingMode {
        if cr4 & (1 << 12) != 0 {
            PagingMode::FiveLevel
        } else {
            PagingMode::FourLevel
        }
    }

    fn levels(self) -> u8 {
        match self {
            PagingMode::FourLevel => 4,
            PagingMode::FiveLevel => 5,
        }
    }
}

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PAGE_SIZE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
/// Physical-address bits of an entry (bits 12..51).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

fn is_canonical(va: u64, mode: PagingMode) -> bool {
    let bits = match mode {
        PagingMode::FourLevel => 48,
        PagingMode::FiveLevel => 57,
    };
    let shifted = (va as i64) << (64 - bits) >> (64 - bits);
    shifted as u64 == va
}

/// Translates `va` through the page tables rooted at `cr3`.
pub fn translate(
    mem: &dyn GuestPhysMemory,
    cr3: u64,
    mode: PagingMode,
    va: u64,
) -> Result<Translation, WalkError> {
    if !is_canonical(va, mode) {
        return Err(WalkError::NonCanonical(va));
    }
    let mut table = cr3 & ADDR_MASK;
    let mut writable = true;
    let mut user = true;
    let mut no_execute = false;
    for level in (1..=mode.levels()).rev() {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let index = (va >> shift) & 0x1ff;
        let entry_addr = table + index * 8;
        let entry = mem
            .read_phys_u64(entry_addr)
            .ok_or(WalkError::OutsideMemory(entry_addr))?;
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent { va, level });
        }
        writable &= entry & WRITABLE != 0;
        user &= entry & USER != 0;
        no_execute |= entry & NO_EXECUTE != 0;
        let large = entry & PAGE_SIZE != 0;
        if large && level > 3 {
            return Err(WalkError::ReservedBit { va, level });
        }
        if level == 1 || large {
            let page_size = 1u64 << shift;
            let base = entry & ADDR_MASK & !(page_size - 1);
            return Ok(Translation {
                gpa: base | (va & (page_size - 1)),
                page_size,
                writable,
                user,
                no_execute,
                guarded: false,
            });
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("the loop returns at level 1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagewalk::testing::FakeMem;

    const KTEXT: u64 = 0xffff_ffff_8100_0000;

    fn idx(va: u64, level: u32) -> u64 {
        (va >> (12 + 9 * (level - 1))) & 0x1ff
    }

    #[test]
    fn four_level_4k_2m_and_1g_pages() {
        let mut m = FakeMem::new(64 << 20);
        let (pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000);
        m.set(pml4, idx(KTEXT, 4), pdpt | 0x3);
        m.set(pdpt, idx(KTEXT, 3), pd | 0x3);
        // 2 MiB page for the first 2 MiB of kernel text, read-only.
        m.set(pd, idx(KTEXT, 2), 0x0100_0000 | PAGE_SIZE | PRESENT);
        // A 4 KiB mapping in the next 2 MiB.
        let va4k = KTEXT + (2 << 20) + 0x5123;
        m.set(pd, idx(va4k, 2), pt | 0x3);
        m.set(pt, idx(va4k, 1), 0x0030_0000 | 0x3 | NO_EXECUTE);
        // A 1 GiB page elsewhere.
        let va1g = 0xffff_8880_0000_0000u64 + 0x1234_5678;
        m.set(pml4, idx(va1g, 4), 0x5000 | 0x3);
        m.set(0x5000, idx(va1g, 3), 0x4000_0000 | PAGE_SIZE | 0x3);

        let t = translate(&m, pml4, PagingMode::FourLevel, KTEXT + 0x1234).unwrap();
        assert_eq!(t.gpa, 0x0100_1234);
        assert_eq!(t.page_size, 2 << 20);
        assert!(!t.writable && !t.no_execute);

        let t = translate(&m, pml4, PagingMode::FourLevel, va4k).unwrap();
        assert_eq!(t.gpa, 0x0030_0123);
        assert_eq!(t.page_size, 4096);
        assert!(t.writable && t.no_execute && !t.user);

        let t = translate(&m, pml4, PagingMode::FourLevel, va1g).unwrap();
        assert_eq!(t.gpa, 0x4000_0000 + 0x1234_5678);
        assert_eq!(t.page_size, 1 << 30);
    }

    #[test]
    fn five_level_uses_one_more_table() {
        let mut m = FakeMem::new(1 << 20);
        let va = 0xff00_0000_0000_1000u64; // canonical for 57 bits only
        assert!(matches!(
            translate(&m, 0x1000, PagingMode::FourLevel, va),
            Err(WalkError::NonCanonical(_))
        ));
        m.set(0x1000, idx(va, 5), 0x2000 | 1);
        m.set(0x2000, idx(va, 4), 0x3000 | 1);
        m.set(0x3000, idx(va, 3), 0x4000 | 1);
        m.set(0x4000, idx(va, 2), 0x5000 | 1);
        m.set(0x5000, idx(va, 1), 0x9000 | 1);
        let t = translate(&m, 0x1000, PagingMode::from_cr4(1 << 12), va).unwrap();
        assert_eq!(t.gpa, 0x9000);
    }

    #[test]
    fn hostile_tables_fail_cleanly() {
        // Every entry of the top table points at the table itself: the walk ends after four
        // levels, at a "page" that is the table.
        let mut m = FakeMem::new(1 << 20);
        for level in 1..=4 {
            m.set(0x1000, idx(KTEXT, level), 0x1000 | 1);
        }
        let t = translate(&m, 0x1000, PagingMode::FourLevel, KTEXT).unwrap();
        assert_eq!(t.gpa, 0x1000);

        // A table past the end of memory.
        m.set(0x1000, idx(KTEXT, 4), 0x7fff_f000 | 1);
        assert_eq!(
            translate(&m, 0x1000, PagingMode::FourLevel, KTEXT),
            Err(WalkError::OutsideMemory(0x7fff_f000 + idx(KTEXT, 3) * 8))
        );
        // CR3 itself past memory.
        assert!(matches!(
            translate(&m, 0x10_0000_0000, PagingMode::FourLevel, KTEXT),
            Err(WalkError::OutsideMemory(_))
        ));
        // Not present.
        let empty = FakeMem::new(1 << 20);
        assert_eq!(
            translate(&empty, 0x1000, PagingMode::FourLevel, KTEXT),
            Err(WalkError::NotPresent {
                va: KTEXT,
                level: 4
            })
        );
        // Page-size bit in a PML4 entry is reserved.
        let mut m = FakeMem::new(1 << 20);
        m.set(0x1000, idx(KTEXT, 4), 0x2000 | PAGE_SIZE | 1);
        assert_eq!(
            translate(&m, 0x1000, PagingMode::FourLevel, KTEXT),
            Err(WalkError::ReservedBit {
                va: KTEXT,
                level: 4
            })
        );
    }
}
