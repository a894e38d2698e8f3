//! The aarch64 XOL layout: the area is mapped through top-level entry 511 of the kernel's TTBR1
//! table (`swapper_pg_dir`), inside the 2 TiB guard region above vmemmap that the 4 KiB /
//! 48-bit layout leaves unused (Documentation/arch/arm64/memory.rst:
//! `fffffe0000000000-ffffffffffffffff [guard region]`). Every address space shares TTBR1, so
//! one entry maps it everywhere; the entry is checked absent-or-ours at every use. The area's
//! own level-1, level-2 and level-3 tables follow; its code pages are mapped read-only, EL1
//! only (AP = 0b10), executable at EL1 (PXN clear), never at EL0 (UXN set), inner-shareable
//! normal memory (AttrIndx 0, Linux's MT_NORMAL), with the access flag set. Data pages after
//! them (the jump plan's rings) are read-write at EL1 and never executable.
//!
//! The XOL area is far beyond `b`'s 128 MiB reach of the kernel text, so the jump plan's
//! trampolines run from a second mapping of the code pages ([`map_jump_code`]) inside the
//! kernel image's freed init range, through two spare level-3 tables of the area's own.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::pagewalk::AddressSpace;
use crate::arch::XolLayout;
use crate::xol::{XolArea, XolError};

/// Guest virtual base of the code pages: top-level entry 511 of the TTBR1 table.
pub const XOL_VA_BASE: u64 = 0xffff_ff80_0000_0000;
/// The TTBR1 top-level entry that maps the area.
pub const XOL_L0_INDEX: u64 = 511;

/// The aarch64 layout: level-1, level-2 and level-3 tables and two spare level-3 tables for the
/// jump plan's code alias, then up to 512 code (and data) pages; 16-byte slots (the copy and a
/// BRK, aligned).
pub const LAYOUT: XolLayout = XolLayout {
    va_base: XOL_VA_BASE,
    table_pages: 5,
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
/// PXN: never executable at EL1.
const PXN: u64 = 1 << 53;
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
        write(mem, l3 + (index(3) + page) * 8, code_pte(area, page))?;
    }
    for page in 0..area.data_pages() {
        let pte = (area.data_gpa() + page * PAGE) | TABLE_OR_PAGE | SH_INNER | AF | PXN | UXN;
        write(mem, l3 + (index(3) + area.code_pages() + page) * 8, pte)?;
    }
    Ok(())
}

/// The page descriptor of code page `page`: read-only at EL1, executable there only.
fn code_pte(area: &XolArea, page: u64) -> u64 {
    (area.code_gpa() + page * PAGE) | TABLE_OR_PAGE | AP_RO_EL1 | SH_INNER | AF | UXN
}

/// Refuses layouts other than 4 KiB pages with 48-bit kernel addresses.
fn check_layout(space: AddressSpace) -> Result<(), XolError> {
    let tcr = space.tcr;
    if (tcr >> 16) & 0x3f != 16 || (tcr >> 30) & 3 != 2 || tcr & (1 << 59) != 0 {
        return Err(XolError::Unsupported(
            "the guest's TTBR1 layout is not 4 KiB pages with 48-bit addresses",
        ));
    }
    Ok(())
}

/// Maps the area's code pages a second time at the first page of `window` (guest virtual:
/// the kernel image's freed init range, `[__init_begin, __init_end)` moved by the KASLR slide)
/// for the jump plan's trampolines, and returns that address. The range must be unmapped, as
/// `free_initmem` leaves it: each page's level-3 entry absent (or already ours), in a level-3
/// table of the kernel's or, where its level-2 entry is absent, one of the area's spare
/// tables. Nothing is written unless every page can be mapped, and nothing at all unless
/// `commit` (a dry run says whether and where it would map). Only invalid entries become valid,
/// which needs no TLB maintenance.
pub fn map_jump_code<M: GuestMemory>(
    area: &XolArea,
    mem: &M,
    space: AddressSpace,
    window: (u64, u64),
    commit: bool,
) -> Result<u64, XolError> {
    check_layout(space)?;
    let base = window.0.div_ceil(PAGE) * PAGE;
    if base + area.code_pages() * PAGE > window.1 {
        return Err(XolError::Unsupported(
            "the kernel's freed init range is smaller than the XOL code pages the trampolines run from",
        ));
    }
    let read = |gpa: u64| -> Result<u64, XolError> {
        mem.read_obj(GuestAddress(gpa))
            .map_err(|_| XolError::Memory(gpa))
    };
    let index = |va: u64, level: u32| (va >> (39 - 9 * level)) & 0x1ff;
    let mut spare = [area.gpa_base() + 3 * PAGE, area.gpa_base() + 4 * PAGE].into_iter();
    // Level-2 entries to point at fresh spare tables, and level-3 entries to write.
    let mut new_tables: Vec<(u64, u64)> = Vec::new();
    let mut ptes: Vec<(u64, u64)> = Vec::new();
    for page in 0..area.code_pages() {
        let va = base + page * PAGE;
        let mut table = space.ttbr1 & ADDR_MASK;
        for level in 0..2 {
            let entry = read(table + index(va, level) * 8)?;
            if entry & 0b11 != TABLE_OR_PAGE {
                return Err(XolError::NoKernelTable {
                    va,
                    level: level as u8,
                    entry,
                });
            }
            table = entry & ADDR_MASK;
        }
        let l2e_at = table + index(va, 2) * 8;
        let l2e = read(l2e_at)?;
        let (l3, fresh) = if l2e & 0b11 == TABLE_OR_PAGE {
            (l2e & ADDR_MASK, false)
        } else if l2e & 1 != 0 {
            return Err(XolError::HoleInUse {
                table,
                index: index(va, 2),
                entry: l2e,
            });
        } else if let Some(&(_, t)) = new_tables.iter().find(|(at, _)| *at == l2e_at) {
            (t, true)
        } else {
            let t = spare.next().ok_or(XolError::Unsupported(
                "the jump plan's code alias needs more level-3 tables than the XOL area keeps",
            ))?;
            new_tables.push((l2e_at, t));
            (t, true)
        };
        let at = l3 + index(va, 3) * 8;
        let want = code_pte(area, page);
        let pte = if fresh { 0 } else { read(at)? };
        if pte == want {
            continue;
        }
        if pte & 1 != 0 {
            return Err(XolError::HoleInUse {
                table: l3,
                index: index(va, 3),
                entry: pte,
            });
        }
        ptes.push((at, want));
    }
    if !commit {
        return Ok(base);
    }
    for &(_, t) in &new_tables {
        mem.write_slice(&[0u8; PAGE as usize], GuestAddress(t))
            .map_err(|_| XolError::Memory(t))?;
    }
    for &(at, pte) in &ptes {
        write(mem, at, pte)?;
    }
    for &(at, t) in &new_tables {
        write(mem, at, t | TABLE_OR_PAGE)?;
    }
    Ok(base)
}

/// Makes sure the kernel's TTBR1 table maps the area: entry 511 absent (then written) or
/// already ours. Returns whether it wrote. Layouts other than 4 KiB / 48-bit are refused (the
/// walker refuses them too).
pub fn ensure_mapped<M: GuestMemory>(
    area: &XolArea,
    mem: &M,
    space: AddressSpace,
) -> Result<bool, XolError> {
    check_layout(space)?;
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

    #[test]
    fn the_jump_code_alias_maps_the_code_pages_in_the_freed_init_range() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x4000_0000), 0x20_0000),
        ])
        .unwrap();
        let xol = XolArea::new(<Aarch64 as crate::arch::Arch>::XOL, 0x4000_0000, 4)
            .unwrap()
            .with_data_pages(2)
            .unwrap();
        write_tables(&xol, &mem).unwrap();
        let space = AddressSpace {
            ttbr0: 0x2000,
            ttbr1: 0x1000,
            tcr: 16 | (16 << 16) | (2 << 30),
        };
        ensure_mapped(&xol, &mem, space).unwrap();
        // The kernel image's tables: level 0 -> 0x3000 (level 1) -> 0x4000 (level 2), whose
        // entry for the first 2 MiB of the window is a level-3 table at 0x5000 with a page
        // still mapped at its end, and whose next entry is absent (a freed block).
        let window = (0xffff_8000_0a1f_e800u64, 0xffff_8000_0a60_0000u64);
        let ix = |va: u64, level: u32| (va >> (39 - 9 * level)) & 0x1ff;
        mem.write_obj(0x3003u64, GuestAddress(0x1000 + ix(window.0, 0) * 8))
            .unwrap();
        mem.write_obj(0x4003u64, GuestAddress(0x3000 + ix(window.0, 1) * 8))
            .unwrap();
        mem.write_obj(0x5003u64, GuestAddress(0x4000 + ix(window.0, 2) * 8))
            .unwrap();
        let taken = 0x5000 + 511 * 8;
        mem.write_obj(0x9000_0703u64, GuestAddress(taken)).unwrap();
        // The window's first page is in use: refused, nothing written.
        let before = crate::arch::aarch64::pagewalk::translate(&mem, space, window.0);
        assert!(matches!(
            map_jump_code(&xol, &mem, space, window, true),
            Err(XolError::HoleInUse {
                table: 0x5000,
                index: 511,
                ..
            })
        ));
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x4000 + (ix(window.0, 2) + 1) * 8))
                .unwrap(),
            0
        );
        assert_eq!(
            crate::arch::aarch64::pagewalk::translate(&mem, space, window.0),
            before
        );
        // Freed: a dry run says where, and writes nothing; then mapped, across the kernel's
        // table and a spare one of the area's.
        mem.write_obj(0u64, GuestAddress(taken)).unwrap();
        let dry = map_jump_code(&xol, &mem, space, window, false).unwrap();
        assert!(translate(&mem, space, dry).is_err());
        let base = map_jump_code(&xol, &mem, space, window, true).unwrap();
        assert_eq!(base, dry);
        assert_eq!(base, 0xffff_8000_0a1f_f000);
        for page in 0..4 {
            let t = translate(&mem, space, base + page * PAGE + 8).unwrap();
            assert_eq!(t.gpa, xol.code_gpa() + page * PAGE + 8);
            assert!(!t.writable && !t.user && !t.no_execute);
        }
        let spare = mem
            .read_obj::<u64>(GuestAddress(0x4000 + (ix(window.0, 2) + 1) * 8))
            .unwrap();
        assert_eq!(spare, (xol.gpa_base() + 3 * PAGE) | TABLE_OR_PAGE);
        // Again: nothing more to write, the same base.
        assert_eq!(
            map_jump_code(&xol, &mem, space, window, true).unwrap(),
            base
        );
        // The rings: writable, never executable.
        let t = translate(&mem, space, xol.data_va() + PAGE).unwrap();
        assert_eq!(t.gpa, xol.data_gpa() + PAGE);
        assert!(t.writable && t.no_execute && !t.user);
        // A window too small for the code pages.
        assert!(matches!(
            map_jump_code(&xol, &mem, space, (window.0, window.0 + 3 * PAGE), true),
            Err(XolError::Unsupported(_))
        ));
    }
}
