//! Kernel text the guest kernel itself rewrites at run time, read from its own tables: jump
//! label sites (`__start___jump_table`..`__stop___jump_table`: a `jmp` or a 5-byte nop that
//! `static_key_enable` flips) and static call sites (`__start_static_call_sites`..
//! `__stop_static_call_sites`: a `call` that `static_call_update` re-targets). The kernel
//! checks the bytes it expects there before it writes, and a breakpoint or a jump of hvprobe's
//! in their place is a `BUG` (`jump_label: Fatal kernel bug, unexpected op`), so no probe goes
//! on one, as Linux's kprobes refuse them (`jump_label_text_reserved`,
//! `static_call_text_reserved`).
//!
//! Both tables hold addresses relative to the entry's own field: `struct jump_entry { s32 code;
//! s32 target; long key; }` (16 bytes, x86_64 and arm64), `struct static_call_site { s32 addr;
//! s32 key; }` (8 bytes, x86_64).

/// Bytes per jump label entry.
pub const JUMP_ENTRY_SIZE: usize = 16;
/// Bytes per static call site entry.
pub const STATIC_CALL_SITE_SIZE: usize = 8;

/// The sites a table of `entry_size`-byte entries names, its bytes `table` starting at `start`.
pub fn sites(start: u64, table: &[u8], entry_size: usize) -> Vec<u64> {
    crate::extable::relative_addresses(start, table, entry_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_name_sites_relative_to_themselves() {
        let start = 0xffff_ffff_823b_b1f0u64;
        let mut jump = Vec::new();
        for code in [-0x13b_b1f0i32, 0x100] {
            jump.extend_from_slice(&code.to_le_bytes());
            jump.extend_from_slice(&0x40i32.to_le_bytes());
            jump.extend_from_slice(&0u64.to_le_bytes());
        }
        assert_eq!(
            sites(start, &jump, JUMP_ENTRY_SIZE),
            vec![0xffff_ffff_8100_0000, start + 16 + 0x100]
        );
        let calls = [8i32.to_le_bytes(), 1i32.to_le_bytes()].concat();
        assert_eq!(sites(start, &calls, STATIC_CALL_SITE_SIZE), vec![start + 8]);
    }
}
