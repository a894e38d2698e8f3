//! Which kernel functions there are to probe, and what a probe on each meets: a glob over
//! System.map's text symbols (`vfs_*`, as `bpftrace -l 'kprobe:vfs_*'` and `perf probe
//! --funcs` list them), the functions the guest's own kprobes refuse (its `NOKPROBE_SYMBOL`
//! blacklist, read from vmlinux, and the text areas kprobes never probe), and the text hvprobe
//! refuses itself ([`SymbolMap::relocated_text`]). Read from the guest's files, before or
//! while it runs.

use std::collections::HashSet;

use crate::symbols::{Symbol, SymbolMap};

/// Whether `name` matches `pattern`: `*` any run of characters, `?` any one, anything else
/// itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point for the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether `location` is a glob rather than one location.
pub fn is_glob(location: &str) -> bool {
    location.contains(['*', '?'])
}

/// Text areas the guest's kprobes never probe (Linux's `kprobe_add_area_blacklist` calls and
/// x86's `arch_populate_kprobe_blacklist`), by the System.map symbols that bound them.
const KPROBE_AREAS: &[(&str, &str, &str)] = &[
    (
        "__kprobes_text_start",
        "__kprobes_text_end",
        ".kprobes.text",
    ),
    (
        "__noinstr_text_start",
        "__noinstr_text_end",
        ".noinstr.text",
    ),
    ("__entry_text_start", "__entry_text_end", ".entry.text"),
    (
        "__irqentry_text_start",
        "__irqentry_text_end",
        ".irqentry.text",
    ),
    (
        "__softirqentry_text_start",
        "__softirqentry_text_end",
        ".softirqentry.text",
    ),
];

/// What the guest's own kprobes refuse: the `NOKPROBE_SYMBOL` functions (the
/// `_kprobe_blacklist` array between `__start_kprobe_blacklist` and `__stop_kprobe_blacklist`,
/// read from vmlinux: the kernel frees it after boot) and [`KPROBE_AREAS`].
#[derive(Debug, Default)]
pub struct KprobeBlacklist {
    functions: HashSet<u64>,
    areas: Vec<(u64, u64, &'static str)>,
}

impl KprobeBlacklist {
    /// The blacklist of the kernel of `map`, its array read through `read` (a vmlinux's
    /// words at a linked address, relocated: [`crate::elf::relocated_words`]); without
    /// `read`, the areas only.
    pub fn from_kernel(
        map: &SymbolMap,
        read: Option<&dyn Fn(u64, usize) -> Option<Vec<u64>>>,
    ) -> KprobeBlacklist {
        let addr = |s: &str| map.lookup(s).ok().map(|s| s.addr);
        let functions = match (
            read,
            addr("__start_kprobe_blacklist"),
            addr("__stop_kprobe_blacklist"),
        ) {
            (Some(read), Some(start), Some(stop)) if stop > start => {
                read(start, ((stop - start) / 8) as usize)
                    .map(|words| words.into_iter().filter(|w| *w != 0).collect())
                    .unwrap_or_default()
            }
            _ => HashSet::new(),
        };
        let areas = KPROBE_AREAS
            .iter()
            .filter_map(|(s, e, section)| Some((addr(s)?, addr(e)?, *section)))
            .collect();
        KprobeBlacklist { functions, areas }
    }

    /// The `NOKPROBE_SYMBOL` function addresses, to carry them where vmlinux is not.
    pub fn function_addresses(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.functions.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// The blacklist of `map`'s kernel with `functions` as its `NOKPROBE_SYMBOL` addresses.
    pub fn with_functions(map: &SymbolMap, functions: &[u64]) -> KprobeBlacklist {
        let mut bl = KprobeBlacklist::from_kernel(map, None);
        bl.functions = functions.iter().copied().collect();
        bl
    }

    /// How many `NOKPROBE_SYMBOL` functions it lists.
    pub fn functions(&self) -> usize {
        self.functions.len()
    }

    /// Why the guest's kprobes refuse a probe in the function at `addr`, if they do.
    pub fn refusal(&self, addr: u64) -> Option<String> {
        if self.functions.contains(&addr) {
            return Some("NOKPROBE_SYMBOL (the kprobe blacklist)".into());
        }
        self.areas
            .iter()
            .find(|(s, e, _)| (*s..*e).contains(&addr))
            .map(|(_, _, section)| format!("in {section}"))
    }
}

/// One function as a listing shows it (`hvprobe list`, the API's `GET /functions`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionInfo {
    /// Its name.
    pub name: String,
    /// Its address as linked (System.map's, before any KASLR slide).
    pub address: u64,
    /// Its size (to the next symbol), where known.
    pub size: Option<u64>,
    /// Why the guest's own kprobes refuse it, if they do.
    pub guest_kprobes_refuse: Option<String>,
    /// Why hvprobe refuses it, if it does.
    pub hvprobe_refuses: Option<String>,
}

/// The text functions of `map` whose names match `pattern`, in address order, once each
/// (a name that several static functions share is listed at each address).
pub fn functions<'a>(
    map: &'a SymbolMap,
    pattern: &'a str,
    blacklist: &'a KprobeBlacklist,
) -> impl Iterator<Item = FunctionInfo> + 'a {
    map.symbols()
        .iter()
        .filter(move |s| s.is_text() && glob_match(pattern, &s.name))
        .map(move |s: &Symbol| FunctionInfo {
            name: s.name.clone(),
            address: s.addr,
            size: map.size_of(s),
            guest_kprobes_refuse: blacklist.refusal(s.addr),
            hvprobe_refuses: map
                .relocated_text(s.addr)
                .map(|r| format!("in {}: {}", r.section, r.why)),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_the_shell_and_bpftrace_do() {
        for (p, n, want) in [
            ("vfs_*", "vfs_read", true),
            ("vfs_*", "do_vfs_read", false),
            ("*read", "vfs_read", true),
            ("v?s_read", "vfs_read", true),
            ("*_sys_*pid", "__x64_sys_getpid", true),
            ("*", "", true),
            ("a*b*c", "abxbyc", true),
            ("a*b*c", "abxbyd", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_match(p, n), want, "{p} {n}");
        }
        assert!(is_glob("vfs_*") && !is_glob("vfs_read+0x4"));
    }

    #[test]
    fn the_blacklist_names_functions_and_areas() {
        let map = SymbolMap::parse(
            "ffffffff81000000 T _text\n\
             ffffffff81000100 T vfs_read\n\
             ffffffff81000200 T do_int3\n\
             ffffffff81000300 T __noinstr_text_start\n\
             ffffffff81000300 T exc_page_fault\n\
             ffffffff81000400 T __noinstr_text_end\n\
             ffffffff81000500 T vfs_write\n\
             ffffffff82000000 D __start_kprobe_blacklist\n\
             ffffffff82000008 D __stop_kprobe_blacklist\n",
        )
        .unwrap();
        let read = |addr: u64, count: usize| {
            (addr == 0xffffffff82000000 && count == 1).then(|| vec![0xffffffff81000200u64])
        };
        let bl = KprobeBlacklist::from_kernel(&map, Some(&read));
        assert_eq!(bl.functions(), 1);
        let listed: Vec<FunctionInfo> = functions(&map, "*", &bl).collect();
        let of = |n: &str| listed.iter().find(|f| f.name == n).unwrap();
        assert_eq!(of("vfs_read").guest_kprobes_refuse, None);
        assert!(
            of("do_int3")
                .guest_kprobes_refuse
                .as_deref()
                .unwrap()
                .contains("NOKPROBE")
        );
        assert_eq!(
            of("exc_page_fault").guest_kprobes_refuse.as_deref(),
            Some("in .noinstr.text")
        );
        assert_eq!(
            functions(&map, "vfs_*", &bl)
                .map(|f| f.name)
                .collect::<Vec<_>>(),
            ["vfs_read", "vfs_write"]
        );
    }
}
