//! The x86_64 XOL layout: the last 2 MiB of PUD entry 509 under the top-level entry 511
//! (`0xffffffff7fe00000..0xffffffff80000000`), inside the unused hole
//! `ffffffff00000000-ffffffff7fffffff` that Documentation/arch/x86/x86_64/mm.rst lists right
//! below the kernel text mapping. The PUD table of top-level entry 511 (`level3_kernel_pgt`) is
//! shared by every address space: `pgd_ctor()` copies the top-level entries from
//! `KERNEL_PGD_BOUNDARY` (slot 273) up into each new mm, so all of them point at the same PUD
//! table, and one PUD entry written there maps the area in every page table, present and
//! future, kthreads and exec'd tasks alike. (Slot 256, the "hypervisor" guard hole, is below the
//! boundary and is NOT copied: an area there is missing from every mm created after it.) The
//! area is also within +-2 GiB of all kernel text, KASLR range included, so a copied
//! instruction's RIP-relative displacement is re-targeted in place and a `jmp rel32` from a
//! slot reaches back into the text.
//!
//! The VMM registers the code pages as a read-only memslot, so the guest can execute the slots
//! but cannot rewrite them; the two table pages are a writable memslot (QEMU's TCG probes
//! page-table pages for write during walks) that the guest maps nowhere. Accessed and Dirty bits
//! are preset.
//!
//! Layout (one 4 KiB page each): PD, PT, then the code pages holding the slots, then any data
//! pages (the jump plan's rings, [`crate::jump`]): writable to the guest, a writable memslot.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::pagewalk::PagingMode;
use crate::arch::XolLayout;
use crate::xol::{XolArea, XolError};

/// Guest virtual base of the XOL area's code pages.
pub const XOL_VA_BASE: u64 = 0xffff_ffff_7fe0_0000;
/// PUD index (under top-level entry 511) that maps the area.
pub const XOL_PUD_INDEX: u64 = 509;

/// The x86_64 layout: a PD and a PT page, then up to 512 code pages; 32-byte slots (the
/// longest instruction, 15 bytes, plus a `jmp rel32` back or an int3, rounded up).
pub const LAYOUT: XolLayout = XolLayout {
    va_base: XOL_VA_BASE,
    table_pages: 2,
    max_code_pages: 512,
    slot_size: 32,
};

const PAGE: u64 = 4096;
const P: u64 = 1;
const PS: u64 = 1 << 7;
const RW: u64 = 1 << 1;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The PUD entry that maps `area`.
pub fn pud_entry(area: &XolArea) -> u64 {
    area.gpa_base() | P | RW | A
}

/// Writes the area's own page tables (through the host mapping): the PD's entry for the area
/// points at the PT, whose entries map the code pages.
pub fn write_tables<M: GuestMemory>(area: &XolArea, mem: &M) -> Result<(), XolError> {
    let pd = area.gpa_base();
    let pt = pd + PAGE;
    let zero = vec![0u8; area.table_bytes() as usize];
    write(mem, pd, &zero)?;
    let pd_index = (XOL_VA_BASE >> 21) & 0x1ff;
    write(mem, pd + pd_index * 8, &(pt | P | RW | A).to_le_bytes())?;
    for page in 0..area.code_pages() {
        let pte = (area.code_gpa() + page * PAGE) | P | A | D;
        write(mem, pt + page * 8, &pte.to_le_bytes())?;
    }
    // The jump plan's rings: writable, after the code pages.
    for page in 0..area.data_pages() {
        let pte = (area.data_gpa() + page * PAGE) | P | RW | A | D;
        write(mem, pt + (area.code_pages() + page) * 8, &pte.to_le_bytes())?;
    }
    Ok(())
}

/// Makes sure the kernel PUD table reached from `cr3` maps the area: finds the shared PUD table
/// through the top-level entry 511 (and PML4 entry 511 with 5-level paging), checks that entry
/// 509 is absent or already ours, and writes it if absent. Returns whether it wrote. One write
/// serves every address space, since all share that PUD table.
pub fn ensure_mapped<M: GuestMemory>(
    area: &XolArea,
    mem: &M,
    cr3: u64,
    mode: PagingMode,
) -> Result<bool, XolError> {
    let top = match mode {
        PagingMode::FourLevel => 4u8,
        PagingMode::FiveLevel => 5,
    };
    let mut table = cr3 & ADDR_MASK;
    for level in (4..=top).rev() {
        let index = (XOL_VA_BASE >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff;
        let at = table + index * 8;
        let entry: u64 = mem
            .read_obj(GuestAddress(at))
            .map_err(|_| XolError::Memory(at))?;
        if entry & P == 0 || entry & PS != 0 {
            return Err(XolError::NoKernelTable {
                va: XOL_VA_BASE,
                level,
                entry,
            });
        }
        table = entry & ADDR_MASK;
    }
    let at = table + XOL_PUD_INDEX * 8;
    let entry: u64 = mem
        .read_obj(GuestAddress(at))
        .map_err(|_| XolError::Memory(at))?;
    let want = pud_entry(area);
    if entry == want {
        return Ok(false);
    }
    if entry & P != 0 {
        return Err(XolError::HoleInUse {
            table,
            index: XOL_PUD_INDEX,
            entry,
        });
    }
    write(mem, at, &want.to_le_bytes())?;
    Ok(true)
}

fn write<M: GuestMemory>(mem: &M, gpa: u64, bytes: &[u8]) -> Result<(), XolError> {
    mem.write_slice(bytes, GuestAddress(gpa))
        .map_err(|_| XolError::Memory(gpa))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::X86_64;
    use crate::arch::x86_64::pagewalk::translate;
    use vm_memory::GuestMemoryMmap;

    struct Mem(GuestMemoryMmap);
    impl crate::vm::GuestPhysMemory for Mem {
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
            self.0.read_slice(buf, GuestAddress(gpa)).is_ok()
        }
    }

    /// Two top-level tables (two "mms") at 0x1000 and 0x2000 whose entry 511 share one PUD
    /// table at 0x3000, as `pgd_ctor` makes them.
    fn two_mms() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x4000_0000), 0x10_0000),
        ])
        .unwrap();
        for pgd in [0x1000u64, 0x2000] {
            mem.write_obj(0x3000u64 | 0x63, GuestAddress(pgd + 511 * 8))
                .unwrap();
        }
        mem
    }

    #[test]
    fn one_pud_entry_maps_the_slots_in_every_address_space() {
        let mem = two_mms();
        let mut xol = XolArea::new(<X86_64 as crate::arch::Arch>::XOL, 0x4000_0000, 4).unwrap();
        write_tables(&xol, &mem).unwrap();
        let slot = xol.allocate().unwrap();
        let m = Mem(mem);
        assert!(translate(&m, 0x1000, PagingMode::FourLevel, slot.va).is_err());
        assert!(ensure_mapped(&xol, &m.0, 0x1000, PagingMode::FourLevel).unwrap());
        // The other mm sees it with no write of its own.
        assert!(!ensure_mapped(&xol, &m.0, 0x2000, PagingMode::FourLevel).unwrap());
        for cr3 in [0x1000, 0x2000] {
            let t = translate(&m, cr3, PagingMode::FourLevel, slot.va).unwrap();
            assert_eq!(t.gpa, slot.gpa);
            assert!(!t.writable && !t.user && !t.no_execute);
        }
        let second = xol.allocate().unwrap();
        assert_eq!(second.va, slot.va + LAYOUT.slot_size);
        assert_eq!(
            translate(&m, 0x2000, PagingMode::FourLevel, second.va)
                .unwrap()
                .gpa,
            second.gpa
        );
        assert!(xol.contains_va(slot.va) && !xol.contains_va(XOL_VA_BASE - 1));
        // Within +-2 GiB of the lowest and the highest kernel text address.
        for text in [0xffff_ffff_8000_0000u64, 0xffff_ffff_c000_0000] {
            assert!(text - slot.va < 1 << 31);
        }
    }

    #[test]
    fn five_level_paging_goes_through_pml5_entry_511() {
        let mem = two_mms();
        // PML5 at 0x5000 whose entry 511 points at the PML4 at 0x1000.
        mem.write_obj(0x1000u64 | 0x63, GuestAddress(0x5000 + 511 * 8))
            .unwrap();
        let mut xol = XolArea::new(<X86_64 as crate::arch::Arch>::XOL, 0x4000_0000, 1).unwrap();
        write_tables(&xol, &mem).unwrap();
        let slot = xol.allocate().unwrap();
        assert!(ensure_mapped(&xol, &mem, 0x5000, PagingMode::FiveLevel).unwrap());
        let m = Mem(mem);
        let t = translate(&m, 0x5000, PagingMode::FiveLevel, slot.va).unwrap();
        assert_eq!(t.gpa, slot.gpa);
    }

    #[test]
    fn a_used_hole_a_missing_kernel_table_and_a_full_area_are_errors() {
        let mem = two_mms();
        mem.write_obj(0x1234_5007u64, GuestAddress(0x3000 + 509 * 8))
            .unwrap();
        let mut xol = XolArea::new(<X86_64 as crate::arch::Arch>::XOL, 0x8_0000, 1).unwrap();
        assert!(matches!(
            ensure_mapped(&xol, &mem, 0x1000, PagingMode::FourLevel),
            Err(XolError::HoleInUse { .. })
        ));
        assert!(matches!(
            ensure_mapped(&xol, &mem, 0x6000, PagingMode::FourLevel),
            Err(XolError::NoKernelTable { level: 4, .. })
        ));
        for _ in 0..xol.capacity() {
            xol.allocate().unwrap();
        }
        assert_eq!(xol.allocate(), Err(XolError::Full(128)));
        assert!(XolArea::new(<X86_64 as crate::arch::Arch>::XOL, 0, 513).is_err());
    }
}
