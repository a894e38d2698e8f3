//! Probe definitions in the kprobe_events syntax (Linux `Documentation/trace/kprobetrace.rst`):
//!
//! ```text
//! p[:[GRP/]EVENT] SYMBOL[+OFFS]|ADDR [FETCHARGS]
//! r[MAXACTIVE][:[GRP/]EVENT] SYMBOL[+0] [FETCHARGS]
//! ```
//!
//! with fetch args `%REG`, `@ADDR`, `@SYMBOL[+|-OFFS]`, `$stackN`, `$stack`, `$retval`,
//! `$comm`, `$argN`, `+|-[u]OFFS(FETCHARG)`, each optionally `NAME=` in front and `:TYPE`
//! behind (`u8`..`u64`, `s8`..`s64`, `x8`..`x64`, `string`, `ustring`, `symbol`). A definition
//! that does not parse gets an error pointing at the offending column.

use std::fmt;

/// Live return-probe instances per probe when a definition sets none (kretprobe's floor).
pub const DEFAULT_MAX_ACTIVE: usize = 16;

/// Entry or return probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// `p`: before the instruction at the location.
    Entry,
    /// `r`: when the function returns; at most `maxactive` live instances.
    Return {
        /// `r[MAXACTIVE]`.
        maxactive: Option<u32>,
    },
    /// `w`: a data watchpoint on the location's bytes, in the style of perf's
    /// `mem:ADDR/LEN:ACCESS` and bpftrace's `watchpoint:ADDR:LEN:MODE`:
    /// `w:GRP/EVENT SYMBOL[+OFF]:LEN[:w|rw]` (`LEN` 1, 2, 4 or 8, default 8; writes by
    /// default).
    Watch(WatchSpec),
}

/// What a data watchpoint watches: `len` bytes, for writes or for any access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WatchSpec {
    /// Bytes watched: 1, 2, 4 or 8, at an address aligned to it.
    pub len: u8,
    /// Which accesses trigger it.
    pub access: WatchAccess,
}

/// The accesses a watchpoint triggers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatchAccess {
    /// `w`: stores.
    Write,
    /// `rw`: loads and stores.
    ReadWrite,
}

impl WatchAccess {
    /// The definition's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            WatchAccess::Write => "w",
            WatchAccess::ReadWrite => "rw",
        }
    }
}

/// Where the probe goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `SYMBOL[+OFFS]`.
    Symbol {
        /// The symbol.
        name: String,
        /// The offset.
        offset: u64,
    },
    /// A kernel address.
    Address(u64),
}

/// What a fetch argument reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetch {
    /// `%REG`.
    Register(String),
    /// `@ADDR`.
    Memory(u64),
    /// `@SYMBOL[+|-OFFS]`.
    SymbolMemory {
        /// The symbol.
        name: String,
        /// Signed offset.
        offset: i64,
    },
    /// `$stackN`: the Nth 8-byte entry of the stack.
    StackEntry(u32),
    /// `$stack`: the stack pointer.
    StackPointer,
    /// `$retval` (return probes only).
    ReturnValue,
    /// `$comm`: the current task's name.
    Comm,
    /// `$argN` (1-based, as kprobe_events counts).
    Argument(u32),
    /// `+|-[u]OFFS(FETCHARG)`: the value at the inner value plus the offset.
    Dereference {
        /// Signed offset.
        offset: i64,
        /// `u`: a user-space address.
        user: bool,
        /// The address to add the offset to.
        inner: Box<Fetch>,
    },
}

/// How a fetched value is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchType {
    /// `uN`.
    Unsigned(u8),
    /// `sN`.
    Signed(u8),
    /// `xN`.
    Hex(u8),
    /// `string`: a NUL-terminated kernel string.
    String,
    /// `ustring`: a NUL-terminated user string.
    UserString,
    /// `symbol`: `SYMBOL+OFFS` of the value.
    Symbol,
}

/// One `NAME=FETCHARG[:TYPE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchArg {
    /// The name (`argN`, 1-based, when none is given).
    pub name: String,
    /// What to read.
    pub fetch: Fetch,
    /// How to show it (`x64` when not given, `string` for `$comm`).
    pub ty: FetchType,
}

/// A whole definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeDefinition {
    /// Entry or return.
    pub kind: ProbeKind,
    /// `GRP` (default `kprobes`).
    pub group: String,
    /// `EVENT` (default derived from the kind and location, as the kernel does).
    pub event: String,
    /// Where.
    pub location: Location,
    /// The fetch arguments.
    pub args: Vec<FetchArg>,
    /// `if FIELD ==|!= VALUE` at the end: report only hits of matching tasks.
    pub filter: Option<TaskFilter>,
    /// `stacktrace` among the arguments (the name of ftrace's trigger): each hit carries the
    /// kernel stack.
    pub stacktrace: bool,
}

/// A filter on the task a hit happened in (an hvprobe extension after the fetch args:
/// `if comm == "cat"`, `if pid != 1`, `if tgid == 42`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFilter {
    /// What is compared.
    pub field: TaskField,
    /// `==` (true) or `!=` (false).
    pub equal: bool,
    /// The value: a name for `comm`, a number for `pid` and `tgid`.
    pub value: String,
}

/// The task fields a filter can test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskField {
    /// The task's name.
    Comm,
    /// Its thread id.
    Pid,
    /// Its process id.
    Tgid,
}

impl TaskFilter {
    /// Whether a task with this name, pid and tgid passes.
    pub fn matches(&self, comm: &str, pid: u32, tgid: u32) -> bool {
        let hit = match self.field {
            TaskField::Comm => comm == self.value,
            TaskField::Pid => pid.to_string() == self.value,
            TaskField::Tgid => tgid.to_string() == self.value,
        };
        hit == self.equal
    }
}

fn parse_filter(c: &mut Cursor<'_>) -> Parsed<TaskFilter> {
    c.skip_spaces();
    let at = c.pos;
    let field = match c.take_while(|ch| ch.is_ascii_alphabetic()) {
        "comm" => TaskField::Comm,
        "pid" => TaskField::Pid,
        "tgid" => TaskField::Tgid,
        other => {
            return c.error(
                at,
                format!("a filter tests comm, pid or tgid, not {other:?}"),
            );
        }
    };
    c.skip_spaces();
    let op = c.pos;
    let equal = if c.rest().starts_with("==") {
        true
    } else if c.rest().starts_with("!=") {
        false
    } else {
        return c.error(op, "expected == or !=");
    };
    c.pos += 2;
    c.skip_spaces();
    let v = c.pos;
    let value = if c.eat('"') {
        let s = c.take_while(|ch| ch != '"').to_string();
        if !c.eat('"') {
            return c.error(c.pos, "unterminated string");
        }
        s
    } else {
        c.take_while(|ch| !ch.is_whitespace()).to_string()
    };
    if field != TaskField::Comm && value.parse::<u32>().is_err() {
        return c.error(v, "pid and tgid compare with a number");
    }
    if value.is_empty() {
        return c.error(v, "expected a value");
    }
    c.skip_spaces();
    if c.peek().is_some() {
        return c.error(c.pos, "nothing may follow the filter");
    }
    Ok(TaskFilter {
        field,
        equal,
        value,
    })
}

/// A definition that does not parse: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionError {
    /// The definition.
    pub input: String,
    /// 0-based byte column of the problem.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bad probe definition at column {}: {}",
            self.column + 1,
            self.message
        )?;
        writeln!(f, "  {}", self.input)?;
        // The caret goes under the character, whatever the bytes before it.
        let chars = self
            .input
            .get(..self.column)
            .map_or(self.column, |s| s.chars().count());
        write!(f, "  {}^", " ".repeat(chars))
    }
}

struct Cursor<'a> {
    input: &'a str,
    pos: usize,
}

type Parsed<T> = Result<T, (usize, String)>;

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if !f(c) {
                break;
            }
            self.pos += c.len_utf8();
        }
        &self.input[start..self.pos]
    }

    fn error<T>(&self, at: usize, message: impl Into<String>) -> Parsed<T> {
        Err((at, message.into()))
    }

    fn ident(&mut self, what: &str) -> Parsed<&'a str> {
        let at = self.pos;
        let s = self.take_while(is_ident);
        if s.is_empty() {
            return self.error(at, format!("expected {what}"));
        }
        Ok(s)
    }

    /// A number in C notation (`0x..`, decimal).
    fn number(&mut self, what: &str) -> Parsed<u64> {
        let at = self.pos;
        let s = self.take_while(|c| c.is_ascii_alphanumeric());
        let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => s.parse(),
        };
        v.or_else(|_| self.error(at, format!("expected {what}, found {s:?}")))
    }

    fn signed_offset(&mut self) -> Parsed<i64> {
        let at = self.pos;
        let negative = if self.eat('-') {
            true
        } else if self.eat('+') {
            false
        } else {
            return Ok(0);
        };
        let v = self.number("an offset")?;
        let v = i64::try_from(v).or_else(|_| self.error(at, "offset out of range"))?;
        Ok(if negative { -v } else { v })
    }

    fn skip_spaces(&mut self) {
        self.take_while(|c| c == ' ' || c == '\t');
    }
}

const MAX_DEREF_DEPTH: usize = 8;

fn parse_fetch(c: &mut Cursor<'_>, depth: usize, is_return: bool) -> Parsed<Fetch> {
    let at = c.pos;
    match c.peek() {
        Some('%') => {
            c.pos += 1;
            Ok(Fetch::Register(c.ident("a register name")?.to_string()))
        }
        Some('@') => {
            c.pos += 1;
            if c.peek().is_some_and(|ch| ch.is_ascii_digit()) {
                return Ok(Fetch::Memory(c.number("an address")?));
            }
            let name = c.ident("an address or a symbol")?.to_string();
            let offset = c.signed_offset()?;
            Ok(Fetch::SymbolMemory { name, offset })
        }
        Some('$') => {
            c.pos += 1;
            let var = c.ident("a variable ($stackN, $stack, $retval, $comm, $argN)")?;
            match var {
                "stack" => Ok(Fetch::StackPointer),
                "retval" if is_return => Ok(Fetch::ReturnValue),
                "retval" => c.error(at, "$retval is only valid in return probes (r:)"),
                "comm" => Ok(Fetch::Comm),
                _ => {
                    let (kind, n) = if let Some(n) = var.strip_prefix("stack") {
                        ("stack", n)
                    } else if let Some(n) = var.strip_prefix("arg") {
                        ("arg", n)
                    } else {
                        return c.error(at, format!("unknown variable ${var}"));
                    };
                    let n: u32 = n
                        .parse()
                        .or_else(|_| c.error(at, format!("bad index in ${var}")))?;
                    match kind {
                        "stack" => Ok(Fetch::StackEntry(n)),
                        _ if n == 0 => c.error(at, "$argN counts from 1"),
                        _ => Ok(Fetch::Argument(n)),
                    }
                }
            }
        }
        Some('+') | Some('-') => {
            if depth >= MAX_DEREF_DEPTH {
                return c.error(at, "dereferences nested too deeply");
            }
            let negative = c.peek() == Some('-');
            c.pos += 1;
            let user = c.eat('u');
            let v = c.number("an offset")?;
            let v = i64::try_from(v).or_else(|_| c.error(at, "offset out of range"))?;
            let open = c.pos;
            if !c.eat('(') {
                return c.error(open, "expected '(' after the dereference offset");
            }
            let inner = parse_fetch(c, depth + 1, is_return)?;
            if !c.eat(')') {
                return c.error(c.pos, "expected ')'");
            }
            Ok(Fetch::Dereference {
                offset: if negative { -v } else { v },
                user,
                inner: Box::new(inner),
            })
        }
        Some(_) => c.error(
            at,
            "expected a fetch argument (%REG, @ADDR, @SYM, $stackN, $stack, $retval, $comm, $argN, +|-OFFS(...))",
        ),
        None => c.error(at, "expected a fetch argument"),
    }
}

fn parse_type(c: &mut Cursor<'_>) -> Parsed<FetchType> {
    let at = c.pos;
    let t = c.ident("a type")?;
    let sized = |n: &str| match n {
        "8" => Some(8),
        "16" => Some(16),
        "32" => Some(32),
        "64" => Some(64),
        _ => None,
    };
    let ty = match t {
        "string" => Some(FetchType::String),
        "ustring" => Some(FetchType::UserString),
        "symbol" => Some(FetchType::Symbol),
        _ => match t.split_at(1) {
            ("u", n) => sized(n).map(FetchType::Unsigned),
            ("s", n) => sized(n).map(FetchType::Signed),
            ("x", n) => sized(n).map(FetchType::Hex),
            _ => None,
        },
    };
    ty.map_or_else(
        || {
            c.error(
                at,
                format!("unknown type {t:?} (u8..u64, s8..s64, x8..x64, string, ustring, symbol)"),
            )
        },
        Ok,
    )
}

/// A watchpoint's `:LEN[:w|rw]` after its location.
fn parse_watch(c: &mut Cursor<'_>, spec: &mut WatchSpec) -> Parsed<()> {
    if !c.eat(':') {
        return Ok(());
    }
    let len_at = c.pos;
    let len = c.number("a length (1, 2, 4 or 8 bytes)")?;
    spec.len = match len {
        1 | 2 | 4 | 8 => len as u8,
        _ => {
            return c.error(
                len_at,
                format!("a watchpoint watches 1, 2, 4 or 8 bytes, not {len}"),
            );
        }
    };
    if !c.eat(':') {
        return Ok(());
    }
    let access_at = c.pos;
    spec.access = match c.take_while(|ch| ch.is_ascii_alphabetic()) {
        "w" => WatchAccess::Write,
        "rw" => WatchAccess::ReadWrite,
        "r" => {
            return c.error(
                access_at,
                "a watchpoint for reads alone is not offered (x86 debug registers have no read-only kind): use rw",
            );
        }
        other => {
            return c.error(
                access_at,
                format!("the access is w (writes) or rw (reads and writes), not {other:?}"),
            );
        }
    };
    Ok(())
}

fn parse(input: &str) -> Parsed<ProbeDefinition> {
    let mut c = Cursor { input, pos: 0 };
    c.skip_spaces();
    let at = c.pos;
    let kind = match c.peek() {
        Some('p') => {
            c.pos += 1;
            ProbeKind::Entry
        }
        Some('r') => {
            c.pos += 1;
            let maxactive = if c.peek().is_some_and(|ch| ch.is_ascii_digit()) {
                let n_at = c.pos;
                let n = c.number("MAXACTIVE")?;
                Some(u32::try_from(n).or_else(|_| c.error(n_at, "MAXACTIVE out of range"))?)
            } else {
                None
            };
            ProbeKind::Return { maxactive }
        }
        Some('w') => {
            c.pos += 1;
            // The length and access follow the location.
            ProbeKind::Watch(WatchSpec {
                len: 8,
                access: WatchAccess::Write,
            })
        }
        _ => {
            return c.error(
                at,
                "a definition starts with 'p' (probe), 'r' (return probe) or 'w' (watchpoint)",
            );
        }
    };
    let mut group = None;
    let mut event = None;
    if c.eat(':') {
        let name = c.ident("an event name")?;
        if c.eat('/') {
            group = Some(name.to_string());
            if c.peek().is_some_and(is_ident) {
                event = Some(c.ident("an event name")?.to_string());
            }
        } else {
            event = Some(name.to_string());
        }
    }
    let sep = c.pos;
    if !matches!(c.peek(), Some(' ') | Some('\t')) {
        return c.error(sep, "expected a space before the probe location");
    }
    c.skip_spaces();
    let loc_at = c.pos;
    let location = if c.peek().is_some_and(|ch| ch.is_ascii_digit()) {
        Location::Address(c.number("an address")?)
    } else {
        let name = c.ident("a symbol or an address")?.to_string();
        let off_at = c.pos;
        let offset = if c.eat('+') {
            c.number("an offset")?
        } else if c.peek() == Some('-') {
            return c.error(off_at, "a probe offset cannot be negative");
        } else {
            0
        };
        Location::Symbol { name, offset }
    };
    let mut kind = kind;
    if let ProbeKind::Watch(spec) = &mut kind {
        parse_watch(&mut c, spec)?;
    }
    let is_return = matches!(kind, ProbeKind::Return { .. });
    if is_return && matches!(location, Location::Symbol { offset, .. } if offset != 0) {
        return c.error(
            loc_at,
            "a return probe goes on a function entry (offset +0)",
        );
    }
    let mut args: Vec<FetchArg> = Vec::new();
    let mut filter = None;
    let mut stacktrace = false;
    loop {
        let before = c.pos;
        c.skip_spaces();
        if c.peek().is_none() {
            break;
        }
        if c.pos > before && (c.rest() == "if" || c.rest().starts_with("if ")) {
            c.pos += 2;
            filter = Some(parse_filter(&mut c)?);
            break;
        }
        if c.pos == before {
            return c.error(c.pos, "expected a space between fetch arguments");
        }
        let arg_at = c.pos;
        if c.rest() == "stacktrace" || c.rest().starts_with("stacktrace ") {
            if stacktrace {
                return c.error(arg_at, "stacktrace is given twice");
            }
            stacktrace = true;
            c.pos += "stacktrace".len();
            continue;
        }
        // NAME= is an identifier followed by '='.
        let save = c.pos;
        let name = match c.take_while(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
            n if !n.is_empty() && c.eat('=') => {
                if n.starts_with(|ch: char| ch.is_ascii_digit()) {
                    return c.error(
                        arg_at,
                        format!("argument name {n:?} must not start with a digit"),
                    );
                }
                Some(n.to_string())
            }
            _ => {
                c.pos = save;
                None
            }
        };
        let fetch = parse_fetch(&mut c, 0, is_return)?;
        let ty = if c.eat(':') {
            parse_type(&mut c)?
        } else if fetch == Fetch::Comm {
            FetchType::String
        } else {
            FetchType::Hex(64)
        };
        if fetch == Fetch::Comm && !matches!(ty, FetchType::String) {
            return c.error(arg_at, "$comm is a string");
        }
        let name = name.unwrap_or_else(|| format!("arg{}", args.len() + 1));
        if args.iter().any(|a| a.name == name) {
            return c.error(arg_at, format!("argument name {name:?} is used twice"));
        }
        args.push(FetchArg { name, fetch, ty });
        if !matches!(c.peek(), None | Some(' ') | Some('\t')) {
            return c.error(c.pos, "unexpected character after the fetch argument");
        }
    }
    let event = event.unwrap_or_else(|| {
        let prefix = match kind {
            ProbeKind::Entry => 'p',
            ProbeKind::Return { .. } => 'r',
            ProbeKind::Watch(_) => 'w',
        };
        match &location {
            Location::Symbol { name, offset } => format!("{prefix}_{name}_{offset}"),
            Location::Address(a) => format!("{prefix}_0x{a:x}"),
        }
    });
    Ok(ProbeDefinition {
        kind,
        group: group.unwrap_or_else(|| "kprobes".to_string()),
        event,
        location,
        args,
        filter,
        stacktrace,
    })
}

impl ProbeDefinition {
    /// Parses one definition.
    pub fn parse(input: &str) -> Result<ProbeDefinition, DefinitionError> {
        parse(input).map_err(|(column, message)| DefinitionError {
            input: input.to_string(),
            column,
            message,
        })
    }

    /// For a return probe, its MAXACTIVE (the default when not given); `None` for an entry
    /// probe.
    pub fn max_active(&self) -> Option<usize> {
        match self.kind {
            ProbeKind::Return { maxactive } => {
                Some(maxactive.map_or(DEFAULT_MAX_ACTIVE, |m| m as usize))
            }
            ProbeKind::Entry | ProbeKind::Watch(_) => None,
        }
    }

    /// For a watchpoint, what it watches.
    pub fn watch(&self) -> Option<WatchSpec> {
        match self.kind {
            ProbeKind::Watch(spec) => Some(spec),
            _ => None,
        }
    }

    /// The location as `SYMBOL+0xOFF` or `0xADDR`, for the symbol resolver.
    pub fn location_text(&self) -> String {
        match &self.location {
            Location::Symbol { name, offset: 0 } => name.clone(),
            Location::Symbol { name, offset } => format!("{name}+{offset:#x}"),
            Location::Address(a) => format!("{a:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchpoint_definitions() {
        let d = ProbeDefinition::parse("w:hv/mp modprobe_path:8:w $comm").unwrap();
        assert_eq!(
            d.kind,
            ProbeKind::Watch(WatchSpec {
                len: 8,
                access: WatchAccess::Write
            })
        );
        assert_eq!((d.group.as_str(), d.event.as_str()), ("hv", "mp"));
        assert_eq!(d.location_text(), "modprobe_path");
        assert_eq!(d.args.len(), 1);
        let d = ProbeDefinition::parse("w core_pattern+0x10:4:rw").unwrap();
        assert_eq!(
            d.watch(),
            Some(WatchSpec {
                len: 4,
                access: WatchAccess::ReadWrite
            })
        );
        assert_eq!(d.event, "w_core_pattern_16");
        assert_eq!(d.max_active(), None);
        // Defaults: 8 bytes, writes.
        let d = ProbeDefinition::parse("w:g/e 0xffffffff82a5a640").unwrap();
        assert_eq!(
            d.watch().map(|w| (w.len, w.access)),
            Some((8, WatchAccess::Write))
        );
        for (bad, column, says) in [
            ("w:g/e modprobe_path:3", 20, "1, 2, 4 or 8 bytes, not 3"),
            ("w:g/e modprobe_path:8:r", 22, "reads alone"),
            ("w:g/e modprobe_path:8:x", 22, "not \"x\""),
            ("x:g/e modprobe_path", 0, "'w' (watchpoint)"),
        ] {
            let e = ProbeDefinition::parse(bad).unwrap_err();
            assert_eq!(e.column, column, "{bad}: {e}");
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
        // A length belongs to watchpoints only.
        assert!(ProbeDefinition::parse("p:g/e vfs_read:8").is_err());
    }

    #[test]
    fn valid_definitions() {
        let d = ProbeDefinition::parse(
            "p:mygrp/open do_sys_openat2+0 dfd=%di name=+0($arg2):ustring how=$arg3 $comm",
        )
        .unwrap();
        assert_eq!(d.kind, ProbeKind::Entry);
        assert_eq!((d.group.as_str(), d.event.as_str()), ("mygrp", "open"));
        assert_eq!(d.location_text(), "do_sys_openat2");
        assert_eq!(d.args.len(), 4);
        assert_eq!(d.args[0].fetch, Fetch::Register("di".into()));
        assert_eq!(
            d.args[1].fetch,
            Fetch::Dereference {
                offset: 0,
                user: false,
                inner: Box::new(Fetch::Argument(2))
            }
        );
        assert_eq!(d.args[1].ty, FetchType::UserString);
        assert_eq!(d.args[2].ty, FetchType::Hex(64));
        assert_eq!(
            (d.args[3].name.as_str(), d.args[3].ty),
            ("arg4", FetchType::String)
        );

        let r = ProbeDefinition::parse("r16 vfs_read ret=$retval:s64").unwrap();
        assert_eq!(
            r.kind,
            ProbeKind::Return {
                maxactive: Some(16)
            }
        );
        assert_eq!(r.event, "r_vfs_read_0");
        assert_eq!(r.args[0].ty, FetchType::Signed(64));

        let cases = [
            "p 0xffffffff81000000",
            "p:ev __x64_sys_getpid+0x5 s=$stack s0=$stack0 g=@jiffies:u64 h=@0xffffffff82000000",
            "p:grp/ strlen+8 c=-8(+0x10(%sp)):x32 u=+u0(%di):u8 sym=%ip:symbol",
            "r:ret do_sys_openat2 v=$retval:x64",
            "p f @sym-0x10 @sym+16:s16",
        ];
        for c in cases {
            ProbeDefinition::parse(c).unwrap_or_else(|e| panic!("{c}: {e}"));
        }

        // `stacktrace` anywhere among the arguments, before a filter; an argument may still
        // be named so.
        let s =
            ProbeDefinition::parse("p:hv/a vfs_read stacktrace n=%di if comm == \"cat\"").unwrap();
        assert!(s.stacktrace && s.args.len() == 1 && s.filter.is_some());
        let named = ProbeDefinition::parse("r vfs_read stacktrace=$retval").unwrap();
        assert!(!named.stacktrace && named.args[0].name == "stacktrace");
        assert!(!d.stacktrace);
    }

    #[test]
    fn invalid_definitions_point_at_the_column() {
        let cases: &[(&str, usize, &str)] = &[
            ("x do_sys_open", 0, "starts with 'p'"),
            ("p", 1, "expected a space"),
            ("p:grp/ev", 8, "expected a space"),
            ("p do_sys_open+", 14, "expected an offset"),
            ("p do_sys_open-4", 13, "cannot be negative"),
            ("r vfs_read+4", 2, "offset +0"),
            ("p vfs_read x=$retval", 13, "only valid in return probes"),
            ("p vfs_read $arg0", 11, "counts from 1"),
            ("p vfs_read $foo", 11, "unknown variable"),
            ("p vfs_read %di:u12", 15, "unknown type"),
            ("p vfs_read +8%di", 13, "expected '('"),
            ("p vfs_read +8(%di", 17, "expected ')'"),
            ("p vfs_read a=%di a=%si", 17, "used twice"),
            ("p vfs_read %di)", 14, "unexpected character"),
            ("p vfs_read c=$comm:u32", 11, "$comm is a string"),
            ("p vfs_read 1x=%di", 11, "must not start with a digit"),
            ("p vfs_read #", 11, "expected a fetch argument"),
            ("p vfs_read stacktrace stacktrace", 22, "given twice"),
        ];
        for (input, column, needle) in cases {
            let e = ProbeDefinition::parse(input).unwrap_err();
            assert!(e.message.contains(needle), "{input}: {}", e.message);
            assert_eq!(e.column, *column, "{input}: {}", e.message);
            let shown = e.to_string();
            let caret_line = shown.lines().last().unwrap();
            assert_eq!(caret_line.find('^'), Some(column + 2), "{shown}");
        }
    }

    #[test]
    fn task_filters_follow_the_fetch_args() {
        let d =
            ProbeDefinition::parse("p:hv/o do_sys_openat2 n=+0($arg2):ustring if comm == \"cat\"")
                .unwrap();
        let f = d.filter.unwrap();
        assert!(f.matches("cat", 5, 5) && !f.matches("sh", 5, 5));
        let d = ProbeDefinition::parse("r vfs_read if pid != 1").unwrap();
        let f = d.filter.unwrap();
        assert!(!f.matches("init", 1, 1) && f.matches("sh", 7, 7));
        assert_eq!(d.args.len(), 0);
        for (bad, col, needle) in [
            ("p f if uid == 0", 7, "comm, pid or tgid"),
            ("p f if pid = 1", 11, "expected == or !="),
            ("p f if pid == cat", 14, "compare with a number"),
            ("p f if comm == \"cat", 19, "unterminated"),
            ("p f if comm == cat x", 19, "nothing may follow"),
        ] {
            let e = ProbeDefinition::parse(bad).unwrap_err();
            assert!(e.message.contains(needle), "{bad}: {}", e.message);
            assert_eq!(e.column, col, "{bad}: {}", e.message);
        }
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = format!("p f {}%di{}", "+0(".repeat(20), ")".repeat(20));
        let e = ProbeDefinition::parse(&deep).unwrap_err();
        assert!(e.message.contains("nested too deeply"));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1500))]

        /// Arbitrary text never panics the parser, and an error's column lies in the input.
        #[test]
        fn never_panics_on_any_text(s in "\\PC{0,80}") {
            if let Err(e) = ProbeDefinition::parse(&s) {
                prop_assert!(e.column <= s.len());
            }
        }

        /// Text made of the grammar's own pieces, which reaches deep into the parser.
        #[test]
        fn never_panics_on_grammar_soup(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("p"), Just("r"), Just("r8"), Just(":"), Just("/"), Just(" "),
                    Just("do_sys_openat2"), Just("+"), Just("-"), Just("0x10"), Just("4"),
                    Just("%di"), Just("@"), Just("$arg1"), Just("$stack"), Just("$stack3"),
                    Just("$retval"), Just("$comm"), Just("("), Just(")"), Just("u"), Just("="),
                    Just("name"), Just(":u32"), Just(":string"), Just(":x99"), Just("é"),
                    Just("99999999999999999999999"),
                ],
                0..24,
            )
        ) {
            let s: String = parts.concat();
            if let Err(e) = ProbeDefinition::parse(&s) {
                prop_assert!(e.column <= s.len());
                prop_assert!(s.is_char_boundary(e.column));
            }
        }
    }
}
