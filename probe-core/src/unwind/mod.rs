//! Unwinding the guest kernel's stack at a probe hit, from the host: the stopped vCPU's
//! registers and the guest's memory, read through its own page tables, with no code in the
//! guest. One walker per architecture behind [`Unwind`] (an extension of the architecture, as
//! [`crate::task::TaskAware`] is): x86_64 follows the kernel's ORC tables ([`orc`],
//! [`x86_64`]), arm64 the frame-record chain ([`aarch64`]).
//!
//! Every walk is bounded: at most [`MAX_FRAMES`] frames, each step's stack pointer strictly
//! above the last one on the same stack, a move between stacks only outwards (an exception or
//! IRQ stack to the task stack, never back), and every read on a stack the kernel owns
//! ([`KnownStack`]). A walk that cannot go on for any other reason than the kernel's own end of
//! the stack ends with [`TraceEnd::Unreliable`] and the reason: a corrupt or hostile stack
//! gives a short trace marked so, never a wrong one presented as whole.

pub mod aarch64;
pub mod folded;
pub mod orc;
pub mod reader;
pub mod tables;
pub mod x86_64;

use std::sync::OnceLock;

use crate::arch::RegisterFile;
use crate::btf::{Btf, BtfError};
use crate::probe::ProbeContext;
use crate::symbols::SymbolMap;
use crate::task::{TaskAware, TaskError, TaskLayout};
pub use reader::StackReader;
pub use tables::UnwindTables;

/// The most frames a trace holds (as many as ftrace keeps per event: FTRACE_KSTACK_ENTRIES).
pub const MAX_FRAMES: usize = 128;

/// Most CPUs whose IRQ stacks are looked up.
const MAX_CPUS: u64 = 256;

/// Errors of preparing to unwind a kernel: what its symbols, BTF or vmlinux lack.
#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    /// A symbol the unwinder needs is missing from System.map.
    #[error("System.map has no {0}, which the stack unwinder needs")]
    MissingSymbol(&'static str),
    /// A type or member the unwinder needs is missing from BTF.
    #[error("BTF: {0}")]
    Btf(#[from] BtfError),
    /// The current task cannot be found.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// The vmlinux has no unwind tables, or tables hvprobe cannot read.
    #[error("{0}")]
    Tables(String),
    /// The vmlinux is not the one the guest runs.
    #[error("{0}")]
    Mismatch(String),
}

/// Why a walk stopped before the kernel's own end of the stack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnwindStop {
    /// The depth limit.
    #[error("more than {0} frames")]
    TooDeep(usize),
    /// A stack pointer (or frame record) outside every stack the kernel has.
    #[error("{0:#x} is on no known kernel stack")]
    OffStack(u64),
    /// The stack pointer did not move up.
    #[error("stack going the wrong way at {0:#x}")]
    WrongDirection(u64),
    /// A move back to a stack the walk had left.
    #[error("back to a stack already left at {0:#x}")]
    StackRevisited(u64),
    /// Guest memory that could not be read.
    #[error("cannot read the stack at {0:#x}")]
    Unreadable(u64),
    /// An address the unwind tables do not cover (module or generated code).
    #[error("no unwind data for {0:#x} (module or generated code)")]
    NoUnwindData(u64),
    /// An unwind rule that cannot be followed here.
    #[error("unwind rule at {ip:#x}: {why}")]
    BadRule {
        /// Where.
        ip: u64,
        /// What.
        why: &'static str,
    },
    /// A misaligned frame pointer (arm64 frame records are 8-byte aligned).
    #[error("misaligned frame pointer {0:#x}")]
    Misaligned(u64),
    /// The vmlinux does not match the running kernel.
    #[error("{0}")]
    WrongKernel(String),
    /// The stacks of the task could not be worked out.
    #[error("{0}")]
    NoStacks(String),
}

/// How a trace ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceEnd {
    /// At the kernel's entry from user mode (the user-mode registers saved there).
    UserMode,
    /// At the kernel's own end of the stack (a kernel thread's or idle task's first frame).
    EndOfStack,
    /// Stopped early: the frames so far are right, the ones beyond unknown.
    Unreliable(UnwindStop),
}

impl TraceEnd {
    /// The end as the text output marks it after the last frame, if at all.
    pub fn marker(&self) -> Option<String> {
        match self {
            TraceEnd::UserMode => Some("<user>".into()),
            TraceEnd::EndOfStack => None,
            TraceEnd::Unreliable(why) => Some(format!("(unreliable: {why})")),
        }
    }

    /// A short name for JSON (`user`, `end`, `unreliable`).
    pub fn name(&self) -> &'static str {
        match self {
            TraceEnd::UserMode => "user",
            TraceEnd::EndOfStack => "end",
            TraceEnd::Unreliable(_) => "unreliable",
        }
    }
}

/// A kernel stack trace: the hit's own address first, then each return address (or
/// interrupted address) outwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackTrace {
    /// Addresses, innermost first (as the guest runs them: KASLR slide included).
    pub frames: Vec<u64>,
    /// How the walk ended.
    pub end: TraceEnd,
}

impl StackTrace {
    /// A trace that could not start beyond the hit itself.
    pub fn unreliable(first: u64, why: UnwindStop) -> StackTrace {
        StackTrace {
            frames: vec![first],
            end: TraceEnd::Unreliable(why),
        }
    }

    /// Each frame as ftrace prints it with `sym-offset`: `vfs_read+0x5/0x1a0` (System.map
    /// addresses, so the KASLR `slide` is taken off first).
    pub fn symbolized(&self, map: &SymbolMap, slide: u64) -> Vec<String> {
        self.frames
            .iter()
            .map(|a| symbolize(map, a.wrapping_sub(slide)))
            .collect()
    }
}

/// `symbol+0xoff/0xsize` for a System.map address, or the bare address.
pub fn symbolize(map: &SymbolMap, addr: u64) -> String {
    match map.containing(addr) {
        Some((s, off)) if s.is_text() => match map.size_of(s) {
            Some(size) => format!("{}+{off:#x}/{size:#x}", s.name),
            None => format!("{}+{off:#x}", s.name),
        },
        _ => format!("{addr:#x}"),
    }
}

/// Which kind of stack an address is on; a walk moves only to a later kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StackKind {
    /// arm64's per-CPU overflow stack.
    Overflow,
    /// A per-CPU IRQ stack (hard and soft interrupts).
    Irq,
    /// The current task's stack.
    Task,
}

/// One stack the kernel owns: `[base, top)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownStack {
    /// Which kind.
    pub kind: StackKind,
    /// Lowest address.
    pub base: u64,
    /// One past the highest.
    pub top: u64,
}

impl KnownStack {
    /// Whether `len` bytes at `addr` lie on it.
    pub fn holds(&self, addr: u64, len: u64) -> bool {
        addr >= self.base && addr.checked_add(len).is_some_and(|e| e <= self.top)
    }
}

/// How a per-CPU pointer to a stack points into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackPointerKind {
    /// At the lowest address (arm64's `irq_stack_ptr`).
    Base,
    /// At the top word (x86_64's `hardirq_stack_ptr`: top - 8).
    TopWord,
    /// The per-CPU variable is the stack itself (arm64's `overflow_stack` array).
    Inline,
}

/// A per-CPU stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerCpuStack {
    /// Which kind.
    pub kind: StackKind,
    /// The per-CPU variable (System.map address; a per-CPU offset on x86_64).
    pub symbol: u64,
    /// How it points at the stack.
    pub points: StackPointerKind,
    /// Its size.
    pub size: u64,
}

/// Where a kernel keeps its stacks, from System.map and BTF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackLayout {
    /// `offsetof(struct task_struct, stack)`.
    pub task_stack: u64,
    /// The task stack's size (THREAD_SIZE).
    pub thread_size: u64,
    /// The per-CPU stacks.
    pub per_cpu: Vec<PerCpuStack>,
    /// `__per_cpu_offset` (System.map address).
    pub per_cpu_offset: u64,
    /// `nr_cpu_ids` (System.map address).
    pub nr_cpu_ids: u64,
    /// Whether per-CPU variables' System.map addresses move with KASLR (arm64; on x86_64
    /// they are offsets into the per-CPU area).
    pub per_cpu_slid: bool,
    /// The registers saved at the top of a task's stack, where the architecture ends its
    /// frame-record chain there (arm64).
    pub top_regs: Option<TopRegs>,
}

/// The `pt_regs` at the top of a task's stack, holding its final frame record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopRegs {
    /// `sizeof(struct pt_regs)`.
    pub size: u64,
    /// `offsetof(struct pt_regs, stackframe)`.
    pub record: u64,
}

/// The address of symbol `name` in `map`.
pub(crate) fn symbol(map: &SymbolMap, name: &'static str) -> Result<u64, UnwindError> {
    map.lookup(name)
        .map(|s| s.addr)
        .map_err(|_| UnwindError::MissingSymbol(name))
}

/// Stack unwinding, an extension of an architecture.
pub trait Unwind: TaskAware {
    /// What the walker reads from the vmlinux (x86_64: the ORC tables).
    type Tables: Send + Sync + std::fmt::Debug;

    /// The walker's tables from the vmlinux's (with its System.map), or why this kernel
    /// cannot be unwound.
    fn tables(t: &UnwindTables, btf: &Btf, map: &SymbolMap) -> Result<Self::Tables, UnwindError>;

    /// Where this architecture's kernel keeps its stacks.
    fn stack_layout(btf: &Btf, map: &SymbolMap) -> Result<StackLayout, UnwindError>;

    /// Walks the stack of the hit in `ctx`, reading through `reader`, on `stacks`.
    fn walk(
        ctx: &ProbeContext<'_, Self>,
        unwinder: &KernelUnwinder<Self>,
        reader: &mut StackReader<'_, Self>,
        stacks: &Stacks,
        slide: u64,
    ) -> StackTrace;
}

/// The stacks a walk may use, and the bookkeeping that keeps it moving outwards.
#[derive(Debug, Clone)]
pub struct Stacks {
    known: Vec<KnownStack>,
    /// The stack of the last step, and how far up it the walk has come.
    at: Option<(KnownStack, u64)>,
    /// Kinds the walk has left, never to return to.
    left: Vec<StackKind>,
}

impl Stacks {
    /// The stacks `known`, no step taken yet.
    pub fn new(known: Vec<KnownStack>) -> Stacks {
        Stacks {
            known,
            at: None,
            left: Vec::new(),
        }
    }

    /// The stack of `kind` (the first, for per-CPU kinds).
    pub fn find_kind(&self, kind: StackKind) -> Option<KnownStack> {
        self.known.iter().copied().find(|s| s.kind == kind)
    }

    /// The stack holding `len` bytes at `addr`.
    pub fn find(&self, addr: u64, len: u64) -> Option<KnownStack> {
        self.known.iter().copied().find(|s| s.holds(addr, len))
    }

    /// Records a step to stack address `addr` (a stack pointer, a frame record), `len` bytes
    /// of which are read: refuses one off every stack, one that does not go up on the same
    /// stack, and one back to a stack the walk left.
    pub fn step(&mut self, addr: u64, len: u64) -> Result<(), UnwindStop> {
        let stack = self.find(addr, len).ok_or(UnwindStop::OffStack(addr))?;
        match self.at {
            Some((prev, last)) if prev == stack && addr <= last => {
                return Err(UnwindStop::WrongDirection(addr));
            }
            Some((prev, _)) if prev == stack => {}
            Some((prev, _)) => {
                if self.left.contains(&stack.kind) || stack.kind < prev.kind {
                    return Err(UnwindStop::StackRevisited(addr));
                }
                self.left.push(prev.kind);
            }
            None => {}
        }
        self.at = Some((stack, addr));
        Ok(())
    }

    /// Starts at `addr` (the hit's stack pointer) without the direction check.
    pub fn start(&mut self, addr: u64) -> Result<(), UnwindStop> {
        let stack = self.find(addr, 8).ok_or(UnwindStop::OffStack(addr))?;
        self.at = Some((stack, addr.wrapping_sub(1)));
        Ok(())
    }
}

/// Everything needed to unwind one kernel, shared by all hits of a run.
#[derive(Debug)]
pub struct KernelUnwinder<A: Unwind> {
    /// The walker's tables.
    pub tables: A::Tables,
    /// Where the stacks are.
    pub layout: StackLayout,
    /// Where the current task is.
    pub task: TaskLayout,
    /// The per-CPU stacks once every CPU's could be read (they are set up once, at boot).
    per_cpu: OnceLock<Vec<KnownStack>>,
    /// The vmlinux's `.notes` and where the running kernel has its own.
    notes: (Vec<u8>, u64),
    /// Whether the running kernel's notes are the vmlinux's, once they could be read: the
    /// reason if not.
    verdict: OnceLock<Result<(), String>>,
}

impl<A: Unwind> KernelUnwinder<A> {
    /// An unwinder over the vmlinux's `tables` for the kernel `btf` and `map` describe.
    pub fn new(tables: &UnwindTables, btf: &Btf, map: &SymbolMap) -> Result<Self, UnwindError> {
        Ok(KernelUnwinder {
            tables: A::tables(tables, btf, map)?,
            layout: A::stack_layout(btf, map)?,
            task: TaskLayout::from_kernel::<A>(btf, map)?,
            per_cpu: OnceLock::new(),
            notes: (tables.notes.clone(), symbol(map, "__start_notes")?),
            verdict: OnceLock::new(),
        })
    }

    /// Whether the running kernel is the vmlinux's (its `.notes`, which hold the build id,
    /// are the same bytes); the reason if not. Checked once, at the first hit that can read
    /// them.
    fn check_kernel(&self, reader: &mut StackReader<'_, A>, slide: u64) -> Result<(), String> {
        if let Some(v) = self.verdict.get() {
            return v.clone();
        }
        let (want, va) = &self.notes;
        let mut have = vec![0u8; want.len()];
        if reader.read(va.wrapping_add(slide), &mut have).is_err() {
            return Ok(());
        }
        let verdict = if &have == want {
            Ok(())
        } else {
            Err("the vmlinux is not the running kernel's (its .notes, which hold the build id, differ)".to_string())
        };
        self.verdict.get_or_init(|| verdict).clone()
    }

    /// The stack of the hit in `ctx`, where KASLR moved the kernel by `slide`.
    pub fn unwind(&self, ctx: &ProbeContext<'_, A>, slide: u64) -> StackTrace {
        let mut reader = StackReader::new(ctx);
        if let Err(why) = self.check_kernel(&mut reader, slide) {
            return StackTrace::unreliable(ctx.regs.pc(), UnwindStop::WrongKernel(why));
        }
        let known = match self.known_stacks(ctx, &mut reader, slide) {
            Ok(k) => k,
            Err(why) => return StackTrace::unreliable(ctx.regs.pc(), why),
        };
        A::walk(ctx, self, &mut reader, &Stacks::new(known), slide)
    }

    /// The stack of the hit in `ctx` on the stacks `known` (found by the caller), without the
    /// check of the running kernel: what a walk costs by itself, for benchmarks.
    pub fn unwind_on(
        &self,
        ctx: &ProbeContext<'_, A>,
        known: Vec<KnownStack>,
        slide: u64,
    ) -> StackTrace {
        let mut reader = StackReader::new(ctx);
        A::walk(ctx, self, &mut reader, &Stacks::new(known), slide)
    }

    /// The current task's stack and the per-CPU ones.
    fn known_stacks(
        &self,
        ctx: &ProbeContext<'_, A>,
        reader: &mut StackReader<'_, A>,
        slide: u64,
    ) -> Result<Vec<KnownStack>, UnwindStop> {
        let task = A::current_task(ctx, self.task.current_task)
            .map_err(|e| UnwindStop::NoStacks(format!("current task: {e}")))?;
        let base = reader
            .read_u64(task.wrapping_add(self.layout.task_stack))
            .map_err(|_| UnwindStop::NoStacks(format!("task {task:#x}: stack unreadable")))?;
        let mut known = vec![KnownStack {
            kind: StackKind::Task,
            base,
            top: base.wrapping_add(self.layout.thread_size),
        }];
        match self.per_cpu.get() {
            Some(s) => known.extend_from_slice(s),
            None => {
                let (stacks, complete) = self.read_per_cpu(reader, slide);
                known.extend_from_slice(&stacks);
                if complete {
                    let _ = self.per_cpu.set(stacks);
                }
            }
        }
        Ok(known)
    }

    /// Every CPU's per-CPU stacks, and whether all of them were there to read.
    fn read_per_cpu(&self, reader: &mut StackReader<'_, A>, slide: u64) -> (Vec<KnownStack>, bool) {
        let l = &self.layout;
        let cpus = reader
            .read_u32(l.nr_cpu_ids.wrapping_add(slide))
            .map(|n| u64::from(n).min(MAX_CPUS))
            .unwrap_or(0);
        let var_slide = if l.per_cpu_slid { slide } else { 0 };
        let mut out = Vec::new();
        let mut complete = cpus > 0;
        for cpu in 0..cpus {
            let Ok(offset) = reader.read_u64(l.per_cpu_offset.wrapping_add(slide + 8 * cpu)) else {
                complete = false;
                continue;
            };
            for s in &l.per_cpu {
                let var = s.symbol.wrapping_add(var_slide).wrapping_add(offset);
                let base = match s.points {
                    StackPointerKind::Inline => Some(var),
                    StackPointerKind::Base => reader.read_u64(var).ok().filter(|p| *p != 0),
                    StackPointerKind::TopWord => reader
                        .read_u64(var)
                        .ok()
                        .filter(|p| *p != 0)
                        .map(|p| p.wrapping_add(8).wrapping_sub(s.size)),
                };
                match base {
                    Some(b) => out.push(KnownStack {
                        kind: s.kind,
                        base: b,
                        top: b.wrapping_add(s.size),
                    }),
                    None => complete = false,
                }
            }
        }
        (out, complete)
    }
}

impl<A: Unwind> KernelUnwinder<A> {
    /// An unwinder over ready-made parts (a kernel described by hand: tests, benchmarks).
    pub fn from_parts(tables: A::Tables, layout: StackLayout) -> Self {
        KernelUnwinder {
            tables,
            layout,
            task: TaskLayout {
                current_task: None,
                pid: 0,
                tgid: 0,
                comm: 0,
            },
            per_cpu: OnceLock::new(),
            notes: (Vec::new(), 0),
            verdict: OnceLock::new(),
        }
    }
}

/// Made-up stacks for tests and benchmarks.
pub mod testing {
    use super::*;

    /// A layout with no per-CPU stacks and, for arm64, a 336-byte `pt_regs` whose frame
    /// record is at 304 (Linux 6.1's).
    pub fn layout(top_regs: bool) -> StackLayout {
        StackLayout {
            task_stack: 0,
            thread_size: 16 << 10,
            per_cpu: Vec::new(),
            per_cpu_offset: 0,
            nr_cpu_ids: 0,
            per_cpu_slid: false,
            top_regs: top_regs.then_some(TopRegs {
                size: 336,
                record: 304,
            }),
        }
    }

    /// The task stack of the fake machines: its top is the end of their one stack page.
    pub fn task_stack(page: u64) -> Stacks {
        Stacks::new(task_stacks(page))
    }

    /// Cases per fuzzing property: `HVPROBE_FUZZ_CASES`, else `default` (what `cargo test`
    /// runs each time).
    pub fn fuzz_cases(default: u32) -> u32 {
        std::env::var("HVPROBE_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// [`task_stack`]'s stack alone.
    pub fn task_stacks(page: u64) -> Vec<KnownStack> {
        vec![KnownStack {
            kind: StackKind::Task,
            base: page + 4096 - (16 << 10),
            top: page + 4096,
        }]
    }
}
