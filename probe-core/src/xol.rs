//! The XOL (execute out of line) area: guest physical memory that the guest's memory map does
//! not list, owned by the VMM, mapped into the guest kernel's address space by page tables that
//! the VMM builds inside the area itself (where, and how the mapping is hooked into the
//! kernel's tables, is the architecture's: [`crate::arch::Arch::XOL`],
//! [`crate::arch::Arch::ensure_xol_mapped`]).
//!
//! The VMM registers the code pages as a read-only memslot, so the guest can execute the slots
//! but cannot rewrite them; the table pages are a writable memslot that the guest maps nowhere.
//!
//! Layout: the architecture's table pages, then the code pages holding the slots.

/// Where an architecture's XOL area sits and how big its own page tables are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XolLayout {
    /// Guest virtual base of the code pages.
    pub va_base: u64,
    /// Pages of page tables at the start of the area, before the code pages.
    pub table_pages: u64,
    /// Most code pages the tables can map.
    pub max_code_pages: u64,
    /// Bytes per slot.
    pub slot_size: u64,
}

/// Errors of the XOL area.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XolError {
    /// Every slot is in use.
    #[error("the XOL area is full ({0} slots)")]
    Full(usize),
    /// The area does not fit the page-table layout.
    #[error("an XOL area of {pages} code pages does not fit its page tables (at most {max})")]
    TooLarge {
        /// Code pages asked for.
        pages: usize,
        /// Most the layout maps.
        max: u64,
    },
    /// The guest uses the page-table entry that the area needs.
    #[error(
        "the guest's kernel page table at {table:#x} already uses entry {index} ({entry:#x}, the unused hole the XOL area goes in); the XOL area cannot be mapped"
    )]
    HoleInUse {
        /// The table.
        table: u64,
        /// The entry's index.
        index: u64,
        /// What is there.
        entry: u64,
    },
    /// The guest's page tables do not have the expected kernel layout above the area's entry.
    #[error(
        "the guest's page tables have no kernel table for {va:#x} (level-{level} entry {entry:#x}); the XOL area cannot be mapped"
    )]
    NoKernelTable {
        /// The area's address.
        va: u64,
        /// The level whose entry is not a table.
        level: u8,
        /// The entry.
        entry: u64,
    },
    /// The architecture back end cannot map an XOL area (yet).
    #[error("{0}")]
    Unsupported(&'static str),
    /// Guest memory access failed.
    #[error("guest memory at {0:#x} is not accessible")]
    Memory(u64),
}

const PAGE: u64 = 4096;

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
/// used may still hold the saved PC of a preempted task (a boosted slot runs with interrupts
/// on) after the probe is gone.
#[derive(Debug)]
pub struct XolArea {
    layout: XolLayout,
    gpa_base: u64,
    code_pages: u64,
    /// Writable pages after the code pages (the jump plan's rings), mapped by the same tables.
    data_pages: u64,
    next: usize,
}

impl XolArea {
    /// An area laid out as `layout` (the architecture's `Arch::XOL`) at guest physical
    /// `gpa_base` with `code_pages` pages of slots.
    pub fn new(layout: XolLayout, gpa_base: u64, code_pages: usize) -> Result<XolArea, XolError> {
        if code_pages == 0 || code_pages as u64 > layout.max_code_pages {
            return Err(XolError::TooLarge {
                pages: code_pages,
                max: layout.max_code_pages,
            });
        }
        Ok(XolArea {
            layout,
            gpa_base,
            code_pages: code_pages as u64,
            data_pages: 0,
            next: 0,
        })
    }

    /// The same area with `pages` writable data pages after the code pages (the jump plan's
    /// rings), if the tables can map both.
    pub fn with_data_pages(mut self, pages: u64) -> Result<XolArea, XolError> {
        if self.code_pages + pages > self.layout.max_code_pages {
            return Err(XolError::TooLarge {
                pages: (self.code_pages + pages) as usize,
                max: self.layout.max_code_pages,
            });
        }
        self.data_pages = pages;
        Ok(self)
    }

    /// Number of writable data pages after the code pages.
    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    /// Guest physical address of the first data page.
    pub fn data_gpa(&self) -> u64 {
        self.code_gpa() + self.code_pages * PAGE
    }

    /// Guest virtual address of the first data page.
    pub fn data_va(&self) -> u64 {
        self.layout.va_base + self.code_pages * PAGE
    }

    /// Bytes of the data pages, at the area's end (a writable memslot).
    pub fn data_bytes(&self) -> u64 {
        self.data_pages * PAGE
    }

    /// Total size in bytes, tables included: what the VMM must back with memory.
    pub fn size(&self) -> u64 {
        (self.layout.table_pages + self.code_pages + self.data_pages) * PAGE
    }

    /// Bytes of the area's own page tables, at its start (a writable memslot); the code pages
    /// follow (a read-only one).
    pub fn table_bytes(&self) -> u64 {
        self.layout.table_pages * PAGE
    }

    /// Guest physical base.
    pub fn gpa_base(&self) -> u64 {
        self.gpa_base
    }

    /// Guest physical address of the first code page.
    pub fn code_gpa(&self) -> u64 {
        self.gpa_base + self.table_bytes()
    }

    /// Number of code pages.
    pub fn code_pages(&self) -> u64 {
        self.code_pages
    }

    /// Guest virtual base of the code pages.
    pub fn va_base(&self) -> u64 {
        self.layout.va_base
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        (self.code_pages * PAGE / self.layout.slot_size) as usize
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> u64 {
        self.layout.slot_size
    }

    /// Whether `va` lies in the code pages of the area.
    pub fn contains_va(&self, va: u64) -> bool {
        (self.layout.va_base..self.layout.va_base + self.code_pages * PAGE).contains(&va)
    }

    /// Takes fresh consecutive slots for `len` bytes (a jump plan's trampoline): the first.
    pub fn allocate_bytes(&mut self, len: u64) -> Result<XolSlot, XolError> {
        let n = len.div_ceil(self.layout.slot_size).max(1) as usize;
        if self.next + n > self.capacity() {
            return Err(XolError::Full(self.capacity()));
        }
        let first = self.allocate()?;
        self.next += n - 1;
        Ok(first)
    }

    /// Takes a fresh slot.
    pub fn allocate(&mut self) -> Result<XolSlot, XolError> {
        if self.next >= self.capacity() {
            return Err(XolError::Full(self.capacity()));
        }
        let index = self.next;
        self.next += 1;
        let offset = index as u64 * self.layout.slot_size;
        Ok(XolSlot {
            index,
            va: self.layout.va_base + offset,
            gpa: self.code_gpa() + offset,
        })
    }
}
