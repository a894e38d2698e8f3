//! What a page walk gives, for every architecture's walker (x86_64 in
//! `arch::x86_64::pagewalk`, aarch64 in `arch::aarch64::pagewalk`): the walkers run over guest
//! memory directly, have a fixed depth (a hostile table that points back at itself cannot make
//! them loop), and treat an entry that points past guest memory as an error, not a crash.

/// Errors of a page walk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// The address is not canonical for the paging mode.
    #[error("{0:#x} is not a canonical address")]
    NonCanonical(u64),
    /// An entry on the way has its present bit clear.
    #[error("{va:#x} is not mapped (level-{level} entry not present)")]
    NotPresent {
        /// The virtual address.
        va: u64,
        /// The paging level whose entry is missing (5 = PML5 ... 1 = PT).
        level: u8,
    },
    /// A table or entry lies outside guest memory.
    #[error("page table at guest physical {0:#x} lies outside guest memory")]
    OutsideMemory(u64),
    /// The translation regime is one the walker does not implement.
    #[error("{0}")]
    UnsupportedLayout(String),
    /// A page-size bit where the architecture reserves it.
    #[error("{va:#x}: reserved page-size bit set in a level-{level} entry")]
    ReservedBit {
        /// The virtual address.
        va: u64,
        /// The level of the offending entry.
        level: u8,
    },
}

/// Where a virtual address lands and with which rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest physical address.
    pub gpa: u64,
    /// Size of the page that maps it (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// Writable at every level.
    pub writable: bool,
    /// User-accessible at every level.
    pub user: bool,
    /// Execute-disabled at some level.
    pub no_execute: bool,
    /// A guarded page (arm64 BTI): an indirect branch into it must land on a landing pad, as
    /// PSTATE.BTYPE records. Never on x86_64.
    pub guarded: bool,
}

#[cfg(test)]
pub(crate) mod testing {
    use std::collections::HashMap;

    use crate::guest_memory::GuestPhysMemory;

    /// Sparse guest memory of `size` bytes for walker tests; unset words read as zero.
    pub(crate) struct FakeMem {
        size: u64,
        words: HashMap<u64, u64>,
    }

    impl FakeMem {
        pub(crate) fn new(size: u64) -> Self {
            FakeMem {
                size,
                words: HashMap::new(),
            }
        }

        /// Sets entry `index` of the table at `table`.
        pub(crate) fn set(&mut self, table: u64, index: u64, entry: u64) {
            self.words.insert(table + index * 8, entry);
        }
    }

    impl GuestPhysMemory for FakeMem {
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
            // Page-table entries only: aligned 8-byte reads.
            if buf.len() != 8 || gpa + 8 > self.size {
                return false;
            }
            buf.copy_from_slice(&self.words.get(&gpa).unwrap_or(&0).to_le_bytes());
            true
        }
    }
}
