//! Integrity of a guest kernel against its own state at an earlier time: which ranges of a
//! region (kernel text, read-only data) changed, which syscall table entries point outside
//! kernel text, which protection settings moved. Pure: the VMM reads the guest's memory and
//! registers and hands the bytes here.

/// The granule changes are found at: 64 bytes, a cache line.
pub const BLOCK: u64 = 64;

/// A region as it was: one hash per [`BLOCK`] of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionBaseline {
    /// What the region is (`text`, `rodata`), for reports.
    pub name: &'static str,
    /// Its first address.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
    hashes: Vec<u64>,
}

/// FNV-1a of `bytes` (as [`crate::engine::hash_guest_virtual`] hashes guest memory).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A range that differs from its baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedRange {
    /// Its first address (a block's).
    pub start: u64,
    /// Its length: whole blocks, cut at the region's end.
    pub len: u64,
}

/// Why two states of a region cannot be compared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The bytes given are not the region's length.
    #[error("{name}: {got} bytes given for a region of {want}")]
    Length {
        /// The region.
        name: &'static str,
        /// Bytes given.
        got: u64,
        /// The region's length.
        want: u64,
    },
}

impl RegionBaseline {
    /// The baseline of the region `name` at `start`, whose bytes are `bytes` now.
    pub fn new(name: &'static str, start: u64, bytes: &[u8]) -> RegionBaseline {
        RegionBaseline {
            name,
            start,
            len: bytes.len() as u64,
            hashes: bytes.chunks(BLOCK as usize).map(fnv1a).collect(),
        }
    }

    /// The ranges of `bytes` (the region now) whose blocks differ from the baseline,
    /// neighbouring blocks merged.
    pub fn changes(&self, bytes: &[u8]) -> Result<Vec<ChangedRange>, IntegrityError> {
        if bytes.len() as u64 != self.len {
            return Err(IntegrityError::Length {
                name: self.name,
                got: bytes.len() as u64,
                want: self.len,
            });
        }
        let mut out: Vec<ChangedRange> = Vec::new();
        for (i, (chunk, was)) in bytes.chunks(BLOCK as usize).zip(&self.hashes).enumerate() {
            if fnv1a(chunk) == *was {
                continue;
            }
            let start = self.start + i as u64 * BLOCK;
            let len = chunk.len() as u64;
            match out.last_mut() {
                Some(last) if last.start + last.len == start => last.len += len,
                _ => out.push(ChangedRange { start, len }),
            }
        }
        Ok(out)
    }
}

/// The entries of a syscall table (`entries`, little-endian pointers) that point outside
/// kernel text `[text_start, text_end)`: (index, value). A hooked table points into a module
/// or elsewhere. Zero entries at the end are the padding up to the next symbol (System.map
/// gives no sizes), not entries.
pub fn syscalls_outside_text(entries: &[u8], text: (u64, u64)) -> Vec<(usize, u64)> {
    let values: Vec<u64> = entries
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let len = values.iter().rposition(|&v| v != 0).map_or(0, |i| i + 1);
    values[..len]
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, v)| v < text.0 || v >= text.1)
        .collect()
}

/// A protection setting or table base that moved: its name, before, now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlChange {
    /// What (`CR0.WP`, `VBAR_EL1`).
    pub name: &'static str,
    /// At the baseline.
    pub before: u64,
    /// Now.
    pub now: u64,
}

/// The settings of `now` that differ from `before` (named the same; a name missing from
/// either is skipped).
pub fn control_changes(
    before: &[(&'static str, u64)],
    now: &[(&'static str, u64)],
) -> Vec<ControlChange> {
    now.iter()
        .filter_map(|&(name, v)| {
            let &(_, was) = before.iter().find(|(n, _)| *n == name)?;
            (was != v).then_some(ControlChange {
                name,
                before: was,
                now: v,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_blocks_are_found_and_merged() {
        let start = 0xffff_ffff_8100_0000;
        let mut bytes = vec![0x90u8; 1000];
        let base = RegionBaseline::new("text", start, &bytes);
        assert_eq!(base.changes(&bytes).unwrap(), vec![]);
        // One byte in block 1; two neighbouring blocks 4 and 5; the short last block.
        bytes[70] = 0xcc;
        bytes[300] = 0xcc;
        bytes[330] = 0xcc;
        bytes[999] = 0;
        let changes = base.changes(&bytes).unwrap();
        assert_eq!(
            changes,
            vec![
                ChangedRange {
                    start: start + 64,
                    len: 64
                },
                ChangedRange {
                    start: start + 256,
                    len: 128
                },
                ChangedRange {
                    start: start + 960,
                    len: 40
                },
            ]
        );
        assert!(base.changes(&bytes[..999]).is_err());
    }

    #[test]
    fn syscall_entries_outside_text_and_moved_settings_are_named() {
        let text = (0xffff_ffff_8100_0000, 0xffff_ffff_81e0_0000);
        let table: Vec<u8> = [
            0xffff_ffff_8100_1000u64,
            0xffff_ffff_c000_2000,
            text.1,
            0,
            0,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
        assert_eq!(
            syscalls_outside_text(&table, text),
            vec![(1, 0xffff_ffff_c000_2000), (2, text.1)]
        );
        let before = [("CR0.WP", 1), ("CR4.SMEP", 1), ("IDT base", 0x1000)];
        let now = [("CR0.WP", 0), ("CR4.SMEP", 1), ("IDT base", 0x1000)];
        assert_eq!(
            control_changes(&before, &now),
            vec![ControlChange {
                name: "CR0.WP",
                before: 1,
                now: 0
            }]
        );
    }
}
