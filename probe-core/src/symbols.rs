//! The guest kernel's symbols, from its System.map: `SYMBOL[+OFFSET]` and address probe
//! specifications resolved to kernel virtual addresses, and addresses turned back into
//! `symbol+offset` for output.

use std::collections::HashMap;

/// Errors reading System.map or resolving a probe location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SymbolError {
    /// A System.map line is not `ADDRESS TYPE NAME`.
    #[error("System.map line {line}: expected `ADDRESS TYPE NAME`, found {text:?}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// No symbol has this name.
    #[error("unknown symbol `{0}`")]
    Unknown(String),
    /// Several symbols share the name (static functions in different files).
    #[error("symbol `{name}` is ambiguous: it names {} addresses ({})", addrs.len(), addrs.iter().map(|a| format!("{a:#x}")).collect::<Vec<_>>().join(", "))]
    Ambiguous {
        /// The name.
        name: String,
        /// Every address it names.
        addrs: Vec<u64>,
    },
    /// The location is not `SYMBOL`, `SYMBOL+OFFSET` or an address.
    #[error("bad probe location `{0}`: expected SYMBOL, SYMBOL+OFFSET or 0xADDRESS")]
    BadLocation(String),
}

/// One System.map entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// Kernel virtual address (unrelocated: as linked, before any KASLR slide).
    pub addr: u64,
    /// The `nm` type letter (`t`/`T` for text).
    pub kind: char,
    /// The name.
    pub name: String,
}

impl Symbol {
    /// Whether the symbol is in a text section.
    pub fn is_text(&self) -> bool {
        matches!(self.kind, 't' | 'T' | 'w' | 'W')
    }
}

/// How kallsyms orders symbols that share an address (`compare_symbols` in
/// `scripts/kallsyms.c`), lowest first: strong before weak, then not a linker-script marker
/// (`__start_*`, `__stop_*`, `__end_*`, `__*_start`, `__*_end`), then fewer leading
/// underscores; ties keep `nm -n` order (by name), which System.map has too. The kernel's
/// lookups (`get_symbol_pos`) name the first: `__do_sys_getpid`, not its `__ia32_sys_*` /
/// `__x64_sys_*` aliases; arm64's `__memset`, not `__pi_memset` or the weak `memset`.
fn kallsyms_rank(s: &Symbol) -> (bool, bool, usize) {
    let n = s.name.as_str();
    let marker = n.len() >= 8
        && n.starts_with("__")
        && (n[2..].starts_with("start_")
            || n[2..].starts_with("stop_")
            || n[2..].starts_with("end_")
            || n.ends_with("_start")
            || n.ends_with("_end"));
    (
        matches!(s.kind, 'w' | 'W'),
        marker,
        n.len() - n.trim_start_matches('_').len(),
    )
}

/// The kernel's symbol table, searchable by name and by address.
#[derive(Debug, Clone, Default)]
pub struct SymbolMap {
    by_addr: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
}

impl SymbolMap {
    /// Every symbol, in address order.
    pub fn symbols(&self) -> &[Symbol] {
        &self.by_addr
    }

    /// Parses System.map text.
    pub fn parse(text: &str) -> Result<SymbolMap, SymbolError> {
        let mut symbols = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = || SymbolError::BadLine {
                line: i + 1,
                text: line.to_string(),
            };
            let mut parts = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(bad());
            };
            let addr = u64::from_str_radix(addr, 16).map_err(|_| bad())?;
            let mut kind_chars = kind.chars();
            let (Some(kind), None) = (kind_chars.next(), kind_chars.next()) else {
                return Err(bad());
            };
            symbols.push(Symbol {
                addr,
                kind,
                name: name.to_string(),
            });
        }
        // Aliases (symbols at one address) in the order kallsyms prefers them, best first
        // (a stable sort: System.map order within a rank).
        symbols.sort_by_key(|s| (s.addr, kallsyms_rank(s)));
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in symbols.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        Ok(SymbolMap {
            by_addr: symbols,
            by_name,
        })
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// Whether the map is empty (the image package's placeholder System.map is).
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// The one symbol called `name`.
    pub fn lookup(&self, name: &str) -> Result<&Symbol, SymbolError> {
        match self.by_name.get(name).map(Vec::as_slice) {
            None | Some([]) => Err(SymbolError::Unknown(name.to_string())),
            Some([one]) => Ok(&self.by_addr[*one]),
            Some(many) => Err(SymbolError::Ambiguous {
                name: name.to_string(),
                addrs: many.iter().map(|i| self.by_addr[*i].addr).collect(),
            }),
        }
    }

    /// Resolves `SYMBOL`, `SYMBOL+OFFSET` (decimal or 0x-hex) or `0xADDRESS` to an address and
    /// the symbol it falls in.
    pub fn resolve(&self, location: &str) -> Result<(u64, Option<&Symbol>), SymbolError> {
        let bad = || SymbolError::BadLocation(location.to_string());
        let parse_num = |s: &str| match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        };
        if location.starts_with("0x") || location.starts_with("0X") {
            let addr = parse_num(location).ok_or_else(bad)?;
            return Ok((addr, self.containing(addr).map(|(s, _)| s)));
        }
        let (name, offset) = match location.split_once('+') {
            Some((n, off)) => (n, parse_num(off).ok_or_else(bad)?),
            None => (location, 0),
        };
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(bad());
        }
        let sym = self.lookup(name)?;
        Ok((sym.addr.checked_add(offset).ok_or_else(bad)?, Some(sym)))
    }

    /// The symbol `addr` falls in (the last address at or below it; of several symbols
    /// there, a function rather than a section marker, as kallsyms names it, so that
    /// addresses read as the guest's own traces read) and the offset into it.
    pub fn containing(&self, addr: u64) -> Option<(&Symbol, u64)> {
        let idx = self.by_addr.partition_point(|s| s.addr <= addr);
        let at = self.by_addr.get(idx.checked_sub(1)?)?.addr;
        let sym = &self.by_addr[self.by_addr.partition_point(|s| s.addr < at)];
        Some((sym, addr - sym.addr))
    }

    /// The size of `sym`: the distance to the next symbol at a higher address.
    pub fn size_of(&self, sym: &Symbol) -> Option<u64> {
        let idx = self.by_addr.partition_point(|s| s.addr <= sym.addr);
        self.by_addr.get(idx).map(|next| next.addr - sym.addr)
    }

    /// `symbol+0xoffset` for `addr`, or the bare address when no symbol covers it.
    pub fn describe(&self, addr: u64) -> String {
        match self.containing(addr) {
            Some((s, 0)) => s.name.clone(),
            Some((s, off)) => format!("{}+{off:#x}", s.name),
            None => format!("{addr:#x}"),
        }
    }
}

/// Kernel text that does not run at the address its symbols give, so a breakpoint written
/// there would trap at an address hvprobe does not know (or in a context that cannot take
/// it): each range by the System.map symbols that bound it, its section, and why.
pub const RELOCATED_TEXT: &[RelocatedText] = &[
    RelocatedText {
        start: "__idmap_text_start",
        end: "__idmap_text_end",
        section: ".idmap.text",
        why: "it runs from the identity map (secondary CPU bring-up, suspend and resume), at its physical address, with the MMU being switched",
    },
    RelocatedText {
        start: "__entry_tramp_text_start",
        end: "__entry_tramp_text_end",
        section: ".entry.tramp.text",
        why: "it is the KPTI trampoline, which runs from its fixmap alias",
    },
    RelocatedText {
        start: "__hyp_idmap_text_start",
        end: "__hyp_idmap_text_end",
        section: ".hyp.idmap.text",
        why: "it is hypervisor code, which runs at EL2 from its own mapping",
    },
    RelocatedText {
        start: "__hyp_text_start",
        end: "__hyp_text_end",
        section: ".hyp.text",
        why: "it is hypervisor code, which runs at EL2 from its own mapping",
    },
    RelocatedText {
        start: "__hibernate_exit_text_start",
        end: "__hibernate_exit_text_end",
        section: ".hibernate_exit.text",
        why: "it is copied to a safe page and run there when resuming from hibernation",
    },
    RelocatedText {
        start: "__relocate_new_kernel_start",
        end: "__relocate_new_kernel_end",
        section: ".kexec_relocate.text",
        why: "it is copied to a control page and run there by kexec",
    },
];

/// One range of [`RELOCATED_TEXT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelocatedText {
    /// The symbol at its start.
    pub start: &'static str,
    /// The symbol at its end (exclusive).
    pub end: &'static str,
    /// The linker section.
    pub section: &'static str,
    /// Why a probe cannot go there.
    pub why: &'static str,
}

impl SymbolMap {
    /// The range of [`RELOCATED_TEXT`] that `addr` lies in, if this kernel has one there.
    pub fn relocated_text(&self, addr: u64) -> Option<&'static RelocatedText> {
        RELOCATED_TEXT.iter().find(|r| {
            matches!(
                (self.lookup(r.start), self.lookup(r.end)),
                (Ok(s), Ok(e)) if (s.addr..e.addr).contains(&addr)
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff810c5a40 T __x64_sys_getpid
ffffffff810c5a60 T __ia32_sys_getpid
ffffffff81200000 t helper
ffffffff81300000 t helper
ffffffff82000000 D _etext
";

    #[test]
    fn resolves_names_offsets_and_addresses() {
        let m = SymbolMap::parse(MAP).unwrap();
        assert_eq!(m.len(), 7);
        let (addr, sym) = m.resolve("__x64_sys_getpid").unwrap();
        assert_eq!(addr, 0xffffffff810c5a40);
        assert_eq!(sym.unwrap().name, "__x64_sys_getpid");
        assert_eq!(
            m.resolve("__x64_sys_getpid+4").unwrap().0,
            0xffffffff810c5a44
        );
        assert_eq!(
            m.resolve("__x64_sys_getpid+0x10").unwrap().0,
            0xffffffff810c5a50
        );
        let (addr, sym) = m.resolve("0xffffffff810c5a48").unwrap();
        assert_eq!(addr, 0xffffffff810c5a48);
        assert_eq!(sym.unwrap().name, "__x64_sys_getpid");
        assert_eq!(m.describe(0xffffffff810c5a48), "__x64_sys_getpid+0x8");
        assert_eq!(m.describe(0xffffffff810c5a60), "__ia32_sys_getpid");
        assert_eq!(m.describe(0x1000), "0x1000");
        let getpid = m.lookup("__x64_sys_getpid").unwrap();
        assert_eq!(m.size_of(getpid), Some(0x20));
        assert!(getpid.is_text());
    }

    #[test]
    fn errors_name_the_problem() {
        let m = SymbolMap::parse(MAP).unwrap();
        assert_eq!(
            m.resolve("no_such_fn").unwrap_err(),
            SymbolError::Unknown("no_such_fn".into())
        );
        let amb = m.resolve("helper").unwrap_err();
        assert!(matches!(amb, SymbolError::Ambiguous { ref addrs, .. } if addrs.len() == 2));
        assert!(amb.to_string().contains("0xffffffff81300000"));
        assert!(matches!(
            m.resolve("__x64_sys_getpid+zz"),
            Err(SymbolError::BadLocation(_))
        ));
        assert!(matches!(
            SymbolMap::parse("ffffffff81000000 T\n"),
            Err(SymbolError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            SymbolMap::parse("zzzz T name\n"),
            Err(SymbolError::BadLine { line: 1, .. })
        ));
    }

    #[test]
    fn text_that_runs_elsewhere_is_named_by_its_section() {
        let map = SymbolMap::parse(
            "ffff800008010000 T _stext\n\
             ffff800008bd2000 T __idmap_text_start\n\
             ffff800008bd22d4 t secondary_startup\n\
             ffff800008bd2930 T __idmap_text_end\n\
             ffff800009388000 T __entry_tramp_text_start\n\
             ffff80000938b000 T __entry_tramp_text_end\n",
        )
        .unwrap();
        let at = |a: u64| map.relocated_text(a).map(|r| r.section);
        assert_eq!(at(0xffff_8000_08bd_22d4), Some(".idmap.text"));
        assert_eq!(at(0xffff_8000_0938_8010), Some(".entry.tramp.text"));
        // The ends are exclusive; ordinary text and a kernel without the symbols are not.
        assert_eq!(at(0xffff_8000_08bd_2930), None);
        assert_eq!(at(0xffff_8000_0801_0000), None);
        let x86 = SymbolMap::parse("ffffffff81000000 T _stext\n").unwrap();
        assert_eq!(x86.relocated_text(0xffff_ffff_8100_0000), None);
    }
}

#[cfg(test)]
mod alias_tests {
    use super::*;

    #[test]
    fn aliases_are_named_as_kallsyms_names_them() {
        let map = SymbolMap::parse(
            "ffff800008010000 T __softirqentry_text_start\n\
             ffff800008010000 T __do_softirq\n\
             ffff800008010100 W weak_one\n\
             ffff800008010100 T strong_one\n\
             ffff800008010200 t __do_sys_getpid\n\
             ffff800008010200 T __ia32_sys_getpid\n\
             ffff800008010200 T __x64_sys_getpid\n\
             ffff800008010300 T next\n",
        )
        .unwrap();
        assert_eq!(map.describe(0xffff_8000_0801_001c), "__do_softirq+0x1c");
        assert_eq!(map.describe(0xffff_8000_0801_0104), "strong_one+0x4");
        // The guest's own traces name these as below (checked against ftrace's output on the
        // Debian kernels: `(__do_sys_getpid+0x0/0x30)`, `__memset+0x16c/0x188`).
        assert_eq!(map.describe(0xffff_8000_0801_0201), "__do_sys_getpid+0x1");
        let arm64 = SymbolMap::parse(
            "ffff800008b72a80 T __memset\n\
             ffff800008b72a80 T __pi_memset\n\
             ffff800008b72a80 W memset\n\
             ffff800008b72c08 T __pi_strchr\n\
             ffff800008b72c08 W strchr\n\
             ffff800008b72d00 T __b\n\
             ffff800008b72d00 T _a\n",
        )
        .unwrap();
        assert_eq!(arm64.describe(0xffff_8000_08b7_2bec), "__memset+0x16c");
        assert_eq!(arm64.describe(0xffff_8000_08b7_2c0c), "__pi_strchr+0x4");
        // Fewer leading underscores first, whatever the file order.
        assert_eq!(arm64.describe(0xffff_8000_08b7_2d00), "_a");
        let s = map.lookup("strong_one").unwrap();
        assert_eq!(map.size_of(s), Some(0x100));
    }
}
