//! What `hvprobe run` prints about probes: one line per hit, and a summary per probe at the end.

use probe_core::arch::{Arch, DecodedInstruction, Host, InstructionDecoder, RegisterFile};

use crate::arch::GuestRegisters;
use crate::stacks::HitStack;
use probe_core::definition::FetchType;
use probe_core::definition::{Fetch, ProbeDefinition};
use probe_core::fetch::{FetchEnv, FetchValue, evaluate, format_args};
use probe_core::histogram::ValueHistogram;
use probe_core::probe::ProbeContext;
use probe_core::protect::ProtectAction;
use probe_core::symbols::SymbolMap;
use probe_core::task::{TaskInfo, TaskLayout};

/// The line printed for one hit: time since start, vCPU, probe, the PC and the first four
/// argument registers, by their architecture's names (`rip=... rdi=...`, `pc=... x0=...`).
pub fn hit_line(ctx: &ProbeContext<'_>) -> String {
    let r = ctx.regs;
    let mut line = format!(
        "hit {:>12.6} cpu{} {} {}={:#x}",
        ctx.time.as_secs_f64(),
        ctx.vcpu,
        ctx.location,
        GuestRegisters::PC_NAME,
        r.pc(),
    );
    for (n, name) in GuestRegisters::ARG_NAMES.iter().take(4).enumerate() {
        line.push_str(&format!(" {name}={:#x}", r.arg(n).unwrap_or(0)));
    }
    line
}

/// The JSON object of one hit of a bare probe (what a `json` event stream gets): time, vCPU,
/// probe, PC and the first four argument registers, and the hit's stack fields if it has one.
pub fn hit_json(ctx: &ProbeContext<'_>, stack: Option<&HitStack>) -> String {
    let r = ctx.regs;
    let args: Vec<u64> = (0..4).map(|n| r.arg(n).unwrap_or(0)).collect();
    let mut obj = serde_json::json!({
        "time": ctx.time.as_secs_f64(),
        "cpu": ctx.vcpu,
        "event": ctx.location,
        "pc": r.pc(),
        "args": args,
    });
    if let (Some(s), Some(o)) = (stack, obj.as_object_mut()) {
        s.json_fields(o);
    }
    obj.to_string()
}

/// Whether a definition's task filter lets the hit in `ctx` be reported (true without one).
pub fn selected(ctx: &ProbeContext<'_>, def: &ProbeDefinition, task: Option<&TaskLayout>) -> bool {
    def.filter.is_none() || {
        let who = task.and_then(|t| t.current(ctx).ok());
        passes_filter(def, who.as_ref())
    }
}

/// Whether a hit by task `who` is reported: a definition's task filter selects which hits are
/// printed and counted in histograms (the probe counters count them all).
fn passes_filter(def: &ProbeDefinition, who: Option<&TaskInfo>) -> bool {
    match &def.filter {
        Some(filter) => who.is_some_and(|t| filter.matches(&t.comm, t.pid, t.tgid)),
        None => true,
    }
}

/// Counts a return of a definition in its `$retval` histogram, if the task filter lets it.
pub fn count_return(
    ctx: &ProbeContext<'_>,
    def: &ProbeDefinition,
    task: Option<&TaskLayout>,
    hist: &RetvalHistogram,
) {
    let who = def
        .filter
        .as_ref()
        .and_then(|_| task.and_then(|t| t.current(ctx).ok()));
    if passes_filter(def, who.as_ref()) {
        hist.values
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(ctx.regs.return_value(), hist.ty);
    }
}

/// The `--hist` histogram of one definition's `$retval`.
pub struct RetvalHistogram {
    /// What the heading names: `group/event name`.
    pub title: String,
    /// The probed function.
    pub location: String,
    /// The type the definition gives `$retval`.
    pub ty: FetchType,
    /// The counts.
    pub values: std::sync::Mutex<ValueHistogram>,
}

impl RetvalHistogram {
    /// The histogram for `def` (probing `location`), if it fetches `$retval`.
    pub fn for_definition(def: &ProbeDefinition, location: String) -> Option<RetvalHistogram> {
        let arg = def.args.iter().find(|a| a.fetch == Fetch::ReturnValue)?;
        Some(RetvalHistogram {
            title: format!("{}/{} {}", def.group, def.event, arg.name),
            location,
            ty: arg.ty,
            values: std::sync::Mutex::new(ValueHistogram::new()),
        })
    }

    /// The heading and rows printed at exit.
    pub fn render(&self) -> String {
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "hvprobe: histogram of {} ($retval of {}), {} returns:\n{}",
            self.title,
            self.location,
            values.total(),
            values.render()
        )
    }
}

/// The line (without its newline) for a hit on a kprobe_events definition, in the trace
/// format kprobe users know: `comm-pid [cpu] seconds: group/event: (location) name=value
/// ...`; for a return probe `(caller <- function)`, with `$retval` from the return and the
/// other arguments from the entry; the hit's `stack` in ftrace's form on the lines after. With
/// `json`, one JSON object instead. `None` when the definition's task filter leaves the hit
/// out.
pub fn event_line(
    ctx: &ProbeContext<'_>,
    def: &ProbeDefinition,
    map: &SymbolMap,
    task: Option<&TaskLayout>,
    slide: u64,
    json: bool,
    stack: Option<&HitStack>,
) -> Option<String> {
    let who = task.and_then(|t| t.current(ctx).ok());
    if !passes_filter(def, who.as_ref()) {
        return None;
    }
    let entry = ctx.entry_context();
    let watch = WatchReport::new(ctx, map, slide, stack);
    let (retval, place) = match &entry {
        Some(_) => (
            Some(ctx.regs.return_value()),
            format!(
                "{} <- {}",
                map.describe(ctx.regs.pc().wrapping_sub(slide)),
                ctx.location
            ),
        ),
        None => match &watch {
            Some(w) => (None, w.place(map)),
            None => (None, ctx.location.to_string()),
        },
    };
    let args_ctx = entry.as_ref().unwrap_or(ctx);
    let env = FetchEnv {
        symbols: Some(map),
        task,
        slide,
        retval,
    };
    Some(if json {
        let args: serde_json::Map<String, serde_json::Value> = def
            .args
            .iter()
            .map(|a| {
                let v = match evaluate(args_ctx, a, env) {
                    Ok(FetchValue::Text(t)) => serde_json::Value::from(t),
                    Ok(FetchValue::Number(n, FetchType::Unsigned(_))) => n.into(),
                    Ok(v @ FetchValue::Number(_, FetchType::Signed(_))) => v
                        .to_string()
                        .parse::<i64>()
                        .map_or(serde_json::Value::Null, Into::into),
                    Ok(v) => v.to_string().into(),
                    Err(_) => serde_json::Value::Null,
                };
                (a.name.clone(), v)
            })
            .collect();
        let mut obj = serde_json::json!({
            "time": ctx.time.as_secs_f64(),
            "cpu": ctx.vcpu,
            "comm": who.as_ref().map(|t| t.comm.clone()),
            "pid": who.as_ref().map(|t| t.pid),
            "tgid": who.as_ref().map(|t| t.tgid),
            "event": format!("{}/{}", def.group, def.event),
            "location": place,
            "return": entry.is_some(),
            "args": args,
        });
        if let (Some(s), Some(o)) = (stack, obj.as_object_mut()) {
            s.json_fields(o);
        }
        if let (Some(w), Some(o)) = (&watch, obj.as_object_mut()) {
            o.insert("watch".into(), w.json(map));
        }
        obj.to_string()
    } else {
        let who = who.map_or_else(
            || "<unknown>-0".to_string(),
            |t| format!("{}-{}", t.comm, t.pid),
        );
        let args = format_args(args_ctx, &def.args, env);
        let args = match &watch {
            Some(w) if args.is_empty() => w.text(map),
            Some(w) => format!("{} {args}", w.text(map)),
            None => args,
        };
        let line = format!(
            "{who} [{:03}] {:.6}: {}/{}: ({place}) {args}",
            ctx.vcpu,
            ctx.time.as_secs_f64(),
            def.group,
            def.event,
        );
        with_stack(line, stack)
    })
}

/// What a watchpoint hit or a write to a protected region reports besides the task and
/// arguments: who accessed, what, the bytes before and after, and (for a protected region)
/// whether the write was let through.
struct WatchReport {
    /// The accessing instruction (System.map's address and its text), where certain.
    writer: Option<(u64, String)>,
    /// Where the vCPU was when the trap came (System.map's address): after the access.
    after: u64,
    /// The watched address (System.map's).
    address: u64,
    old: Vec<u8>,
    new: Vec<u8>,
    action: Option<ProtectAction>,
    /// The kernel text patcher on the writer's stack, for a write to a protected region.
    patcher: Option<String>,
}

impl WatchReport {
    fn new(
        ctx: &ProbeContext<'_>,
        map: &SymbolMap,
        slide: u64,
        stack: Option<&HitStack>,
    ) -> Option<WatchReport> {
        let w = ctx.watch.as_ref()?;
        let writer = match w.writer {
            Some(at) => Some((at, instruction_at(ctx, at).unwrap_or_default())),
            None => watch_writer(ctx, map, slide),
        };
        Some(WatchReport {
            writer: writer.map(|(va, text)| (va.wrapping_sub(slide), text)),
            after: ctx.address.wrapping_sub(slide),
            address: w.address.wrapping_sub(slide),
            old: w.old.clone(),
            new: w.new.clone(),
            action: w.action,
            patcher: stack
                .filter(|_| w.action.is_some())
                .and_then(|s| {
                    probe_core::protect::text_patcher(s.frames.iter().map(String::as_str))
                })
                .map(str::to_string),
        })
    }

    /// `(writer)` for the line's place: the instruction, or what follows it.
    fn place(&self, map: &SymbolMap) -> String {
        match &self.writer {
            Some((va, _)) => map.describe(*va),
            None => format!("after {}", map.describe(self.after)),
        }
    }

    /// The watched bytes after the access, as an escaped string (`"/tmp/x\x00o"`).
    fn bytes(&self) -> String {
        format!("\"{}\"", self.new.escape_ascii())
    }

    /// Bytes as a little-endian number of their width (up to eight), else as hex in address
    /// order.
    fn value(bytes: &[u8]) -> String {
        if bytes.len() <= 8 {
            let v = probe_core::guest_memory::le_value(bytes);
            format!("{v:#0w$x}", w = bytes.len() * 2 + 2)
        } else {
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    }

    fn text(&self, map: &SymbolMap) -> String {
        let mut t = format!("addr={}", map.describe(self.address));
        if let Some(action) = self.action {
            t.push_str(&format!(" len={}", self.new.len()));
            t.push_str(&format!(
                " old={} new={} bytes={} {}",
                Self::value(&self.old),
                Self::value(&self.new),
                self.bytes(),
                match action {
                    ProtectAction::Allow => "allowed",
                    ProtectAction::Deny => "denied",
                }
            ));
            if let Some(p) = &self.patcher {
                t.push_str(&format!(" by={p}"));
            }
            return t;
        }
        format!(
            "{t} old={} new={} bytes={}",
            Self::value(&self.old),
            Self::value(&self.new),
            self.bytes()
        )
    }

    fn json(&self, map: &SymbolMap) -> serde_json::Value {
        serde_json::json!({
            "address": self.address,
            "symbol": map.describe(self.address),
            "len": self.new.len(),
            "old": Self::value(&self.old),
            "new": Self::value(&self.new),
            "action": self.action.map(|a| a.as_str()),
            "patcher": self.patcher,
            "bytes": self.bytes(),
            "writer": self.writer.as_ref().map(|(va, _)| map.describe(*va)),
            "instruction": self.writer.as_ref().map(|(_, t)| t.clone()),
            "after": map.describe(self.after),
        })
    }
}

/// The guest architecture's decoder (the VMM's own: KVM runs guests of its host's
/// architecture), for the CPU features' defaults.
fn host_decoder() -> Option<HostDecoder> {
    // x86_64 has no features to give: the unit type.
    #[allow(clippy::unit_arg)]
    <HostDecoder as InstructionDecoder<Host>>::new(Default::default()).ok()
}

type HostDecoder = <Host as Arch>::Decoder;

/// The text of the instruction at `va`, decoded from the guest's memory.
fn instruction_at(ctx: &ProbeContext<'_>, va: u64) -> Option<String> {
    let decoder = host_decoder()?;
    let mut code = [0u8; 16];
    ctx.read_memory(va, &mut code[..4]).ok()?;
    let _ = ctx.read_memory(va + 4, &mut code[4..]);
    InstructionDecoder::<Host>::decode(&decoder, &code, va)
        .ok()
        .map(|i| i.text().to_string())
}

/// The instruction that made a watched access reported after it (an x86 data breakpoint is a
/// trap): the one ending at the PC, decoded from the start of the function System.map puts
/// there; a repeated string store still at the PC (`rep stos`/`movs` with RCX not zero) is
/// the PC's own. `None` where that is not certain.
fn watch_writer(ctx: &ProbeContext<'_>, map: &SymbolMap, slide: u64) -> Option<(u64, String)> {
    let decoder = host_decoder()?;
    let pc = ctx.address;
    let mut here = [0u8; 16];
    if ctx.read_memory(pc, &mut here).is_ok()
        && let Ok(insn) = InstructionDecoder::<Host>::decode(&decoder, &here, pc)
        && insn.text().starts_with("rep")
        && ctx.regs.by_name("rcx").is_some_and(|c| c != 0)
    {
        return Some((pc, insn.text().to_string()));
    }
    let (func, offset) = map.containing(pc.wrapping_sub(slide).checked_sub(1)?)?;
    let start = func.addr.wrapping_add(slide);
    let end = offset + 1;
    if end > 64 << 10 {
        return None;
    }
    let mut code = vec![0u8; end as usize];
    ctx.read_memory(start, &mut code).ok()?;
    decoder.instruction_ending_at(&code, start, end)
}

/// A text line with the hit's stack lines after it (no newline at the end, as lines are
/// given).
pub fn with_stack(mut line: String, stack: Option<&HitStack>) -> String {
    if let Some(s) = stack {
        line.push('\n');
        line.push_str(s.text().trim_end_matches('\n'));
    }
    line
}
