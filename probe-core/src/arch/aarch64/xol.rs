//! The aarch64 XOL layout: the area is mapped through top-level entry 511 of the kernel's TTBR1
//! table (`swapper_pg_dir`), inside the 2 TiB guard region above vmemmap that the 4 KiB /
//! 48-bit layout leaves unused (Documentation/arch/arm64/memory.rst:
//! `fffffe0000000000-ffffffffffffffff [guard region]`). Every address space shares TTBR1, so
//! one entry maps it everywhere; the entry is checked absent-or-ours at every use. The area's
//! own level-1, level-2 and level-3 tables follow; its code pages are mapped read-only, EL1
//! only (AP = 0b10), executable at EL1 (PXN clear), never at EL0 (UXN set), inner-shareable
//! normal memory (AttrIndx 0, Linux's MT_NORMAL), with the access flag set.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::pagewalk::AddressSpace;
use crate::arch::XolLayout;
use crate::xol::{XolArea, XolError};

/// Guest virtual base of the code pages: top-level entry 511 of the TTBR1 table.
pub const XOL_VA_BASE: u64 = 0xffff_ff80_0000_0000;
/// The TTBR1 top-level entry that maps the area.
pub const XOL_L0_INDEX: u64 = 511;

/// The aarch64 layout: level-1, level-2 and level-3 tables, then up to 512 code pages; 16-byte
/// slots (the copy and a BRK, aligned).
pub const LAYOUT: XolLayout = XolLayout {
    va_base: XOL_VA_BASE,
    table_pages: 3,
    max_code_pages: 512,
    slot_size: 16,
};

const PAGE: u64 = 4096;
/// A valid table descriptor (levels 0-2) or page descriptor (level 3).
const TABLE_OR_PAGE: u64 = 0b11;
/// AP[2:1] = 0b10: read-only at EL1, no EL0 access.
const AP_RO_EL1: u64 = 0b10 << 6;
/// SH = 0b11: inner shareable.
const SH_INNER: u64 = 0b11 << 8;
/// The access flag.
const AF: u64 = 1 << 10;
/// UXN: never executable at EL0.
const UXN: u64 = 1 << 54;
/// Output address bits 47:12.
const ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;

fn write<M: GuestMemory>(mem: &M, gpa: u64, value: u64) -> Result<(), XolError> {
    mem.write_obj(value, GuestAddress(gpa))
        .map_err(|_| XolError::Memory(gpa))
}

/// The top-level entry that maps `area`.
pub fn l0_entry(area: &XolArea) -> u64 {
    area.gpa_base() | TABLE_OR_PAGE
}

/// Writes the area's own tables: level 1 and level 2 entry 0 point on, level 3 maps the code
/// pages.
pub fn write_tables<M: GuestMemory>(area: &XolArea, mem: &M) -> Result<(), XolError> {
    let (l1, l2, l3) = (
        area.gpa_base(),
        area.gpa_base() + PAGE,
        area.gpa_base() + 2 * PAGE,
    );
    mem.write_slice(&vec![0u8; area.table_bytes() as usize], GuestAddress(l1))
        .map_err(|_| XolError::Memory(l1))?;
    let index = |level: u32| (XOL_VA_BASE >> (39 - 9 * level)) & 0x1ff;
    write(mem, l1 + index(1) * 8, l2 | TABLE_OR_PAGE)?;
    write(mem, l2 + index(2) * 8, l3 | TABLE_OR_PAGE)?;
    for page in 0..area.code_pages() {
        let pte = (area.code_gpa() + page * PAGE) | TABLE_OR_PAGE | AP_RO_EL1 | SH_INNER | AF | UXN;
        write(mem, l3 + (index(3) + page) * 8, pte)?;
    }
    Ok(())
}

/// Makes sure the kernel's TTBR1 table maps the area: entry 511 absent (then written) or
/// already ours. Returns whether it wrote. Layouts other than 4 KiB / 48-bit are refused (the
/// walker refuses them too).
pub fn ensure_mapped<M: GuestMemory>(
    area: &XolArea,
    mem: &M,
    space: AddressSpace,
) -> Result<bool, XolError> {
    let tcr = space.tcr;
    if (tcr >> 16) & 0x3f != 16 || (tcr >> 30) & 3 != 2 || tcr & (1 << 59) != 0 {
        return Err(XolError::Unsupported(
            "the guest's TTBR1 layout is not 4 KiB pages with 48-bit addresses",
        ));
    }
    let table = space.ttbr1 & ADDR_MASK;
    let at = table + XOL_L0_INDEX * 8;
    let entry: u64 = mem
        .read_obj(GuestAddress(at))
        .map_err(|_| XolError::Memory(at))?;
    let want = l0_entry(area);
    if entry == want {
        return Ok(false);
    }
    if entry & 1 != 0 {
        return Err(XolError::HoleInUse {
            table,
            index: XOL_L0_INDEX,
            entry,
        });
    }
    write(mem, at, want)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::arch::aarch64::{Aarch64, pagewalk::translate};

    #[test]
    fn one_ttbr1_entry_maps_read_only_el1_executable_slots() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x4000_0000), 0x10_0000),
        ])
        .unwrap();
        let mut xol = XolArea::new(<Aarch64 as crate::arch::Arch>::XOL, 0x4000_0000, 2).unwrap();
        write_tables(&xol, &mem).unwrap();
        let space = AddressSpace {
            ttbr0: 0x2000,
            ttbr1: 0x1000,
            tcr: 16 | (16 << 16) | (2 << 30),
        };
        let slot = xol.allocate().unwrap();
        assert!(translate(&mem, space, slot.va).is_err());
        assert!(ensure_mapped(&xol, &mem, space).unwrap());
        assert!(!ensure_mapped(&xol, &mem, space).unwrap());
        let t = translate(&mem, space, slot.va).unwrap();
        assert_eq!(t.gpa, slot.gpa);
        assert!(!t.writable && !t.user && !t.no_execute);
        let last = XOL_VA_BASE + 2 * PAGE - 16;
        assert_eq!(
            translate(&mem, space, last).unwrap().gpa,
            xol.code_gpa() + 2 * PAGE - 16
        );
        // Taken by something else: refused, nothing written.
        mem.write_obj(0x7000u64 | 3, GuestAddress(0x1000 + 511 * 8))
            .unwrap();
        assert!(matches!(
            ensure_mapped(&xol, &mem, space),
            Err(XolError::HoleInUse { index: 511, .. })
        ));
        // Another layout: refused by name.
        let other = AddressSpace {
            tcr: 25 | (25 << 16) | (2 << 30),
            ..space
        };
        assert!(matches!(
            ensure_mapped(&xol, &mem, other),
            Err(XolError::Unsupported(_))
        ));
    }
}
