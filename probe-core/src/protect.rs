//! Write-protected regions of guest kernel memory (`--protect`): what a region is called on the
//! command line (`text`, `rodata`, `SYMBOL[+OFF][:LEN]`, each with `:allow` or `:deny`), where
//! it is in System.map, which kernel memory no region may cover, and how the guest's RAM is
//! cut into KVM memslots so that the pages holding the regions are read-only to the guest.
//! Pure: the VMM makes the memslots and hands every write to a protected page to the engine
//! ([`crate::engine::ProbeEngine::protected_write`]).

use crate::symbols::SymbolMap;

/// The page size protection works in: a memslot's granule (4 KiB on both architectures'
/// hosts).
pub const PAGE: u64 = 4096;

/// What happens to a write to protected bytes once it is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ProtectAction {
    /// The write is completed exactly as the guest made it (the default).
    #[default]
    Allow,
    /// The write is dropped: the guest continues past the store with memory unchanged.
    Deny,
}

impl ProtectAction {
    /// The command line's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtectAction::Allow => "allow",
            ProtectAction::Deny => "deny",
        }
    }
}

/// A protected region as the engine plants it: `len` bytes from the target address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProtectSpec {
    /// Bytes protected.
    pub len: u64,
    /// What a write to them gets.
    pub action: ProtectAction,
}

/// Which memory a `--protect` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionName {
    /// Kernel text, `_stext` to `_etext`.
    Text,
    /// Read-only data, `__start_rodata` to `__end_rodata` (the syscall table, exception
    /// tables and, on x86, the data made read-only after init).
    Rodata,
    /// `SYMBOL[+OFF][:LEN]`: `LEN` bytes (default: to the next symbol).
    Symbol {
        /// The symbol.
        name: String,
        /// Bytes into it.
        offset: u64,
        /// Bytes protected, when given.
        len: Option<u64>,
    },
}

/// One `--protect` as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectRequest {
    /// The text the user gave.
    pub spec: String,
    /// The memory.
    pub region: RegionName,
    /// What writes to it get.
    pub action: ProtectAction,
}

/// Why a `--protect` is refused. Nothing in the guest has changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtectError {
    /// The text does not parse.
    #[error(
        "--protect {spec}: {reason} (expected text, rodata or SYMBOL[+OFF][:LEN], then :allow or :deny)"
    )]
    Syntax {
        /// The text given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A symbol System.map does not list.
    #[error("--protect {spec}: no symbol `{name}` in System.map")]
    UnknownSymbol {
        /// The text given.
        spec: String,
        /// The symbol.
        name: String,
    },
    /// The region has no bytes, or runs past the end of the address space.
    #[error("--protect {spec}: the region is empty or wraps around")]
    Empty {
        /// The text given.
        spec: String,
    },
    /// Two regions share bytes.
    #[error("--protect {first} and --protect {second} overlap")]
    Overlap {
        /// The earlier region.
        first: String,
        /// The later one.
        second: String,
    },
    /// The region's pages hold memory that must stay writable to the guest.
    #[error(
        "--protect {spec}: its pages hold {symbol} ({why}), which must stay writable to the guest"
    )]
    Refused {
        /// The text given.
        spec: String,
        /// The symbol in the way.
        symbol: String,
        /// What it is.
        why: &'static str,
    },
}

fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

impl ProtectRequest {
    /// Parses `text`, `rodata` or `SYMBOL[+OFF][:LEN]`, each optionally followed by `:allow`
    /// (the default) or `:deny`.
    pub fn parse(spec: &str) -> Result<ProtectRequest, ProtectError> {
        let syntax = |reason: &str| ProtectError::Syntax {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let mut parts: Vec<&str> = spec.trim().split(':').collect();
        let action = match parts.last().copied() {
            Some("allow") => Some(ProtectAction::Allow),
            Some("deny") => Some(ProtectAction::Deny),
            _ => None,
        };
        if action.is_some() {
            parts.pop();
        }
        let action = action.unwrap_or_default();
        let region = match parts[..] {
            [""] | [] => return Err(syntax("no region given")),
            ["text"] => RegionName::Text,
            ["rodata"] => RegionName::Rodata,
            ["text" | "rodata", _] => return Err(syntax("text and rodata take no length")),
            [place] | [place, _] => {
                let (name, offset) = match place.split_once('+') {
                    Some((n, off)) => (
                        n,
                        parse_number(off).ok_or_else(|| syntax("the offset is not a number"))?,
                    ),
                    None => (place, 0),
                };
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                {
                    return Err(syntax("not a symbol name"));
                }
                let len = match parts.get(1) {
                    Some(l) => Some(
                        parse_number(l)
                            .filter(|&n| n > 0)
                            .ok_or_else(|| syntax("the length is not a positive number"))?,
                    ),
                    None => None,
                };
                RegionName::Symbol {
                    name: name.to_string(),
                    offset,
                    len,
                }
            }
            _ => return Err(syntax("too many fields")),
        };
        Ok(ProtectRequest {
            spec: spec.trim().to_string(),
            region,
            action,
        })
    }

    /// The region's bytes in System.map's addresses: (start, length).
    pub fn resolve(&self, map: &SymbolMap) -> Result<(u64, u64), ProtectError> {
        let lookup = |name: &str| {
            map.lookup(name)
                .map_err(|_| ProtectError::UnknownSymbol {
                    spec: self.spec.clone(),
                    name: name.to_string(),
                })
                .map(|s| s.addr)
        };
        let empty = || ProtectError::Empty {
            spec: self.spec.clone(),
        };
        let (start, end) = match &self.region {
            RegionName::Text => (lookup("_stext")?, lookup("_etext")?),
            RegionName::Rodata => (lookup("__start_rodata")?, lookup("__end_rodata")?),
            RegionName::Symbol { name, offset, len } => {
                let sym = map.lookup(name).map_err(|_| ProtectError::UnknownSymbol {
                    spec: self.spec.clone(),
                    name: name.clone(),
                })?;
                let start = sym.addr.checked_add(*offset).ok_or_else(empty)?;
                let len = match len {
                    Some(l) => *l,
                    None => map
                        .size_of(sym)
                        .and_then(|s| s.checked_sub(*offset))
                        .ok_or_else(empty)?,
                };
                (start, start.checked_add(len).ok_or_else(empty)?)
            }
        };
        if end <= start {
            return Err(empty());
        }
        Ok((start, end - start))
    }
}

/// The pages `[start, start + len)` touches, as a page-aligned range.
pub fn page_span(start: u64, len: u64) -> (u64, u64) {
    let first = start & !(PAGE - 1);
    let end = start.saturating_add(len).saturating_add(PAGE - 1) & !(PAGE - 1);
    (first, end)
}

/// The first pair of `regions` (name, start, length) that share a byte, by name.
pub fn overlap(regions: &[(String, u64, u64)]) -> Option<(&str, &str)> {
    for (i, (a, sa, la)) in regions.iter().enumerate() {
        for (b, sb, lb) in &regions[i + 1..] {
            if sa < &(sb + lb) && sb < &(sa + la) {
                return Some((a, b));
            }
        }
    }
    None
}

/// Kernel memory whose pages no region may cover, by System.map symbol, with what it is:
/// page tables (the CPU's walker, and QEMU's under the emulated runner, writes or probes
/// them for write access; a read-only table makes every walk a fault KVM cannot emulate) and
/// pages the host itself writes into the guest (kvmclock).
pub const REFUSED_SYMBOLS: &[(&str, &str)] = &[
    ("init_top_pgt", "the kernel's page tables"),
    ("level4_kernel_pgt", "the kernel's page tables"),
    ("level3_kernel_pgt", "the kernel's page tables"),
    ("level2_kernel_pgt", "the kernel's page tables"),
    ("level2_fixmap_pgt", "the kernel's page tables"),
    ("level1_fixmap_pgt", "the kernel's page tables"),
    ("early_top_pgt", "the kernel's page tables"),
    ("early_dynamic_pgts", "the kernel's page tables"),
    ("idmap_pg_dir", "the kernel's page tables"),
    ("tramp_pg_dir", "the kernel's page tables"),
    ("reserved_pg_dir", "the kernel's page tables"),
    ("swapper_pg_dir", "the kernel's page tables"),
    ("init_pg_dir", "the kernel's page tables"),
    ("init_idmap_pg_dir", "the kernel's page tables"),
    ("bm_pud", "the fixmap's page tables"),
    ("bm_pmd", "the fixmap's page tables"),
    ("bm_pte", "the fixmap's page tables"),
    ("hv_clock_boot", "the kvmclock pages the host writes"),
];

/// The first of [`REFUSED_SYMBOLS`] in `map` whose pages the pages of `[start, start + len)`
/// share (System.map's addresses both).
pub fn refused_overlap(
    map: &SymbolMap,
    start: u64,
    len: u64,
) -> Option<(&'static str, &'static str)> {
    let (first, end) = page_span(start, len);
    REFUSED_SYMBOLS.iter().copied().find(|(name, _)| {
        map.lookup(name).is_ok_and(|s| {
            let size = map.size_of(s).unwrap_or(PAGE).max(1);
            let (sf, se) = page_span(s.addr, size);
            sf < end && first < se
        })
    })
}

/// The guest kernel's own text patchers, by function: alternatives, jump labels and static
/// calls, ftrace, kprobes, BPF trampolines (x86 `text_poke*`, arm64 `aarch64_insn_patch_text*`
/// and their callers). A write to protected text from one of them is the kernel's own doing.
pub const TEXT_PATCHERS: &[&str] = &[
    // What asked for the patch (the outer callers): named first when on the stack.
    "arch_arm_kprobe",
    "arch_disarm_kprobe",
    "arch_optimize_kprobes",
    "arch_unoptimize_kprobes",
    "arch_unoptimize_kprobe",
    "arch_jump_label_transform",
    "arch_jump_label_transform_queue",
    "arch_jump_label_transform_apply",
    "arch_static_call_transform",
    "ftrace_modify_all_code",
    "ftrace_replace_code",
    "ftrace_modify_code",
    "ftrace_modify_code_direct",
    "ftrace_update_ftrace_func",
    "ftrace_make_call",
    "ftrace_make_nop",
    "apply_alternatives",
    "bpf_arch_text_poke",
    "bpf_arch_text_copy",
    // The patching mechanism itself.
    "text_poke_bp_batch",
    "text_poke_bp",
    "text_poke_finish",
    "text_poke_queue",
    "text_poke_copy",
    "text_poke_set",
    "text_poke",
    "text_poke_kgdb",
    "__text_poke",
    "text_poke_early",
    "aarch64_insn_patch_text",
    "aarch64_insn_patch_text_cb",
    "patch_alternative",
    "__apply_alternatives",
    "aarch64_insn_patch_text_nosync",
    "aarch64_insn_write",
    "__aarch64_insn_write",
    "aarch64_insn_copy",
    "aarch64_insn_set",
];

/// The function of a symbolized stack frame (`name+0xoff/0xsize`, or `name`).
pub fn frame_function(frame: &str) -> &str {
    frame.split(['+', '/']).next().unwrap_or(frame)
}

/// The text patcher among `frames` (innermost first): the outermost frame that is one of
/// [`TEXT_PATCHERS`], which says what the patch is for.
pub fn text_patcher<'a>(frames: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    frames
        .into_iter()
        .map(frame_function)
        .filter(|f| TEXT_PATCHERS.contains(f))
        .last()
}

/// One memslot of guest RAM after protection: `len` bytes at `gpa`, read-only or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotPiece {
    /// Its first guest physical address.
    pub gpa: u64,
    /// Its length.
    pub len: u64,
    /// Whether the guest may only read it.
    pub readonly: bool,
}

/// The memslots a RAM region `[gpa, gpa + len)` becomes when the page ranges `protected`
/// (page-aligned, any order, may touch or overlap each other or lie outside the region) are
/// read-only: alternating pieces covering the region exactly, neighbours merged.
pub fn slot_layout(gpa: u64, len: u64, protected: &[(u64, u64)]) -> Vec<SlotPiece> {
    let end = gpa + len;
    let mut ranges: Vec<(u64, u64)> = protected
        .iter()
        .map(|&(s, e)| (s.max(gpa), e.min(end)))
        .filter(|(s, e)| s < e)
        .collect();
    ranges.sort_unstable();
    // Overlapping and touching ranges become one.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut out = Vec::new();
    let mut at = gpa;
    for (s, e) in merged {
        if s > at {
            out.push(SlotPiece {
                gpa: at,
                len: s - at,
                readonly: false,
            });
        }
        out.push(SlotPiece {
            gpa: s,
            len: e - s,
            readonly: true,
        });
        at = e;
    }
    if end > at {
        out.push(SlotPiece {
            gpa: at,
            len: end - at,
            readonly: false,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> SymbolMap {
        SymbolMap::parse(
            "ffffffff81000000 T _stext\n\
             ffffffff81e01ef2 T _etext\n\
             ffffffff82000000 D __start_rodata\n\
             ffffffff82827000 D __end_rodata\n\
             ffffffff82a10000 D init_top_pgt\n\
             ffffffff82a14000 D level4_kernel_pgt\n\
             ffffffff82a15000 D level3_kernel_pgt\n\
             ffffffff82a16000 D some_data\n\
             ffffffff82a5a640 D modprobe_path\n\
             ffffffff82a5a740 D other_var\n\
             ffffffff82a5b000 D far_var\n",
        )
        .unwrap()
    }

    #[test]
    fn regions_parse_with_their_actions_and_bad_ones_are_named() {
        let p = ProtectRequest::parse("modprobe_path:deny").unwrap();
        assert_eq!(p.action, ProtectAction::Deny);
        assert_eq!(
            p.region,
            RegionName::Symbol {
                name: "modprobe_path".into(),
                offset: 0,
                len: None
            }
        );
        let p = ProtectRequest::parse("modprobe_path+0x10:8").unwrap();
        assert_eq!(p.action, ProtectAction::Allow);
        assert_eq!(
            p.region,
            RegionName::Symbol {
                name: "modprobe_path".into(),
                offset: 16,
                len: Some(8)
            }
        );
        assert_eq!(
            ProtectRequest::parse("text").unwrap().region,
            RegionName::Text
        );
        assert_eq!(
            ProtectRequest::parse("rodata:allow").unwrap().region,
            RegionName::Rodata
        );
        for bad in [
            "",
            "text:8",
            "x:0",
            "x:y",
            "x+z",
            "a b",
            "x:8:deny:1",
            ":deny",
        ] {
            let e = ProtectRequest::parse(bad).unwrap_err();
            assert!(matches!(e, ProtectError::Syntax { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("--protect"), "{e}");
        }
    }

    #[test]
    fn regions_resolve_to_their_bytes_and_unknown_symbols_are_named() {
        let m = map();
        let r = |s: &str| ProtectRequest::parse(s).unwrap().resolve(&m);
        assert_eq!(r("text"), Ok((0xffffffff81000000, 0xe01ef2)));
        assert_eq!(r("rodata"), Ok((0xffffffff82000000, 0x827000)));
        assert_eq!(r("modprobe_path"), Ok((0xffffffff82a5a640, 0x100)));
        assert_eq!(r("modprobe_path+8:4"), Ok((0xffffffff82a5a648, 4)));
        assert!(matches!(
            r("modprobe_path+0x100"),
            Err(ProtectError::Empty { .. })
        ));
        let e = r("nope:deny").unwrap_err();
        assert!(e.to_string().contains("no symbol `nope`"), "{e}");
    }

    #[test]
    fn page_tables_are_refused_and_overlaps_found() {
        let m = map();
        assert_eq!(refused_overlap(&m, 0xffffffff82a5a640, 0x100), None);
        // The page of level4_kernel_pgt: refused, named.
        assert_eq!(
            refused_overlap(&m, 0xffffffff82a14ff8, 8).map(|r| r.0),
            Some("level4_kernel_pgt")
        );
        let regions = vec![
            ("a".to_string(), 100, 10),
            ("b".to_string(), 110, 10),
            ("c".to_string(), 119, 1),
        ];
        assert_eq!(overlap(&regions), Some(("b", "c")));
        assert_eq!(overlap(&regions[..2]), None);
    }

    #[test]
    fn the_outermost_text_patcher_on_a_stack_names_the_write() {
        let frames = [
            "memcpy+0x12/0x20",
            "__text_poke+0x1f0/0x3a0",
            "text_poke_bp_batch+0x80/0x2b0",
            "arch_arm_kprobe+0x2a/0x40",
            "register_kprobe+0x4f0/0x5a0",
        ];
        assert_eq!(text_patcher(frames), Some("arch_arm_kprobe"));
        assert_eq!(
            text_patcher(["proc_dostring+0xb1/0x1f0", "vfs_write+0xc4/0x3a0"]),
            None
        );
        assert_eq!(frame_function("text_poke"), "text_poke");
    }

    #[test]
    fn ram_is_cut_into_alternating_slots_covering_it_exactly() {
        let ro = |gpa, len| SlotPiece {
            gpa,
            len,
            readonly: true,
        };
        let rw = |gpa, len| SlotPiece {
            gpa,
            len,
            readonly: false,
        };
        assert_eq!(slot_layout(0, 0x10000, &[]), vec![rw(0, 0x10000)]);
        assert_eq!(
            slot_layout(0, 0x10000, &[(0x3000, 0x5000), (0x1000, 0x2000)]),
            vec![
                rw(0, 0x1000),
                ro(0x1000, 0x1000),
                rw(0x2000, 0x1000),
                ro(0x3000, 0x2000),
                rw(0x5000, 0xb000)
            ]
        );
        // Touching and overlapping ranges merge; ranges outside are cut away.
        assert_eq!(
            slot_layout(
                0x1000,
                0x4000,
                &[
                    (0, 0x2000),
                    (0x2000, 0x3000),
                    (0x2800, 0x3000),
                    (0x9000, 0xa000)
                ]
            ),
            vec![ro(0x1000, 0x2000), rw(0x3000, 0x2000)]
        );
        assert_eq!(slot_layout(0, 0x2000, &[(0, 0x2000)]), vec![ro(0, 0x2000)]);
        // Every layout covers the region once, with no gap.
        let pieces = slot_layout(
            0x10_0000,
            0x40_0000,
            &[(0x20_0000, 0x20_1000), (0x3f_f000, 0x60_0000)],
        );
        let mut at = 0x10_0000;
        for p in &pieces {
            assert_eq!(p.gpa, at);
            at += p.len;
        }
        assert_eq!(at, 0x50_0000);
    }
}
