//! The aarch64 XOL layout: where the area will be mapped (a top-level entry of the kernel's
//! TTBR1 table, `swapper_pg_dir`, in the 2 TiB guard region above vmemmap that the 4 KiB /
//! 48-bit layout leaves unused: Documentation/arch/arm64/memory.rst). Hooking the area into the
//! guest's tables is not implemented yet, so every plan that needs a slot is refused by the
//! decoder, and a return probe (whose trampoline is a slot) fails here with this reason.

use crate::arch::XolLayout;
use crate::xol::XolError;

/// Guest virtual base of the code pages: top-level entry 511 of the TTBR1 table.
pub const XOL_VA_BASE: u64 = 0xffff_ff80_0000_0000;

/// The aarch64 layout: level-1, level-2 and level-3 tables, then up to 512 code pages; 16-byte
/// slots (the copy and a BRK, aligned).
pub const LAYOUT: XolLayout = XolLayout {
    va_base: XOL_VA_BASE,
    table_pages: 3,
    max_code_pages: 512,
    slot_size: 16,
};

/// Why the area cannot be mapped on aarch64 yet.
pub const NOT_YET: XolError = XolError::Unsupported(
    "out-of-line slots (stepped instructions, return probes) are not implemented on aarch64 yet",
);
