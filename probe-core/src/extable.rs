//! The guest kernel's exception table (`__start___ex_table`..`__stop___ex_table`): the
//! instructions that may fault with a fix-up (user-memory access, `*_safe` MSR helpers). A copy
//! of one run out of line would fault at a slot address that the table does not list, and the
//! guest would oops instead of taking its fix-up, so the engine never copies them.
//!
//! x86_64 entries are 12 bytes since Linux 4.6 (`struct exception_table_entry { int insn, fixup,
//! data; }`, `data` named `handler` before 5.17), arm64 entries too since 5.16 (`int insn,
//! fixup; short type, data;`); `insn` and `fixup` are relative to their own addresses in both.

/// Bytes per entry.
pub const ENTRY_SIZE: usize = 12;

/// The instruction addresses of the table whose bytes `table` start at guest virtual `start`.
pub fn instruction_addresses(start: u64, table: &[u8]) -> Vec<u64> {
    relative_addresses(start, table, ENTRY_SIZE)
}

/// The addresses the entries of a kernel table of `entry_size`-byte entries name in their
/// first field, an `s32` relative to its own address (the exception table, the jump label and
/// static call tables: [`crate::patched_text`]), the table's bytes `table` starting at guest
/// virtual `start`. A partial entry at the end is ignored.
pub fn relative_addresses(start: u64, table: &[u8], entry_size: usize) -> Vec<u64> {
    table
        .chunks_exact(entry_size)
        .enumerate()
        .map(|(i, e)| {
            let rel = i32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            start
                .wrapping_add((i * entry_size) as u64)
                .wrapping_add(rel as i64 as u64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_relative_to_their_own_address() {
        let start = 0xffff_ffff_8260_0000u64;
        let mut table = Vec::new();
        // Entry 0 points 0x1000 below itself, entry 1 0x20 above itself.
        for (insn, fixup) in [(-0x1000i32, -0xff0i32), (0x20, 0x30)] {
            table.extend_from_slice(&insn.to_le_bytes());
            table.extend_from_slice(&fixup.to_le_bytes());
            table.extend_from_slice(&0u32.to_le_bytes());
        }
        table.push(0xaa); // a partial entry is ignored
        assert_eq!(
            instruction_addresses(start, &table),
            vec![start - 0x1000, start + 12 + 0x20]
        );
    }
}
