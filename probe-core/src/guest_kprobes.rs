//! The guest kernel's own kprobes, read from its `kprobe_table` so that hvprobe can decode
//! through them as Linux's `recover_probed_instruction` does: a kprobe's int3 (or, once
//! optimized, its 5-byte jump) covers the original bytes, which the kprobe keeps. Without
//! them, the instruction boundaries past a guest kprobe in a function are unknown.

use std::collections::HashMap;

use crate::btf::{Btf, BtfError};
use crate::symbols::SymbolMap;

/// Errors of finding the guest's kprobe table.
#[derive(Debug, thiserror::Error)]
pub enum GuestKprobeError {
    /// A `struct kprobe` (or optprobe) member is missing from BTF.
    #[error("kprobe layout: {0}")]
    Btf(#[from] BtfError),
    /// `kprobe_table` is not in System.map (a kernel without CONFIG_KPROBES).
    #[error("System.map has no kprobe_table")]
    NoTable,
    /// The table could not be read.
    #[error("reading the guest's kprobe table at {0:#x}")]
    Unreadable(u64),
}

/// Buckets of `kprobe_table` (`KPROBE_TABLE_SIZE`, `1 << KPROBE_HASH_BITS` since 2.6).
const TABLE_SIZE: u64 = 64;
/// `KPROBE_FLAG_GONE`: the kprobe's code is gone (a module unloaded); nothing in the text.
const FLAG_GONE: u32 = 1;
/// `KPROBE_FLAG_DISABLED`: not armed; the text holds the original bytes.
const FLAG_DISABLED: u32 = 2;
/// `KPROBE_FLAG_OPTIMIZED`: the int3 was replaced by a `jmp rel32` to a detour buffer.
const FLAG_OPTIMIZED: u32 = 4;
/// `KPROBE_FLAG_FTRACE`: planted through ftrace's call site, no int3 in the text.
const FLAG_FTRACE: u32 = 8;
/// Most kprobes a walk follows in one bucket, so that a corrupted list cannot loop forever.
const MAX_CHAIN: usize = 4096;

/// Where the guest keeps its kprobes, from its System.map and BTF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KprobeTableLayout {
    /// `kprobe_table` (as linked; add the KASLR slide).
    pub table: u64,
    hlist: u64,
    addr: u64,
    opcode: u64,
    flags: u64,
    /// Offsets of `optinsn.copied_insn` and `optinsn.size` in `struct optimized_kprobe`
    /// (whose `kp` comes first).
    optinsn: Option<(u64, u64)>,
}

/// One armed guest kprobe as the text shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKprobe {
    /// The original bytes its int3 (one byte) or its optimized jump (five bytes) covers.
    pub original: Vec<u8>,
    /// How many bytes of text from its address belong to it: 1 for an int3; for an optimized
    /// kprobe, every instruction its detour copied (the jump and the dead bytes after it).
    pub span: u64,
}

impl KprobeTableLayout {
    /// The layout of the kernel that `btf` and `map` describe.
    pub fn from_kernel(btf: &Btf, map: &SymbolMap) -> Result<KprobeTableLayout, GuestKprobeError> {
        let table = map
            .lookup("kprobe_table")
            .map_err(|_| GuestKprobeError::NoTable)?
            .addr;
        let optinsn = match (
            btf.member_offset("optimized_kprobe", "optinsn"),
            btf.member_offset("arch_optimized_insn", "copied_insn"),
            btf.member_offset("arch_optimized_insn", "size"),
        ) {
            (Ok(a), Ok(c), Ok(s)) => Some((a + c, a + s)),
            _ => None,
        };
        Ok(KprobeTableLayout {
            table,
            hlist: btf.member_offset("kprobe", "hlist")?,
            addr: btf.member_offset("kprobe", "addr")?,
            opcode: btf.member_offset("kprobe", "opcode")?,
            flags: btf.member_offset("kprobe", "flags")?,
            optinsn,
        })
    }

    /// Each armed guest kprobe by address, with the original bytes under it. `read` reads
    /// guest virtual memory; `slide` is the KASLR slide of the running kernel.
    pub fn read(
        &self,
        slide: u64,
        read: &dyn Fn(u64, &mut [u8]) -> bool,
    ) -> Result<HashMap<u64, GuestKprobe>, GuestKprobeError> {
        let u64_at = |va: u64| {
            let mut b = [0u8; 8];
            read(va, &mut b).then(|| u64::from_le_bytes(b))
        };
        let table = self.table.wrapping_add(slide);
        let mut found = HashMap::new();
        for bucket in 0..TABLE_SIZE {
            let head = table + 8 * bucket;
            let mut node = u64_at(head).ok_or(GuestKprobeError::Unreadable(head))?;
            for _ in 0..MAX_CHAIN {
                if node == 0 {
                    break;
                }
                let kp = node.wrapping_sub(self.hlist);
                let addr = u64_at(kp + self.addr).ok_or(GuestKprobeError::Unreadable(kp))?;
                let mut opcode = [0u8; 1];
                let mut flags = [0u8; 4];
                if !read(kp + self.opcode, &mut opcode) || !read(kp + self.flags, &mut flags) {
                    return Err(GuestKprobeError::Unreadable(kp));
                }
                let flags = u32::from_le_bytes(flags);
                if flags & (FLAG_GONE | FLAG_DISABLED | FLAG_FTRACE) == 0 {
                    let mut original = vec![opcode[0]];
                    let mut span = 1;
                    if flags & FLAG_OPTIMIZED != 0 {
                        let (copied, size) =
                            self.optinsn.ok_or(GuestKprobeError::Unreadable(kp))?;
                        let mut rest = [0u8; 4];
                        if !read(kp + copied, &mut rest) {
                            return Err(GuestKprobeError::Unreadable(kp));
                        }
                        original.extend_from_slice(&rest);
                        span = u64_at(kp + size)
                            .ok_or(GuestKprobeError::Unreadable(kp))?
                            .clamp(5, 64);
                    }
                    found.insert(addr, GuestKprobe { original, span });
                }
                node = u64_at(node).ok_or(GuestKprobeError::Unreadable(node))?;
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf::build_test_btf;

    #[test]
    fn armed_and_optimized_kprobes_give_their_original_bytes() {
        let btf = Btf::parse(&build_test_btf(&[
            (
                "kprobe",
                96,
                &[
                    ("hlist", 0),
                    ("addr", 0x28),
                    ("opcode", 0x48),
                    ("flags", 0x58),
                ],
            ),
            ("optimized_kprobe", 160, &[("kp", 0), ("optinsn", 0x70)]),
            (
                "arch_optimized_insn",
                24,
                &[("copied_insn", 0), ("insn", 8), ("size", 16)],
            ),
        ]))
        .unwrap();
        let map = SymbolMap::parse("0000000000010000 b kprobe_table\n").unwrap();
        let layout = KprobeTableLayout::from_kernel(&btf, &map).unwrap();

        // Guest memory: bucket 3 holds a chain of three kprobes (armed, optimized, disabled),
        // bucket 9 one ftrace-based kprobe.
        let mut mem: HashMap<u64, u8> = HashMap::new();
        let mut put = |va: u64, bytes: &[u8]| {
            for (i, b) in bytes.iter().enumerate() {
                mem.insert(va + i as u64, *b);
            }
        };
        for b in 0..TABLE_SIZE {
            put(0x10000 + 8 * b, &0u64.to_le_bytes());
        }
        let kprobe =
            |put: &mut dyn FnMut(u64, &[u8]), at: u64, next: u64, addr: u64, flags: u32, op: u8| {
                put(at, &next.to_le_bytes());
                put(at + 0x28, &addr.to_le_bytes());
                put(at + 0x48, &[op]);
                put(at + 0x58, &flags.to_le_bytes());
            };
        put(0x10000 + 8 * 3, &0x20000u64.to_le_bytes());
        kprobe(&mut put, 0x20000, 0x20100, 0xffff_ffff_8100_1000, 0, 0x48);
        kprobe(
            &mut put,
            0x20100,
            0x20200,
            0xffff_ffff_8100_2000,
            FLAG_OPTIMIZED,
            0x55,
        );
        put(0x20100 + 0x70, &[0x48, 0x89, 0xe5, 0x41]);
        put(0x20100 + 0x70 + 16, &7u64.to_le_bytes());
        kprobe(
            &mut put,
            0x20200,
            0,
            0xffff_ffff_8100_3000,
            FLAG_DISABLED,
            0x90,
        );
        put(0x10000 + 8 * 9, &0x20300u64.to_le_bytes());
        kprobe(
            &mut put,
            0x20300,
            0,
            0xffff_ffff_8100_4000,
            FLAG_FTRACE,
            0x0f,
        );

        let read = |va: u64, buf: &mut [u8]| {
            buf.iter_mut()
                .enumerate()
                .all(|(i, b)| mem.get(&(va + i as u64)).map(|v| *b = *v).is_some())
        };
        let found = layout.read(0, &read).unwrap();
        assert_eq!(found.len(), 2, "{found:x?}");
        assert_eq!(
            found[&0xffff_ffff_8100_1000],
            GuestKprobe {
                original: vec![0x48],
                span: 1
            }
        );
        assert_eq!(
            found[&0xffff_ffff_8100_2000],
            GuestKprobe {
                original: vec![0x55, 0x48, 0x89, 0xe5, 0x41],
                span: 7
            }
        );

        // A table that cannot be read is an error, not an empty list.
        assert!(matches!(
            layout.read(0x100_0000, &read),
            Err(GuestKprobeError::Unreadable(_))
        ));
        let no = SymbolMap::parse("ffffffff81000000 T _stext\n").unwrap();
        assert!(matches!(
            KprobeTableLayout::from_kernel(&btf, &no),
            Err(GuestKprobeError::NoTable)
        ));
    }
}
