//! The probe engine: the probe table keyed by guest physical address, planting and removal,
//! and the per-vCPU hit state machine (breakpoint -> handlers -> step plan -> resume). It is
//! generic over the architecture ([`Arch`]): nothing here knows an instruction set, a register
//! file or a page-table format.
//!
//! The engine runs in the vCPU threads: each debug exit is handled on the thread that took it,
//! against that vCPU's [`VcpuAccess`] and its own [`VcpuProbeState`]; the table is shared and
//! only written while every vCPU is out of `KVM_RUN` (the VMM pauses them to plant or remove).

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::arch::{
    Arch, DecodeError, DecodedInstruction, EmulationError, GuestBreakpoints, GuestStack,
    HostEmulation, InstructionDecoder, OutOfLineCopy, PlanKind, Refusal, RegisterFile, StepPlan,
};
use crate::guest_kprobes::GuestKprobe;
use crate::pagewalk::WalkError;
use crate::probe::{Handler, Probe, ProbeContext, ReturnRecovery, TrapKind};
use crate::retprobe::{Instance, InstanceTable, Returning};
use crate::vm::{DebugEvent, GuestPhysMemory, VcpuAccess, VcpuError, Verdict};
use crate::xol::{XolArea, XolError, XolSlot};

/// How long a trapped step may stay pending on a vCPU before it counts as abandoned (its copy
/// faulted and the guest went elsewhere): with interrupts off it completes at once otherwise.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// How many probed instructions in a row one exit follows through emulation.
const MAX_CHAINED_HITS: usize = 8;

/// Why a probe could not be planted at its location ([`PlantError::kind`]).
#[derive(Debug, thiserror::Error)]
pub enum PlantErrorKind {
    /// The address is not mapped in the guest's kernel page tables.
    #[error("{va:#x} is not mapped in the guest ({source})")]
    NotMapped {
        /// The address.
        va: u64,
        /// The walk error.
        source: WalkError,
    },
    /// Guest memory could not be read or written.
    #[error("guest memory at {gpa:#x} is not accessible")]
    Memory {
        /// The guest physical address.
        gpa: u64,
    },
    /// Decoding failed or the offset is not on an instruction boundary.
    #[error("{source}")]
    Decode {
        /// What went wrong.
        source: DecodeError,
    },
    /// The instruction cannot be probed.
    #[error("{source}")]
    Refused {
        /// Why.
        source: Refusal,
    },
    /// No XOL slot.
    #[error("{source}")]
    Xol {
        /// What went wrong.
        source: XolError,
    },
    /// The architecture cannot watch this here.
    #[error("{reason}")]
    WatchRefused {
        /// Why.
        reason: &'static str,
    },
    /// A watchpoint's address is not aligned to its length (the debug registers watch
    /// aligned ranges only).
    #[error("{va:#x} is not aligned to the watched length of {len} bytes")]
    WatchMisaligned {
        /// The address.
        va: u64,
        /// The length.
        len: u8,
    },
    /// A protected region shares bytes with one planted before.
    #[error("it overlaps the protected region {other}")]
    ProtectOverlap {
        /// The other region.
        other: String,
    },
    /// All watchpoint registers are taken (where they are apart from the breakpoints').
    #[error("all {count} hardware watchpoints are in use")]
    NoWatchpoint {
        /// How many the vCPUs have.
        count: usize,
    },
    /// All hardware breakpoints are taken.
    #[error("all {count} hardware breakpoints are in use")]
    NoHardwareBreakpoint {
        /// How many the vCPUs have.
        count: usize,
    },
    /// The same address has probes of both trap kinds.
    #[error("the address already has a probe with the other trap kind")]
    MixedTraps,
    /// The probe needs a software breakpoint of the host's (a trampoline, a trapped slot) and
    /// this KVM does not deliver breakpoint exits.
    #[error(
        "{what} needs software-breakpoint traps (int3, BRK), which this KVM does not deliver (the trap self-test found hardware breakpoints only)"
    )]
    NeedsInt3 {
        /// What needs it.
        what: &'static str,
    },
    /// The address is on, or inside the text taken by, one of the guest's own kprobes.
    #[error(
        "{va:#x} is {where_} the guest's own kprobe at {kprobe:#x}; hvprobe does not plant over it"
    )]
    GuestKprobe {
        /// The probed address.
        va: u64,
        /// The guest kprobe's address.
        kprobe: u64,
        /// "at" or "inside the optimized jump of".
        where_: &'static str,
    },
    /// A post handler on an instruction whose copy cannot be followed by the host's trap.
    #[error("a post handler cannot run after `{instruction}`: it {reason}")]
    Untrappable {
        /// The instruction.
        instruction: String,
        /// Why.
        reason: &'static str,
    },
    /// A RIP-relative operand whose target a copy in the XOL area cannot reach.
    #[error(
        "`{instruction}` addresses memory beyond +-2 GiB of the XOL area; its copy cannot be relocated"
    )]
    OutOfReach {
        /// The instruction.
        instruction: String,
    },
    /// The instruction may fault with a fix-up in the guest's exception table.
    #[error(
        "refusing to probe `{instruction}` at {va:#x}: it has an entry in the guest's exception table (__ex_table), so a fault in a copy out of line could not be fixed up"
    )]
    ExceptionTable {
        /// The instruction.
        instruction: String,
        /// Its address.
        va: u64,
    },
    /// A probe added to a site whose trap the engine took out earlier (its other probes stay
    /// listed, counting misses): it would never fire.
    #[error(
        "hvprobe disarmed the probe site at {va:#x} during the run ({reason}); remove its probes before probing there again"
    )]
    DisarmedSite {
        /// The site's address.
        va: u64,
        /// Why it was disarmed.
        reason: &'static str,
    },
    /// The guest kernel rewrites the instruction itself (a jump label or static call site)
    /// and checks what it finds there first.
    #[error(
        "refusing to probe {va:#x}: it is {what}, which the guest kernel rewrites at run time after checking its bytes (a breakpoint or jump there would be a kernel BUG)"
    )]
    PatchedByKernel {
        /// The address.
        va: u64,
        /// Which kind of site.
        what: &'static str,
    },
    /// A return probe away from a function's first instruction.
    #[error("a return probe must be on a function's first instruction")]
    NotFunctionEntry,
    /// A return probe the architecture's rule refuses at its address.
    #[error("refusing the return probe: {reason}")]
    ReturnProbeRefused {
        /// Why.
        reason: &'static str,
    },
}

/// A probe that could not be planted: where, and why. Nothing of it is left in the guest.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {kind}")]
pub struct PlantError {
    /// The probe's location as the user wrote it (or its address).
    pub location: String,
    /// Why.
    #[source]
    pub kind: PlantErrorKind,
}

impl PlantError {
    /// The error `kind` at `location`.
    pub fn new(location: impl Into<String>, kind: PlantErrorKind) -> PlantError {
        PlantError {
            location: location.into(),
            kind,
        }
    }
}

/// Why a probe could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    /// No probe has this id (removed already, or never planted).
    #[error("no probe with id {}", .0.0)]
    UnknownProbe(ProbeId),
    /// The guest's bytes could not be written back under the site.
    #[error("restoring the text at {va:#x}: guest memory at {gpa:#x} is not accessible")]
    Memory {
        /// The site's address.
        va: u64,
        /// Its guest physical address.
        gpa: u64,
    },
}

/// Identifies a planted probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeId(pub usize);

/// Counters of one probe.
#[derive(Debug, Default)]
struct ProbeCounters {
    hits: AtomicU64,
    missed: AtomicU64,
    handler_errors: AtomicU64,
    returns: AtomicU64,
    nmissed: AtomicU64,
}

/// A snapshot of one probe's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStats {
    /// The probe's id.
    pub id: ProbeId,
    /// Its location as given.
    pub location: String,
    /// Its address.
    pub address: u64,
    /// Name of the step plan (`emulate`, `xol`, `xol-riprel`, `xol-call`).
    pub plan: PlanKind,
    /// The probed instruction.
    pub instruction: String,
    /// Which trap.
    pub trap: TrapKind,
    /// Times a vCPU reached it.
    pub hits: u64,
    /// Hits on which the handlers could not run.
    pub missed: u64,
    /// Handler calls that returned an error or panicked.
    pub handler_errors: u64,
    /// Whether it is a return probe.
    pub return_probe: bool,
    /// Returns seen (return probes).
    pub returns: u64,
    /// Entries whose return could not be watched: `max_active` instances were live, or the
    /// frame never returned through its caller.
    pub nmissed: u64,
    /// Return instances outstanding: entered, not yet returned (a removed return probe's keep
    /// returning through the trampoline to their real return addresses).
    pub outstanding: usize,
    /// For a probe that could run in the guest but takes exits: why its site has no jump plan.
    pub jump_refusal: Option<&'static str>,
}

struct ProbeEntry<A: Arch> {
    id: ProbeId,
    location: String,
    pre: Option<Handler<A>>,
    post: Option<Handler<A>>,
    on_return: Option<Handler<A>>,
    max_active: usize,
    counters: ProbeCounters,
}

impl<A: Arch> ProbeEntry<A> {
    /// Whether a hit hands the registers to code of the probe's (a handler, or the return
    /// instance that keeps the entry registers): they must all have been read.
    fn sees_registers(&self) -> bool {
        self.pre.is_some() || self.post.is_some() || self.on_return.is_some()
    }

    fn new(id: ProbeId, location: String, probe: Probe<A>) -> Arc<ProbeEntry<A>> {
        Arc::new(ProbeEntry {
            id,
            location,
            pre: probe.pre,
            post: probe.post,
            on_return: probe.on_return,
            max_active: probe.max_active,
            counters: ProbeCounters::default(),
        })
    }
}

/// One planted breakpoint: an address with one or more probes on it.
struct Site<A: Arch> {
    va: u64,
    trap: TrapKind,
    /// The guest's bytes under the breakpoint, restored on removal.
    saved: Vec<u8>,
    instruction: String,
    /// How the instruction runs; shared so that a hit takes it without copying (the table
    /// lock is not held meanwhile), copied on write when a probe adds a trapped slot.
    run: Arc<SiteRun<A>>,
    /// Shared for the same reason; planting and removal copy on write.
    probes: Arc<Vec<Arc<ProbeEntry<A>>>>,
    /// Set, with the reason, when the engine had to take the trap out while the probes stay
    /// listed.
    disarmed: std::sync::OnceLock<&'static str>,
    /// Hits in the current window, and whether the rate cap paused the site.
    rate: Arc<rate::SiteRate>,
    /// What the engine wrote over the instruction: the breakpoint, or a jump plan's jump.
    patch: Vec<u8>,
    /// Why a probe that could have run in the guest takes exits here.
    jump_refusal: Option<&'static str>,
    /// On a guarded page (arm64 BTI): moving the PC on from its trap must clear the branch
    /// type the guest arrived with ([`Arch::after_trap`]), which costs reading the flags.
    guarded: bool,
}

/// How a site's instruction runs once its handlers have. Each variant holds exactly the slots
/// it uses, so that an out-of-line site without its copy, or a trapped slot for an emulated
/// instruction, cannot be written.
#[derive(Debug)]
enum SiteRun<A: Arch> {
    /// Emulated on the host.
    Emulate {
        /// The emulation.
        emulation: A::Emulation,
        /// The boosted copy of the real instruction, where it runs when the emulated stack
        /// access fails (stack-touching instructions only).
        fallback: Option<XolSlot>,
    },
    /// Copied out of line.
    OutOfLine {
        /// The copy and its fix-ups.
        ool: A::Copy,
        /// The boosted slot (the copy, then a branch back): where the instruction runs.
        boosted: XolSlot,
        /// The trapped slot (the copy, then the host's breakpoint), once a post handler wants
        /// one.
        trapped: Option<XolSlot>,
        /// The instruction has an entry in the guest's exception table: it always runs in the
        /// trapped slot, where a fault of the copy is rewound to it and the guest's fix-up
        /// applies.
        fixed_up: bool,
    },
    /// A jump into a trampoline that records hits in the guest's rings (no exit); `tag` names
    /// the site in its records.
    Jump {
        /// The site's tag.
        tag: u32,
        /// The task filter its trampoline evaluates: every probe of the site has this one.
        filter: Option<crate::definition::TaskFilter>,
    },
}

impl<A: Arch> Clone for SiteRun<A> {
    fn clone(&self) -> Self {
        match self {
            SiteRun::Emulate {
                emulation,
                fallback,
            } => SiteRun::Emulate {
                emulation: emulation.clone(),
                fallback: *fallback,
            },
            SiteRun::OutOfLine {
                ool,
                boosted,
                trapped,
                fixed_up,
            } => SiteRun::OutOfLine {
                ool: ool.clone(),
                boosted: *boosted,
                trapped: *trapped,
                fixed_up: *fixed_up,
            },
            SiteRun::Jump { tag, filter } => SiteRun::Jump {
                tag: *tag,
                filter: filter.clone(),
            },
        }
    }
}

impl<A: Arch> ProbeTable<A> {
    /// Frees the hardware slots holding an execute breakpoint at `va` (a watchpoint on the
    /// same address keeps its own).
    fn free_breakpoint_slots(&mut self, va: u64) {
        for (i, slot) in self.hw.iter_mut().enumerate() {
            if *slot == Some(va)
                && !(A::WATCHPOINTS_SHARE_BREAKPOINTS && self.watches.values().any(|w| w.slot == i))
            {
                *slot = None;
            }
        }
    }

    /// Brings [`ProbeTable::site_vas`] up to date for `va` after a trapping site there came
    /// or went.
    fn index_site_va(&mut self, va: u64) {
        let mut gpas = self
            .sites
            .iter()
            .filter(|(_, s)| s.va == va && !matches!(*s.run, SiteRun::Jump { .. }))
            .map(|(&gpa, _)| gpa);
        match (gpas.next(), gpas.next()) {
            (None, _) => self.site_vas.remove(&va),
            (Some(gpa), None) => self.site_vas.insert(va, Some(gpa)),
            (Some(_), Some(_)) => self.site_vas.insert(va, None),
        };
    }
}

impl<A: Arch> SiteRun<A> {
    /// The registers running the instruction reads or writes on the host, as a register-use
    /// mask (an out-of-line copy runs in the guest: the host moves only the PC, and the flags
    /// for a trapped step, which asks for them itself).
    fn registers_used(&self) -> u64 {
        match self {
            SiteRun::Emulate { emulation, .. } => emulation.registers_used(),
            SiteRun::OutOfLine { .. } | SiteRun::Jump { .. } => 0,
        }
    }

    /// Of those, the ones the instruction writes whole without reading them.
    fn registers_overwritten(&self) -> u64 {
        match self {
            SiteRun::Emulate { emulation, .. } => emulation.registers_overwritten(),
            SiteRun::OutOfLine { .. } | SiteRun::Jump { .. } => 0,
        }
    }

    /// The kind of plan, for statistics.
    fn kind(&self) -> PlanKind {
        match self {
            SiteRun::Emulate { .. } => PlanKind::Emulate,
            SiteRun::OutOfLine { ool, .. } => ool.kind(),
            SiteRun::Jump { .. } => PlanKind::Jump,
        }
    }
}

/// A trap the engine planted and later found rewritten by the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrittenSite {
    /// The probed address.
    pub va: u64,
    /// What the guest wrote there.
    pub found: Vec<u8>,
}

/// Counts of debug exits by what they were, for figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// Software breakpoint exits that were ours.
    pub breakpoints: u64,
    /// Hardware breakpoint exits that were ours.
    pub hw_breakpoints: u64,
    /// Traps that were the guest's own and went back to it.
    pub reinjected: u64,
    /// Returns through the return-probe trampoline.
    pub returns: u64,
    /// Trapped steps completed through a slot's int3.
    pub slot_traps: u64,
    /// Debug exceptions that were the guest's own (its single-step) and went back to it.
    pub reinjected_debug: u64,
    /// Trapped steps that never reached their trap (the copy faulted and the guest went on
    /// elsewhere), dropped after a bound.
    pub abandoned_steps: u64,
    /// Emulated instructions whose stack access failed, left to the real instruction in a
    /// boosted slot so that the guest takes its own fault.
    pub emulation_fallbacks: u64,
    /// Hits per step plan name.
    pub hits_by_plan: Vec<(PlanKind, u64)>,
    /// Hits past a site's rate cap (counted as missed; the site paused for the window).
    pub rate_capped: u64,
    /// Exceptions the guest took inside a trapped slot, rewound to the probed instruction
    /// with its interrupt mask ([`ProbeEngine::rewind_slot_exception`]).
    pub slot_exceptions: u64,
    /// Exits that began a step over an access a watchpoint reported before it (arm64): a
    /// watchpoint hit there takes two exits.
    pub watch_steps: u64,
    /// Writes to protected pages that touched protected bytes (each one exit).
    pub protected_writes: u64,
    /// Writes to protected pages that touched only their unprotected bytes: completed
    /// silently, the cost of page granularity.
    pub neighbour_writes: u64,
    /// Of both, the stores without a syndrome the VMM decoded and emulated (arm64).
    pub emulated_stores: u64,
    /// Writes to protected bytes by exempted writers (`--protect-allow`): made, not reported.
    pub exempted_writes: u64,
}

#[derive(Default)]
struct ExitCounters {
    breakpoints: AtomicU64,
    hw_breakpoints: AtomicU64,
    reinjected: AtomicU64,
    returns: AtomicU64,
    slot_traps: AtomicU64,
    reinjected_debug: AtomicU64,
    abandoned_steps: AtomicU64,
    emulation_fallbacks: AtomicU64,
    rate_capped: AtomicU64,
    slot_exceptions: AtomicU64,
    watch_steps: AtomicU64,
    protected_writes: AtomicU64,
    neighbour_writes: AtomicU64,
    emulated_stores: AtomicU64,
    exempted_writes: AtomicU64,
    /// Hits by plan, indexed by [`PlanKind`] as `usize`.
    by_plan: [AtomicU64; PlanKind::ALL.len()],
}

/// A trapped step under way on one vCPU: its copy runs with interrupts off until the slot's
/// breakpoint, which is found by its address (never by "a step is pending").
#[derive(Debug, Clone)]
struct PendingStep {
    /// Where the copy starts: an exception taken at `slot_va..trap_va` was the copy's.
    slot_va: u64,
    trap_va: u64,
    /// The probed instruction, where such an exception is rewound to.
    orig_va: u64,
    /// What [`Arch::begin_trapped_step`] saved of the interrupt mask.
    interrupts: u64,
    since: Instant,
}

/// How to rewind an exception taken inside a trapped slot
/// ([`ProbeEngine::rewind_slot_exception`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRewind {
    /// The probed instruction: the exception's return address.
    pub resume_at: u64,
    /// The interrupt mask bits the step saved ([`Arch::begin_trapped_step`]), for the
    /// exception's saved state.
    pub interrupts: u64,
}

/// Per-vCPU engine state, owned by the vCPU thread: the trapped steps under way (more than
/// one only when an NMI handler hits a probe between a copy and its trap).
#[derive(Debug, Default)]
pub struct VcpuProbeState {
    pending: Vec<PendingStep>,
    /// Probe sites this vCPU hit (a hit of a site with several probes counts once).
    site_hits: u64,
}

impl VcpuProbeState {
    /// Probe sites this vCPU has hit, rate-capped hits not included.
    pub fn site_hits(&self) -> u64 {
        self.site_hits
    }

    /// Whether a trapped step is pending on this vCPU.
    pub fn stepping(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Where a trapped slot's breakpoint sends the vCPU.
#[derive(Debug, Clone, Copy)]
struct SlotTrap {
    orig_va: u64,
    len: u64,
    site_gpa: u64,
}

struct ProbeTable<A: Arch> {
    sites: HashMap<u64, Site<A>>,
    /// The trapping sites by virtual address: a hit finds its site here without a page walk
    /// (which on arm64 would cost two register reads first), and after an emulated
    /// instruction whether the next one is probed too. `None`: sites on several pages share
    /// the address, and only the walk tells which one trapped. Sites are in kernel text,
    /// whose mapping never changes.
    site_vas: HashMap<u64, Option<u64>>,
    by_probe: HashMap<ProbeId, u64>,
    /// The data watchpoints, by probe.
    watches: HashMap<ProbeId, watch::WatchSite<A>>,
    /// Watchpoint slots where the architecture has registers for them apart from the
    /// breakpoints' (arm64): the address each holds.
    watch_hw: Vec<Option<u64>>,
    /// The write-protected regions, by probe.
    protects: HashMap<ProbeId, protect::ProtectSite<A>>,
    /// The breakpoint of each trapped slot, by its address.
    slot_traps: HashMap<u64, SlotTrap>,
    /// Addresses of the instructions with an entry in the guest's exception table.
    exception_table: HashSet<u64>,
    /// Text the guest kernel rewrites itself (jump label and static call sites), with what.
    patched_text: HashMap<u64, &'static str>,
    /// The guest's own armed kprobes, when its kprobe table could be read.
    guest_kprobes: Option<HashMap<u64, GuestKprobe>>,
    /// Every site's text range (address, patch length) the engine has planted since it
    /// started, removed ones included: what a check of the text after removal must find as
    /// the guest had it.
    touched: Vec<(u64, u64)>,
    next_id: usize,
    /// The hardware breakpoint addresses, one entry per breakpoint the vCPUs have.
    hw: Vec<Option<u64>>,
    /// What the guest's CPU offers, for planning.
    cpu_features: A::CpuFeatures,
}

/// The probe engine for guests of architecture `A` over guest memory `M`.
pub struct ProbeEngine<A: Arch, M: GuestMemory + Send + Sync> {
    mem: M,
    table: RwLock<ProbeTable<A>>,
    xol: Mutex<XolArea>,
    /// Base of the XOL area's code pages (fixed): where a copy's reach is checked.
    xol_va_base: u64,
    exits: ExitCounters,
    start: Instant,
    hw_generation: AtomicU64,
    breakpoint_written: AtomicBool,
    breakpoints_trappable: AtomicBool,
    returns: Mutex<InstanceTable<A::Registers, Arc<ProbeEntry<A>>>>,
    trampoline: Mutex<Option<XolSlot>>,
    /// Instruction writes made visible to instruction fetch ([`Arch::sync_instructions`]).
    instruction_syncs: AtomicU64,
    /// Hits a second each site may take (0: no cap).
    rate_cap: AtomicU64,
    /// The VMM reports exceptions taken inside trapped slots
    /// ([`ProbeEngine::set_slot_exception_rewind`]).
    slot_exception_rewind: AtomicBool,
    /// The jump plan's rings and what its trampolines read, once enabled.
    jump: Mutex<jump::JumpState>,
    /// Held while the rings are drained: one drainer at a time.
    draining: Mutex<()>,
    /// Held while a store to a protected page is made: one at a time.
    protect_stores: Mutex<()>,
    /// Changes whenever the protected pages do.
    protect_generation: AtomicU64,
    /// The reservations of store-exclusives to protected pages.
    exclusive: Mutex<protect::ExclusiveMonitor>,
    /// Which writers of protected bytes are exempt (`--protect-allow`).
    protect_exemption: RwLock<Option<ProtectExemption<A>>>,
}

/// Says whether the writer of protected bytes in a context is exempt from protection.
pub type ProtectExemption<A> = Arc<dyn Fn(&ProbeContext<'_, A>) -> bool + Send + Sync>;

/// Where to plant: the address, and the function start to decode from for the boundary check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlantTarget {
    /// The probed address.
    pub va: u64,
    /// Start of the containing function, when known.
    pub function_start: Option<u64>,
}

impl<A: Arch, M: GuestMemory + Send + Sync> ProbeEngine<A, M> {
    /// An engine over `mem` with the XOL area `xol` (whose page tables it writes now), with
    /// every hardware breakpoint the architecture defines until
    /// [`ProbeEngine::set_hardware_breakpoint_count`] says how many the vCPUs have.
    pub fn new(mem: M, xol: XolArea) -> Result<ProbeEngine<A, M>, XolError> {
        A::write_xol_tables(&xol, &mem)?;
        Ok(ProbeEngine {
            xol_va_base: xol.va_base(),
            mem,
            table: RwLock::new(ProbeTable {
                sites: HashMap::new(),
                site_vas: HashMap::new(),
                by_probe: HashMap::new(),
                watches: HashMap::new(),
                watch_hw: Vec::new(),
                protects: HashMap::new(),
                slot_traps: HashMap::new(),
                exception_table: HashSet::new(),
                patched_text: HashMap::new(),
                guest_kprobes: None,
                touched: Vec::new(),
                next_id: 0,
                hw: vec![None; A::MAX_HW_BREAKPOINTS],
                cpu_features: A::CpuFeatures::default(),
            }),
            xol: Mutex::new(xol),
            exits: ExitCounters::default(),
            start: Instant::now(),
            hw_generation: AtomicU64::new(0),
            breakpoint_written: AtomicBool::new(false),
            breakpoints_trappable: AtomicBool::new(true),
            returns: Mutex::new(InstanceTable::new(A::KERNEL_STACK_SIZE)),
            trampoline: Mutex::new(None),
            instruction_syncs: AtomicU64::new(0),
            rate_cap: AtomicU64::new(0),
            slot_exception_rewind: AtomicBool::new(false),
            jump: Mutex::default(),
            draining: Mutex::new(()),
            protect_stores: Mutex::new(()),
            protect_generation: AtomicU64::new(0),
            exclusive: Mutex::default(),
            protect_exemption: RwLock::new(None),
        })
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Records the addresses of the instructions the guest's exception table lists
    /// (`__start___ex_table`..`__stop___ex_table`): they are never copied out of line.
    pub fn set_exception_table(&self, addresses: impl IntoIterator<Item = u64>) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        table.exception_table = addresses.into_iter().collect();
    }

    /// Records the instructions the guest kernel rewrites itself at run time (`what` they
    /// are: "a jump label site", "a static call site"; [`crate::patched_text`]): no probe is
    /// planted on one.
    pub fn set_patched_text(&self, addresses: impl IntoIterator<Item = u64>, what: &'static str) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        table
            .patched_text
            .extend(addresses.into_iter().map(|a| (a, what)));
    }

    /// Says that the VMM sees every exception the guest takes inside a trapped slot and calls
    /// [`ProbeEngine::rewind_slot_exception`] before the guest's handler runs (arm64: a
    /// hardware breakpoint on the kernel's vector). Then instructions with an exception-table
    /// entry (user accesses) are probed too, stepped in trapped slots: their faults reach the
    /// guest at the probed address, where its fix-up applies. Call before planting.
    pub fn set_slot_exception_rewind(&self, on: bool) {
        self.slot_exception_rewind.store(on, Ordering::SeqCst);
    }

    /// Records the guest's own armed kprobes (from its `kprobe_table`): the boundary walk puts
    /// back the bytes they cover, and no probe is planted over one. Without them an int3 in
    /// the walk that may cover an instruction makes the check fail.
    pub fn set_guest_kprobes(&self, kprobes: HashMap<u64, GuestKprobe>) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        table.guest_kprobes = Some(kprobes);
    }

    /// Says how many hardware breakpoints the vCPUs have (from KVM: x86 always has four, arm64
    /// reports its count in `KVM_CAP_GUEST_DEBUG_HW_BPS`), at most the architecture's own
    /// limit. Call before planting.
    pub fn set_hardware_breakpoint_count(&self, count: usize) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        table.hw.resize(count.min(A::MAX_HW_BREAKPOINTS), None);
        self.hw_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Says what the guest's CPU offers (from its ID registers, as KVM shows them); until
    /// then the architecture's safe default is assumed. Call before planting.
    pub fn set_cpu_features(&self, features: A::CpuFeatures) {
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .cpu_features = features;
    }

    /// How many hardware breakpoints the vCPUs have.
    pub fn hardware_breakpoint_count(&self) -> usize {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .hw
            .len()
    }

    /// The hardware breakpoint addresses every vCPU must load, and a generation number that
    /// changes whenever they change.
    pub fn hardware_breakpoints(&self) -> (Vec<Option<u64>>, u64) {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        (table.hw.clone(), self.hw_generation.load(Ordering::SeqCst))
    }

    /// Whether a software breakpoint of ours has ever been written into the guest: until then
    /// no breakpoint exception can be ours, and the VMM leaves the guest's own (its kprobes,
    /// text patching) to the guest instead of trapping and handing each back.
    pub fn breakpoint_written(&self) -> bool {
        self.breakpoint_written.load(Ordering::SeqCst)
    }

    /// Says whether this KVM delivers software-breakpoint exits (the trap self-test): without
    /// them, probes that need a breakpoint of the host's (return probes' trampoline, trapped
    /// slots for post handlers) are refused, even with hardware breakpoints as their trap.
    pub fn set_breakpoints_trappable(&self, trappable: bool) {
        self.breakpoints_trappable
            .store(trappable, Ordering::SeqCst);
    }

    /// Generation of the hardware breakpoint set; cheap to poll before each `KVM_RUN`.
    pub fn hardware_generation(&self) -> u64 {
        self.hw_generation.load(Ordering::SeqCst)
    }

    /// How many instruction writes (breakpoints, slots, restored bytes) the engine has made
    /// visible to instruction fetch so far.
    pub fn instruction_syncs(&self) -> u64 {
        self.instruction_syncs.load(Ordering::Relaxed)
    }

    /// Whether the engine has any probe planted.
    pub fn is_empty(&self) -> bool {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .sites
            .is_empty()
    }
}

mod hit;
mod jump;
mod memory;
mod protect;
mod rate;
mod returns;
mod stats;
mod table;
mod watch;

pub use jump::GuestClock;
use memory::VirtualStack;
pub use memory::{hash_guest_virtual, read_guest_virtual};
pub use protect::ProtectedStore;

#[cfg(test)]
mod tests;
