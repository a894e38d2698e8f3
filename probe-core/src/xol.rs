//! The XOL (execute out of line) area: guest physical memory that the guest's e820 map does not
//! list, owned by the VMM, mapped into the guest kernel's address space by page tables that the
//! VMM builds inside the area itself, at the x86_64 "reserved for hypervisor" guard hole
//! (0xffff800000000000, top-level slot 256 with 4-level paging; Documentation/arch/x86/x86_64/
//! mm.rst). The VMM registers the area as a read-only memslot, so the guest can execute the
//! slots but cannot rewrite them or their page tables; Accessed and Dirty bits are preset
//! because the CPU cannot set them in read-only memory.
//!
//! Layout (one 4 KiB page each): PDPT, PD, PT, then the code pages holding the slots.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::pagewalk::PagingMode;

/// Errors of the XOL area.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XolError {
    /// Every slot is in use.
    #[error("the XOL area is full ({0} slots)")]
    Full(usize),
    /// The area does not fit the page-table layout.
    #[error("an XOL area of {0} code pages does not fit one page table (at most 509)")]
    TooLarge(usize),
    /// The guest uses the top-level slot that the area needs.
    #[error(
        "the guest's top-level page table at {table:#x} already uses entry 256 ({entry:#x}); the XOL area cannot be mapped"
    )]
    HoleInUse {
        /// The top-level table.
        table: u64,
        /// What is there.
        entry: u64,
    },
    /// 5-level paging is not supported for the XOL mapping.
    #[error("the guest uses 5-level paging (LA57); the XOL mapping supports 4-level paging only")]
    FiveLevel,
    /// Guest memory access failed.
    #[error("guest memory at {0:#x} is not accessible")]
    Memory(u64),
}

/// Guest virtual base of the XOL area.
pub const XOL_VA_BASE: u64 = 0xffff_8000_0000_0000;
/// Top-level page-table index of [`XOL_VA_BASE`] with 4-level paging.
pub const XOL_PML4_INDEX: u64 = 256;
/// Bytes per slot: the longest instruction (15) plus an absolute jump back (14), rounded up.
pub const SLOT_SIZE: u64 = 32;
const PAGE: u64 = 4096;
const TABLE_PAGES: u64 = 3;
/// Bytes of the area's own page tables, at its start; the code pages follow.
pub const TABLE_BYTES: u64 = TABLE_PAGES * PAGE;
const P: u64 = 1;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const NX: u64 = 1 << 63;

/// One slot of the area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XolSlot {
    /// Index of the slot.
    pub index: usize,
    /// Guest virtual address of its first byte.
    pub va: u64,
    /// Guest physical address of its first byte.
    pub gpa: u64,
}

/// The XOL area and its slot allocator. Slots are never handed out twice: a slot that a probe
/// used may still be the RIP of a vCPU that is mid-step when the probe is removed.
#[derive(Debug)]
pub struct XolArea {
    gpa_base: u64,
    code_pages: u64,
    next: usize,
}

impl XolArea {
    /// An area at guest physical `gpa_base` with `code_pages` pages of slots.
    pub fn new(gpa_base: u64, code_pages: usize) -> Result<XolArea, XolError> {
        if code_pages == 0 || code_pages as u64 + TABLE_PAGES > 512 {
            return Err(XolError::TooLarge(code_pages));
        }
        Ok(XolArea {
            gpa_base,
            code_pages: code_pages as u64,
            next: 0,
        })
    }

    /// Total size in bytes, tables included: what the VMM must back with memory.
    pub fn size(&self) -> u64 {
        (TABLE_PAGES + self.code_pages) * PAGE
    }

    /// Guest physical base.
    pub fn gpa_base(&self) -> u64 {
        self.gpa_base
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        (self.code_pages * PAGE / SLOT_SIZE) as usize
    }

    /// Whether `va` lies in the code pages of the area.
    pub fn contains_va(&self, va: u64) -> bool {
        let start = XOL_VA_BASE + TABLE_PAGES * PAGE;
        (start..start + self.code_pages * PAGE).contains(&va)
    }

    /// The top-level entry that maps the area.
    pub fn top_level_entry(&self) -> u64 {
        self.gpa_base | P | A
    }

    /// Writes the area's own page tables (through the host mapping, which may write the
    /// read-only memslot).
    pub fn write_tables<M: GuestMemory>(&self, mem: &M) -> Result<(), XolError> {
        let pdpt = self.gpa_base;
        let pd = pdpt + PAGE;
        let pt = pd + PAGE;
        let zero = vec![0u8; (TABLE_PAGES * PAGE) as usize];
        write(mem, pdpt, &zero)?;
        write(mem, pdpt, &(pd | P | A).to_le_bytes())?;
        write(mem, pd, &(pt | P | A).to_le_bytes())?;
        for page in 0..self.code_pages {
            let index = TABLE_PAGES + page;
            let pte = (self.gpa_base + index * PAGE) | P | A | D;
            write(mem, pt + index * 8, &pte.to_le_bytes())?;
        }
        // The table pages themselves are mapped nowhere; data pages are never writable.
        let _ = NX;
        Ok(())
    }

    /// Takes a fresh slot.
    pub fn allocate(&mut self) -> Result<XolSlot, XolError> {
        if self.next >= self.capacity() {
            return Err(XolError::Full(self.capacity()));
        }
        let index = self.next;
        self.next += 1;
        let offset = TABLE_PAGES * PAGE + index as u64 * SLOT_SIZE;
        Ok(XolSlot {
            index,
            va: XOL_VA_BASE + offset,
            gpa: self.gpa_base + offset,
        })
    }

    /// Makes sure the top-level table at `cr3` maps the area, writing the entry if it is
    /// missing (new page tables copy the kernel half from init's, but tables created before
    /// the entry was written do not have it). Returns whether it wrote.
    pub fn ensure_mapped<M: GuestMemory>(
        &self,
        mem: &M,
        cr3: u64,
        mode: PagingMode,
    ) -> Result<bool, XolError> {
        if mode == PagingMode::FiveLevel {
            return Err(XolError::FiveLevel);
        }
        let table = cr3 & 0x000f_ffff_ffff_f000;
        let at = table + XOL_PML4_INDEX * 8;
        let entry: u64 = mem
            .read_obj(GuestAddress(at))
            .map_err(|_| XolError::Memory(at))?;
        let want = self.top_level_entry();
        if entry == want {
            return Ok(false);
        }
        if entry & P != 0 {
            return Err(XolError::HoleInUse { table, entry });
        }
        write(mem, at, &want.to_le_bytes())?;
        Ok(true)
    }
}

fn write<M: GuestMemory>(mem: &M, gpa: u64, bytes: &[u8]) -> Result<(), XolError> {
    mem.write_slice(bytes, GuestAddress(gpa))
        .map_err(|_| XolError::Memory(gpa))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagewalk::{PhysRead, translate};
    use vm_memory::GuestMemoryMmap;

    struct Mem(GuestMemoryMmap);
    impl PhysRead for Mem {
        fn read_phys_u64(&self, gpa: u64) -> Option<u64> {
            self.0.read_obj(GuestAddress(gpa)).ok()
        }
    }

    #[test]
    fn slots_are_mapped_at_the_hypervisor_hole_once_the_entry_is_written() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x4000_0000), 0x10_0000),
        ])
        .unwrap();
        let mut xol = XolArea::new(0x4000_0000, 4).unwrap();
        xol.write_tables(&mem).unwrap();
        let cr3 = 0x1000;
        let slot = xol.allocate().unwrap();
        let m = Mem(mem);
        assert!(translate(&m, cr3, PagingMode::FourLevel, slot.va).is_err());
        assert!(xol.ensure_mapped(&m.0, cr3, PagingMode::FourLevel).unwrap());
        assert!(!xol.ensure_mapped(&m.0, cr3, PagingMode::FourLevel).unwrap());
        let t = translate(&m, cr3, PagingMode::FourLevel, slot.va).unwrap();
        assert_eq!(t.gpa, slot.gpa);
        assert!(!t.writable && !t.user && !t.no_execute);
        let second = xol.allocate().unwrap();
        assert_eq!(second.va, slot.va + SLOT_SIZE);
        assert_eq!(
            translate(&m, cr3, PagingMode::FourLevel, second.va)
                .unwrap()
                .gpa,
            second.gpa
        );
        assert!(xol.contains_va(slot.va) && !xol.contains_va(XOL_VA_BASE));
        assert_eq!(
            xol.ensure_mapped(&m.0, cr3, PagingMode::FiveLevel),
            Err(XolError::FiveLevel)
        );
    }

    #[test]
    fn a_used_hole_and_a_full_area_are_errors() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_obj(0x1234_5007u64, GuestAddress(0x1000 + 256 * 8))
            .unwrap();
        let mut xol = XolArea::new(0x8_0000, 1).unwrap();
        assert!(matches!(
            xol.ensure_mapped(&mem, 0x1000, PagingMode::FourLevel),
            Err(XolError::HoleInUse { .. })
        ));
        for _ in 0..xol.capacity() {
            xol.allocate().unwrap();
        }
        assert_eq!(xol.allocate(), Err(XolError::Full(128)));
        assert!(XolArea::new(0, 600).is_err());
    }
}
