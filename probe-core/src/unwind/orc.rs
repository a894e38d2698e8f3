//! The x86_64 ORC unwind tables (`CONFIG_UNWINDER_ORC`) as the guest's vmlinux holds them:
//! `.orc_unwind_ip`, an array of 32-bit offsets each relative to its own address (sorted by
//! the build), and `.orc_unwind`, one 6-byte entry per address: how to find the caller's stack
//! pointer (the CFA), frame pointer and return address at every instruction. Linux's
//! `arch/x86/kernel/unwind_orc.c` and drgn's `libdrgn/orc.c` read the same tables.
//!
//! The entry layout is the one of Linux 5.x to 6.2: `sp_offset: s16, bp_offset: s16,
//! sp_reg:4, bp_reg:4, type:2, end:1`. Linux 6.3 added a `signal` bit and 6.4 renumbered the
//! types (`type:3`, `ORC_TYPE_UNDEFINED`, `END_OF_STACK`); such tables are refused by
//! [`OrcLayout::for_release`], never read wrong.

/// Errors of reading ORC tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrcError {
    /// The two sections do not describe the same number of addresses.
    #[error(".orc_unwind_ip has {ips} entries and .orc_unwind {entries}: not one table")]
    Mismatch {
        /// Entries of `.orc_unwind_ip`.
        ips: usize,
        /// Entries of `.orc_unwind`.
        entries: usize,
    },
    /// The addresses are not sorted (the build sorts them; the kernel relies on it).
    #[error(".orc_unwind_ip is not sorted at entry {0}")]
    Unsorted(usize),
    /// A kernel whose ORC layout this reader does not know.
    #[error(
        "Linux {0}.{1} uses the ORC layout of 6.3 and later (a signal bit, renumbered types), which hvprobe does not read yet"
    )]
    UnknownLayout(u32, u32),
}

/// Which entry layout a kernel's tables use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrcLayout {
    /// Linux 4.14 to 6.2: `type:2, end:1`.
    V4_14,
}

impl OrcLayout {
    /// The layout of Linux `major.minor`, or why it cannot be read.
    pub fn for_release(major: u32, minor: u32) -> Result<OrcLayout, OrcError> {
        if (major, minor) < (6, 3) {
            Ok(OrcLayout::V4_14)
        } else {
            Err(OrcError::UnknownLayout(major, minor))
        }
    }
}

/// The register an entry's CFA or frame pointer is found from (`ORC_REG_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrcReg {
    /// No rule: the unwind cannot go on from here.
    Undefined,
    /// The CFA (the previous frame's stack pointer).
    PrevSp,
    /// `%rdx`.
    Dx,
    /// `%rdi`.
    Di,
    /// `%rbp`.
    Bp,
    /// `%rsp`.
    Sp,
    /// `%r10`.
    R10,
    /// `%r13`.
    R13,
    /// The value at `%rbp + offset`.
    BpIndirect,
    /// The value at `%rsp + offset`.
    SpIndirect,
    /// A number no kernel uses.
    Other(u8),
}

impl OrcReg {
    fn from_bits(v: u8) -> OrcReg {
        match v {
            0 => OrcReg::Undefined,
            1 => OrcReg::PrevSp,
            2 => OrcReg::Dx,
            3 => OrcReg::Di,
            4 => OrcReg::Bp,
            5 => OrcReg::Sp,
            6 => OrcReg::R10,
            7 => OrcReg::R13,
            8 => OrcReg::BpIndirect,
            9 => OrcReg::SpIndirect,
            n => OrcReg::Other(n),
        }
    }
}

/// What kind of frame an address is in (`ORC_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrcType {
    /// A function's frame: the return address is just below the CFA.
    Call,
    /// A full `pt_regs` frame (an interrupt or exception entry) at the CFA.
    Regs,
    /// The IRET part of `pt_regs` only.
    RegsPartial,
    /// A number no kernel of this layout uses.
    Other(u8),
}

/// One unwind rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrcEntry {
    /// Added to [`OrcEntry::sp_reg`]'s value to give the CFA.
    pub sp_offset: i16,
    /// Where the caller's `%rbp` was saved, from [`OrcEntry::bp_reg`].
    pub bp_offset: i16,
    /// The register the CFA is computed from.
    pub sp_reg: OrcReg,
    /// The register the saved `%rbp` is found from (`Undefined`: `%rbp` is unchanged).
    pub bp_reg: OrcReg,
    /// The kind of frame.
    pub kind: OrcType,
    /// The last frame of a stack (the entry code's, before user mode).
    pub end: bool,
}

impl OrcEntry {
    /// Decodes the 6 bytes of an entry of `layout`.
    pub fn decode(b: [u8; 6], layout: OrcLayout) -> OrcEntry {
        let OrcLayout::V4_14 = layout;
        OrcEntry {
            sp_offset: i16::from_le_bytes([b[0], b[1]]),
            bp_offset: i16::from_le_bytes([b[2], b[3]]),
            sp_reg: OrcReg::from_bits(b[4] & 0xf),
            bp_reg: OrcReg::from_bits(b[4] >> 4),
            kind: match b[5] & 0x3 {
                0 => OrcType::Call,
                1 => OrcType::Regs,
                2 => OrcType::RegsPartial,
                n => OrcType::Other(n),
            },
            end: b[5] & 0x4 != 0,
        }
    }
}

/// A kernel's ORC table: the addresses, sorted, and their entries, with an index of where
/// each 256-byte block of text starts in them (Linux's `orc_lookup`), so that a lookup
/// searches a handful of entries instead of the whole table.
#[derive(Debug, Clone)]
pub struct OrcTable {
    ips: Vec<u64>,
    entries: Vec<OrcEntry>,
    /// For block `b` (addresses from `ips[0] + b * 256`): the index of the last address at or
    /// below its start.
    blocks: Vec<u32>,
}

/// log2 of the lookup index's block size (Linux's `LOOKUP_BLOCK_ORDER`).
const BLOCK_SHIFT: u32 = 8;
/// The largest span of addresses the index covers (1 GiB of text: 16 MiB of index).
const MAX_INDEXED_SPAN: u64 = 1 << 30;

impl OrcTable {
    /// The table of `.orc_unwind_ip` (its bytes, and its address as linked: each offset is
    /// relative to its own slot) and `.orc_unwind` of a kernel of `layout`.
    pub fn parse(
        ip_section: &[u8],
        ip_section_va: u64,
        orc_section: &[u8],
        layout: OrcLayout,
    ) -> Result<OrcTable, OrcError> {
        let (ips, entries) = (ip_section.len() / 4, orc_section.len() / 6);
        if ips != entries
            || !ip_section.len().is_multiple_of(4)
            || !orc_section.len().is_multiple_of(6)
        {
            return Err(OrcError::Mismatch { ips, entries });
        }
        let ips: Vec<u64> = ip_section
            .chunks_exact(4)
            .enumerate()
            .map(|(i, c)| {
                let rel = i32::from_le_bytes(c.try_into().unwrap_or([0; 4]));
                (ip_section_va + 4 * i as u64).wrapping_add_signed(i64::from(rel))
            })
            .collect();
        if let Some(i) = ips.windows(2).position(|w| w[0] > w[1]) {
            return Err(OrcError::Unsorted(i + 1));
        }
        let entries = orc_section
            .chunks_exact(6)
            .map(|c| OrcEntry::decode(c.try_into().unwrap_or([0; 6]), layout))
            .collect();
        let blocks = match (ips.first(), ips.last()) {
            (Some(&first), Some(&last))
                if last - first < MAX_INDEXED_SPAN && ips.len() < u32::MAX as usize =>
            {
                let n = ((last - first) >> BLOCK_SHIFT) as usize + 2;
                let mut blocks = Vec::with_capacity(n);
                let mut i = 0usize;
                for b in 0..n as u64 {
                    let start = first + (b << BLOCK_SHIFT);
                    while i + 1 < ips.len() && ips[i + 1] <= start {
                        i += 1;
                    }
                    blocks.push(i as u32);
                }
                blocks
            }
            _ => Vec::new(),
        };
        Ok(OrcTable {
            ips,
            entries,
            blocks,
        })
    }

    /// How many addresses it describes.
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    /// Whether it describes none.
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// The rule in force at `ip` (as linked): the entry of the last address at or before it.
    pub fn lookup(&self, ip: u64) -> Option<OrcEntry> {
        let first = *self.ips.first()?;
        let b = (ip.checked_sub(first)? >> BLOCK_SHIFT) as usize;
        let i = match (self.blocks.get(b), self.blocks.get(b + 1)) {
            (Some(&lo), Some(&hi)) => {
                let (lo, hi) = (lo as usize, (hi as usize + 1).min(self.ips.len()));
                lo + self.ips[lo..hi].partition_point(|&a| a <= ip) - 1
            }
            _ => self.ips.partition_point(|&a| a <= ip).checked_sub(1)?,
        };
        Some(self.entries[i])
    }

    /// The rule at `ip` by a search of the whole table (what [`OrcTable::lookup`]'s index
    /// must agree with).
    pub fn lookup_unindexed(&self, ip: u64) -> Option<OrcEntry> {
        let i = self.ips.partition_point(|&a| a <= ip).checked_sub(1)?;
        Some(self.entries[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sp_offset: i16, sp_reg: u8, bp_reg: u8, kind: u8, end: bool) -> [u8; 6] {
        let mut b = [0u8; 6];
        b[..2].copy_from_slice(&sp_offset.to_le_bytes());
        b[2..4].copy_from_slice(&(-16i16).to_le_bytes());
        b[4] = sp_reg | (bp_reg << 4);
        b[5] = kind | (u8::from(end) << 2);
        b
    }

    #[test]
    fn entries_decode_and_lookups_take_the_rule_in_force() {
        let base = 0xffff_ffff_8200_0000u64;
        // Three addresses: a function entry, the instruction after its push, an entry stub.
        let targets = [
            0xffff_ffff_8100_0000u64,
            0xffff_ffff_8100_0001,
            0xffff_ffff_81c0_0000,
        ];
        let ips: Vec<u8> = targets
            .iter()
            .enumerate()
            .flat_map(|(i, t)| ((*t as i64 - (base + 4 * i as u64) as i64) as i32).to_le_bytes())
            .collect();
        let orc: Vec<u8> = [
            entry(8, 5, 0, 0, false),
            entry(16, 5, 1, 0, false),
            entry(0, 5, 0, 1, true),
        ]
        .concat();
        let t = OrcTable::parse(&ips, base, &orc, OrcLayout::V4_14).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(0xffff_ffff_80ff_ffff), None, "below the table");
        let at_entry = t.lookup(targets[0]).unwrap();
        assert_eq!(
            (at_entry.sp_reg, at_entry.sp_offset, at_entry.kind),
            (OrcReg::Sp, 8, OrcType::Call)
        );
        let body = t.lookup(targets[1] + 0x40).unwrap();
        assert_eq!(
            (body.sp_offset, body.bp_reg, body.bp_offset),
            (16, OrcReg::PrevSp, -16)
        );
        let stub = t.lookup(targets[2]).unwrap();
        assert!(stub.end && stub.kind == OrcType::Regs);
    }

    #[test]
    fn mismatched_unsorted_and_newer_tables_are_refused() {
        assert_eq!(
            OrcTable::parse(&[0; 8], 0, &[0; 6], OrcLayout::V4_14).unwrap_err(),
            OrcError::Mismatch { ips: 2, entries: 1 }
        );
        // Two offsets that point backwards.
        let ips = [16i32.to_le_bytes(), 0i32.to_le_bytes()].concat();
        assert_eq!(
            OrcTable::parse(&ips, 0x1000, &[0; 12], OrcLayout::V4_14).unwrap_err(),
            OrcError::Unsorted(1)
        );
        assert_eq!(OrcLayout::for_release(6, 1), Ok(OrcLayout::V4_14));
        assert!(
            OrcLayout::for_release(6, 4)
                .unwrap_err()
                .to_string()
                .contains("6.3 and later")
        );
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::unwind::testing::fuzz_cases(3000)))]

        /// Arbitrary section bytes parse or are refused, never panic; a parsed table's
        /// indexed lookups agree with a search of the whole table.
        #[test]
        fn arbitrary_sections_parse_or_are_refused_and_lookups_agree(
            ips in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            orc in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            base in proptest::prelude::any::<u64>(),
            probes in proptest::collection::vec(proptest::prelude::any::<u64>(), 16),
        ) {
            if let Ok(t) = OrcTable::parse(&ips, base, &orc, OrcLayout::V4_14) {
                for p in probes {
                    proptest::prop_assert_eq!(t.lookup(p), t.lookup_unindexed(p));
                }
            }
        }

        #[test]
        fn sorted_tables_index_like_a_full_search(
            mut offsets in proptest::collection::vec(0u32..0x4_0000, 1..300),
            probes in proptest::collection::vec(0u64..0x4_2000, 64),
        ) {
            offsets.sort_unstable();
            let base = 0xffff_ffff_8200_0000u64;
            let text = 0xffff_ffff_8100_0000u64;
            let ips: Vec<u8> = offsets
                .iter()
                .enumerate()
                .map(|(i, o)| ((text + u64::from(*o)) as i64 - (base + 4 * i as u64) as i64) as i32)
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let orc: Vec<u8> = offsets.iter().flat_map(|o| {
                let mut e = [0u8; 6];
                e[..4].copy_from_slice(&o.to_le_bytes());
                e
            }).collect();
            let t = OrcTable::parse(&ips, base, &orc, OrcLayout::V4_14).unwrap();
            for p in probes {
                let ip = text.wrapping_sub(0x1000) + p;
                proptest::prop_assert_eq!(t.lookup(ip), t.lookup_unindexed(ip));
            }
        }
    }
}
