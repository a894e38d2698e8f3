//! The probing side of a run: what to plant ([`ProbeSetup`]), planting once the guest is up
//! (every vCPU paused), the once-a-second hit-rate check, and removal at the end with the
//! kernel text hashed ([`ProbeReport`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use probe_core::arch::PlanKind;
use probe_core::engine::{
    ExitStats, PlantTarget, ProbeId, ProbeStats, RewrittenSite, hash_guest_virtual,
    read_guest_virtual,
};
use probe_core::guest_kprobes::KprobeTableLayout;
use probe_core::integrity::{ChangedRange, ControlChange, RegionBaseline};
use probe_core::jump::{GuestAnchors, RingLayout};
use probe_core::probe::{Probe, TrapKind};
use probe_core::symbols::SymbolMap;
use probe_core::xol::XolArea;
use probe_core::{extable, integrity, patched_text};

use super::MachineError;
use crate::arch::{self, Guest, GuestRegisters, VmmArch};
use crate::devices::console::ConsoleWatch;
use crate::probing::{Engine, PausedState, Probing, RegisterIoctls, VcpuCounts};
use crate::refusal::{RefusedProbe, refusal_list};
use crate::selftest::TrapSupport;
use crate::vcpu::{VcpuCommand, VcpuEvent, VcpuHandle};
use crate::vm::{MemorySlots, Vm};

/// A probe to plant once the guest is up.
pub struct ProbeRequest {
    /// The probe and its handlers.
    pub probe: Probe,
    /// Where (System.map's address: the KASLR slide is added at planting).
    pub target: PlantTarget,
    /// The probe as the user gave it.
    pub spec: String,
    /// Its event: `group/event` of a definition, else its location.
    pub event: String,
}

/// Makes probes while the VM runs (the live-session API): a probe given in any form `-p`
/// takes, resolved against System.map and wired to the run's handlers, or why not.
pub trait ProbeSource: Send {
    /// The probes of `spec`: one, or one per function its glob matches.
    fn make(&self, spec: &str) -> Vec<Result<ProbeRequest, RefusedProbe>>;
    /// The most probes one request may expand to (`--max-probes`).
    fn max_probes(&self) -> usize;
    /// The text functions matching `pattern`, with what the guest's kprobes and hvprobe
    /// refuse.
    fn functions(&self, pattern: &str) -> Vec<probe_core::catalog::FunctionInfo>;
}

/// What `--integrity` compares (System.map's addresses: the KASLR slide is added at the
/// baseline).
#[derive(Debug, Clone)]
pub struct IntegrityRegions {
    /// Read-only data `[start, end)`.
    pub rodata: Option<(u64, u64)>,
    /// The syscall table: its address and entries.
    pub syscall_table: Option<(u64, usize)>,
    /// The kernel's symbols, to name what changed.
    pub symbols: Arc<probe_core::symbols::SymbolMap>,
    /// Report at the end of the run (`--integrity`); without it the baseline is there for
    /// checks on demand through the live-session API only.
    pub at_end: bool,
}

/// The kernel as it was at the baseline, for `--integrity`.
struct IntegrityBaseline {
    regions: Vec<RegionBaseline>,
    /// Kernel text `[start, end)` (slid), what syscall table entries must point into.
    text: Option<(u64, u64)>,
    /// The syscall table (slid) and its entries.
    syscall_table: Option<(u64, usize)>,
    control: Vec<(&'static str, u64)>,
}

/// What `--integrity` found at the end of the run.
#[derive(Debug, Clone, Default)]
pub struct IntegrityReport {
    /// Changed ranges: region name, range (the running kernel's addresses), and the symbol
    /// it starts in.
    pub changed: Vec<(&'static str, ChangedRange, String)>,
    /// Syscall table entries outside kernel text: (index, value).
    pub syscalls_outside_text: Vec<(usize, u64)>,
    /// Protection settings that moved.
    pub control: Vec<ControlChange>,
    /// What could not be read or compared.
    pub errors: Vec<String>,
}

/// The probes of a run.
pub struct ProbeSetup {
    /// What to plant, in order.
    pub requests: Vec<ProbeRequest>,
    /// Which writers of protected bytes are exempt (`--protect-allow`).
    pub protect_exemption: Option<ProtectExemption>,
    /// The regions `--integrity` checks (System.map's addresses), if it was asked for.
    pub integrity: Option<IntegrityRegions>,
    /// Kernel text `[start, end)` (virtual, System.map's), hashed before planting and after removal.
    pub text: Option<(u64, u64)>,
    /// XOL code pages to reserve.
    pub xol_pages: usize,
    /// The kernel's freed init range (System.map `__init_begin`, `__init_end`): where the XOL
    /// code pages get an alias within a branch's reach of the text on an architecture whose
    /// XOL area is beyond it (arm64), for jump-plan trampolines and boosted slots.
    pub code_window: Option<(u64, u64)>,
    /// System.map's addresses the architecture's KASLR anchor register may hold
    /// ([`arch::KaslrAnchor::linked_addresses`]), to find the slide from the running guest;
    /// empty: no slide is looked for.
    pub kaslr_anchors: Vec<(u64, String)>,
    /// The KASLR slide once found, shared with handlers that symbolize addresses.
    pub slide: Arc<AtomicU64>,
    /// System.map's address of the kernel's return path to user mode
    /// ([`arch::Host::USER_RETURN_SYMBOL`]), where the guest's own software step is carried through.
    pub user_return: Option<u64>,
    /// System.map's address of the kernel's own top-level page table
    /// ([`arch::Host::KERNEL_ROOT_SYMBOL`]), read through for the whole run.
    pub kernel_root: Option<u64>,
    /// System.map's `__start___ex_table` and `__stop___ex_table`: instructions listed there are
    /// copied out of line only where a fault of the copy is rewound to them.
    pub exception_table: Option<(u64, u64)>,
    /// Tables of text the guest kernel rewrites itself (System.map's start and stop, the
    /// entry size, what a site is: [`probe_core::patched_text`]); no probe goes on those
    /// sites.
    pub patched_text: Vec<(u64, u64, usize, &'static str)>,
    /// Plant what can be planted and report the refused probes, instead of all or nothing.
    pub skip_refused: bool,
    /// Hits a second each site may take (`--max-rate`).
    pub max_rate: Option<u64>,
    /// Probes refused before the run (when they were resolved) and skipped.
    pub refused: Vec<RefusedProbe>,
    /// What the trap self-test found, and the trap the probes use. Software-breakpoint exits
    /// are trapped from the first breakpoint of hvprobe's in the guest (a probe, a trapped
    /// slot, the return trampoline), whatever trap the probes use; without them, what needs
    /// one is refused. With hardware-breakpoint exits too, one hardware breakpoint watches for
    /// exceptions taken inside trapped slots, where the architecture has that watch
    /// ([`<arch::GuestDebugSetup as arch::GuestDebug>::SLOT_EXCEPTION_WATCH`]).
    pub traps: (TrapSupport, TrapKind),
    /// The jump plan: rings of this many records per vCPU in the XOL area's data pages, and
    /// what the trampolines read; `None`: every probe takes exits (`--plan exit`).
    pub jump: Option<JumpSetup>,
    /// Makes probes while the VM runs (`--api-socket`); `None`: the probes are fixed.
    pub source: Option<Box<dyn ProbeSource>>,
    /// Where the guest keeps its own kprobes, read at planting so that the boundary walk
    /// reads through them.
    pub guest_kprobes: Option<KprobeTableLayout>,
}

/// The jump plan of a run ([`probe_core::jump`]).
#[derive(Debug, Clone)]
pub struct JumpSetup {
    /// Records per vCPU ring.
    pub records: u64,
    /// Where the guest keeps the current CPU and task (System.map, BTF).
    pub anchors: GuestAnchors,
    /// Kernel text no jump goes into (System.map addresses), with why.
    pub excluded: Vec<(u64, u64, &'static str)>,
}

impl JumpSetup {
    /// XOL data pages the rings of `vcpus` vCPUs take.
    pub fn pages(&self, vcpus: u32) -> u64 {
        RingLayout::bytes_for(vcpus, self.records) / 4096
    }
}

/// How often the drain thread looks at the rings while they are quiet.
const DRAIN_PERIOD: Duration = Duration::from_millis(10);

/// The host thread that drains the jump plan's rings into the handlers while the VM runs
/// (never a vCPU thread: a vCPU never waits for the output).
struct RingDrain {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl RingDrain {
    fn start(engine: Arc<Engine>) -> std::io::Result<RingDrain> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let quit = stop.clone();
        let thread = std::thread::Builder::new()
            .name("hvprobe-drain".into())
            .spawn(move || {
                while !quit.load(Ordering::Relaxed) {
                    if engine.drain_jump_rings() == 0 {
                        std::thread::sleep(DRAIN_PERIOD);
                    }
                }
            })?;
        Ok(RingDrain { stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Hashes of the kernel text around probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextHashes {
    /// Before anything was planted.
    pub before: u64,
    /// With the probes in place.
    pub planted: u64,
    /// After every probe was removed.
    pub after: Option<u64>,
    /// Where the text after removal differs from before planting, by 64-byte block: ranges
    /// holding a site hvprobe planted (it failed to restore them) and ranges elsewhere (the
    /// guest patched itself: static keys, ftrace, its kprobes); `None` when not compared.
    pub changed: Option<TextChanges>,
}

/// The kernel text's changes between planting and removal, told apart by whose they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextChanges {
    /// Changed ranges that hold a site hvprobe planted.
    pub at_probe_sites: usize,
    /// Changed ranges elsewhere: the guest's own patching.
    pub by_the_guest: usize,
}

/// Whether every byte hvprobe wrote into the kernel text is back as the guest had it: the
/// text hashes as before the first probe, or it differs only away from hvprobe's sites.
pub fn text_restored(
    before: Option<u64>,
    after: Option<u64>,
    changed: Option<TextChanges>,
) -> bool {
    after.is_some() && (after == before || changed.is_some_and(|c| c.at_probe_sites == 0))
}

/// What the probes saw.
#[derive(Debug, Default)]
pub struct ProbeReport {
    /// Per-probe counters.
    pub stats: Vec<ProbeStats>,
    /// Exit counts.
    pub exits: ExitStats,
    /// Register ioctls (reads, writes) made while handling the exits.
    pub register_ioctls: (u64, u64),
    /// Device writes refused because they would have written read-only guest memory.
    pub device_writes_refused: u64,
    /// When the probes went in, from VM start.
    pub planted_at: Option<Duration>,
    /// Kernel text hashes.
    pub text: Option<TextHashes>,
    /// Traps the guest had overwritten by removal time (kept as the guest wrote them).
    pub rewritten: Vec<RewrittenSite>,
    /// Why probing could not be finished, if it could not.
    pub error: Option<String>,
    /// Probes refused, at resolution or planting: skipped (`--skip-refused`), or the reason
    /// the run stopped before its command.
    pub refused: Vec<RefusedProbe>,
    /// The KASLR slide found in the running guest.
    pub kaslr_slide: Option<u64>,
    /// The System.map address the anchor register matched (`vectors`,
    /// `__bp_harden_el1_vectors+0x800`, `entry_SYSCALL_64`).
    pub kaslr_anchor: Option<String>,
    /// Per vCPU, by id: (debug exits, site hits, handed back to the guest).
    pub vcpus: Vec<(u64, u64, u64)>,
    /// What the trap self-test found, and the trap the probes use.
    pub traps: Option<(TrapSupport, TrapKind)>,
    /// Hits the jump plan's trampolines could not record: (on a vCPU without a ring, in a
    /// full or nested ring); `None` without the jump plan.
    pub jump_dropped: Option<(u64, u64)>,
    /// What `--integrity` found, if asked.
    pub integrity: Option<IntegrityReport>,
}

/// Sends `cmd` to every vCPU, then waits until each has answered with `answer`.
fn command_all(handles: &[VcpuHandle], cmd: VcpuCommand, answer: VcpuEvent) {
    for h in handles {
        h.send(cmd);
    }
    for h in handles {
        while let Some(ev) = h.wait_event() {
            if ev == answer {
                break;
            }
            if let VcpuEvent::Refused { command, state } = ev {
                eprintln!("hvprobe: vCPU {} refused {command:?} while {state}", h.id);
                break;
            }
        }
    }
}

/// Pauses every vCPU and waits until each is out of `KVM_RUN`.
fn pause_all(handles: &[VcpuHandle]) {
    command_all(handles, VcpuCommand::Pause, VcpuEvent::Paused);
}

/// Lets every paused vCPU run again.
fn resume_all(handles: &[VcpuHandle]) {
    command_all(handles, VcpuCommand::Resume, VcpuEvent::Resumed);
}

/// Where each vCPU is, one line each, for a run that ended at its time limit: where a guest
/// that never finished was stuck (a boot that hangs before `/init` prints nothing else). The
/// vCPUs are paused to read them and let go after. Kernel addresses are named by `map`
/// (System.map), moved by the KASLR slide the vCPU's own anchor register gives.
pub(super) fn whereabouts(handles: &[VcpuHandle], map: Option<&SymbolMap>) -> Vec<String> {
    use probe_core::arch::RegisterFile;
    pause_all(handles);
    let lines = handles
        .iter()
        .map(|h| match paused_state(h) {
            Ok(state) => {
                let pc = state.regs.pc();
                let name = map.filter(|_| state.in_kernel).and_then(|m| {
                    let anchors = arch::Host::KASLR_ANCHOR
                        .linked_addresses(|sym| m.lookup(sym).ok().map(|s| s.addr));
                    let (slide, _) = arch::Host::KASLR_ANCHOR
                        .slide(state.kaslr_anchor, &anchors)
                        .ok()?;
                    Some(probe_core::unwind::symbolize(m, pc.wrapping_sub(slide)))
                });
                format!(
                    "vCPU {} was at {pc:#x} {}{}",
                    h.id,
                    if state.in_kernel {
                        "in the kernel"
                    } else {
                        "in user mode"
                    },
                    name.map(|n| format!(" ({n})")).unwrap_or_default()
                )
            }
            Err(e) => format!("vCPU {}: {e}", h.id),
        })
        .collect();
    resume_all(handles);
    lines
}

/// Why probes could not be planted; the command never runs and nothing is left in the guest.
#[derive(Debug, thiserror::Error)]
pub enum PlantingError {
    /// The paused vCPU's state could not be read.
    #[error("reading vCPU 0's state: {0}")]
    VcpuState(String),
    /// The running kernel does not match System.map.
    #[error("{0}")]
    Kaslr(String),
    /// The kernel's initial page table could not be found or the XOL area mapped.
    #[error("{what}: {detail}")]
    XolArea {
        /// What failed.
        what: &'static str,
        /// The error.
        detail: String,
    },
    /// The guest's exception table could not be read.
    #[error("reading the guest's exception table: {0}")]
    ExceptionTable(String),
    /// Probes were refused, each with its reason.
    #[error("{}", refusal_list(.0))]
    Refused(Vec<RefusedProbe>),
}

/// The state of paused vCPU `h`.
fn paused_state(h: &VcpuHandle) -> Result<PausedState, PlantingError> {
    h.send(VcpuCommand::ReadRegisters);
    while let Some(ev) = h.wait_event() {
        match ev {
            VcpuEvent::Registers(r) => return r.map(|b| *b).map_err(PlantingError::VcpuState),
            VcpuEvent::Refused { state, .. } => {
                return Err(PlantingError::VcpuState(format!("the vCPU is {state}")));
            }
            _ => {}
        }
    }
    Err(PlantingError::VcpuState("the vCPU thread ended".into()))
}

/// The probing side of a run: plants once the guest is up, removes at the end.
pub(super) struct ProbeSession {
    pub(super) setup: ProbeSetup,
    pub(super) engine: Arc<Engine>,
    pub(super) report: ProbeReport,
    pub(super) planted: bool,
    pub(super) regs: Option<GuestRegisters>,
    pub(super) register_ioctls: Arc<RegisterIoctls>,
    /// Each planted probe's spec and event, for listing.
    pub(super) names: HashMap<ProbeId, (String, String)>,
    /// The kernel text's hash before the first probe went in.
    pub(super) text_before: Option<u64>,
    /// The kernel text before the first probe, by 64-byte block.
    pub(super) text_blocks: Option<probe_core::integrity::RegionBaseline>,
    /// The kernel at the baseline, for `--integrity`.
    integrity: Option<IntegrityBaseline>,
    /// How long changes held the vCPUs out of the guest.
    pub(super) pauses: Pauses,
    /// The running kernel's user-return address once the slide is known (0: none).
    user_return: Arc<AtomicU64>,
    /// Hit rates, checked once a second while the run goes on.
    rates: HitRates,
    /// The hardware breakpoint kept for the slot-exception watch, if any.
    exception_watch_slot: Option<usize>,
    /// Each vCPU's debug exits.
    pub(super) vcpus: Arc<[VcpuCounts]>,
    /// The jump plan's drain, once a jump site is in.
    drain: Option<RingDrain>,
    /// Guest RAM's memslots, cut to make protected pages read-only.
    slots: Arc<Mutex<MemorySlots>>,
    /// The engine's protection generation the memslots were last made for.
    protection_applied: u64,
}

/// Says whether the writer of protected bytes in a context is exempt (`--protect-allow`).
pub type ProtectExemption = probe_core::engine::ProtectExemption<Guest>;

/// The pauses of every vCPU that changes (plantings, removals) took.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Pauses {
    /// Changes made.
    pub(super) changes: u64,
    /// The longest pause.
    pub(super) longest: Duration,
    /// The last one.
    pub(super) last: Duration,
}

impl Pauses {
    fn count(&mut self, pause: Duration) {
        self.changes += 1;
        self.longest = self.longest.max(pause);
        self.last = pause;
    }
}

/// A probe is reported as hot once its hits pass this many a second: in the emulated runner
/// an exit costs 60-700 us, so a few thousand a second take a whole vCPU.
const HOT_HITS_PER_SECOND: u64 = 1000;
/// How often hit rates are checked.
const RATE_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// Each probe's hits at the last check, to report the hot ones once.
#[derive(Default)]
struct HitRates {
    checked: Option<Instant>,
    hits: HashMap<usize, u64>,
    reported: HashSet<usize>,
}

impl ProbeSession {
    /// The engine for `setup` over `vm`'s memory, its XOL area, and the hardware breakpoints
    /// it may use: one is kept for the slot-exception watch where the architecture has one
    /// and both its traps work (then user accesses are probed too).
    pub(super) fn new(setup: ProbeSetup, vm: &Vm) -> Result<ProbeSession, MachineError> {
        let vcpus = vm.vcpus.len() as u32;
        let xol = XolArea::new(
            <Guest as probe_core::arch::Arch>::XOL,
            arch::Host::XOL_GPA_BASE,
            setup.xol_pages,
        )?
        .with_data_pages(setup.jump.as_ref().map_or(0, |j| j.pages(vcpus)))?;
        let rings = match &setup.jump {
            Some(j) => Some((
                RingLayout::new(xol.data_va(), xol.data_gpa(), vcpus, j.records)
                    .map_err(|e| MachineError::Jump(e.to_string()))?,
                j.anchors,
            )),
            None => None,
        };
        let engine = Engine::new(vm.memory.clone(), xol)?;
        if let Some((rings, anchors)) = rings
            && !engine.enable_jump(rings, anchors)
        {
            return Err(MachineError::Jump(
                "the rings are outside guest memory".into(),
            ));
        }
        let breakpoint_exits = setup.traps.0.software.is_ok();
        engine.set_breakpoints_trappable(breakpoint_exits);
        engine.set_rate_cap(setup.max_rate);
        let hw = arch::Host::hw_breakpoint_count(&vm.kvm);
        let exception_watch_slot =
            (<arch::GuestDebugSetup as arch::GuestDebug>::SLOT_EXCEPTION_WATCH
                && breakpoint_exits
                && setup.traps.0.hardware.is_ok()
                && hw >= 2)
                .then(|| hw - 1);
        engine.set_hardware_breakpoint_count(hw - usize::from(exception_watch_slot.is_some()));
        engine.set_slot_exception_rewind(exception_watch_slot.is_some());
        engine.set_watchpoint_count(arch::Host::hw_watchpoint_count(&vm.kvm));
        if let Some(exempt) = &setup.protect_exemption {
            engine.set_protect_exemption(exempt.clone());
        }
        Ok(ProbeSession {
            setup,
            engine: Arc::new(engine),
            report: ProbeReport::default(),
            planted: false,
            regs: None,
            register_ioctls: Arc::default(),
            user_return: Arc::default(),
            rates: HitRates::default(),
            exception_watch_slot,
            names: HashMap::new(),
            text_before: None,
            text_blocks: None,
            integrity: None,
            pauses: Pauses::default(),
            vcpus: (0..vm.vcpus.len()).map(|_| VcpuCounts::default()).collect(),
            drain: None,
            slots: vm.slots.clone(),
            protection_applied: 0,
        })
    }

    /// Makes the memslots match the engine's protected pages (read-only where a region is,
    /// writable elsewhere), when they changed; every vCPU is paused. A failure is reported
    /// and leaves the regions unprotected rather than the guest without memory.
    fn apply_protection(&mut self) {
        let (pages, generation) = self.engine.protected_pages();
        if generation == self.protection_applied {
            return;
        }
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = slots.protect(&pages) {
            eprintln!("hvprobe: cannot make the protected pages read-only: {e}");
            if let Err(e) = slots.protect(&[]) {
                eprintln!("hvprobe: cannot restore guest memory's memslots: {e}");
            }
        }
        self.protection_applied = generation;
    }

    /// Device writes refused so far because they would have written read-only guest memory.
    pub(super) fn device_writes_refused(&self) -> u64 {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.read_only().refused()
    }

    /// What the vCPU threads share of it.
    pub(super) fn probing(&self) -> Arc<Probing> {
        Arc::new(Probing {
            engine: self.engine.clone(),
            breakpoint_exits: self.setup.traps.0.software.is_ok(),
            register_ioctls: self.register_ioctls.clone(),
            user_return: self.user_return.clone(),
            exception_watch_slot: self.exception_watch_slot,
            vcpus: self.vcpus.clone(),
        })
    }

    /// Reads guest virtual `[start, end)` through `regs`' page tables.
    fn read_region(&self, regs: &GuestRegisters, start: u64, end: u64) -> Result<Vec<u8>, String> {
        let mut bytes = vec![0u8; end.saturating_sub(start) as usize];
        read_guest_virtual::<Guest, _>(self.engine.memory(), regs, start, &mut bytes)?;
        Ok(bytes)
    }

    /// The kernel text as it is now.
    fn read_text(&self, regs: &GuestRegisters) -> Option<Vec<u8>> {
        let (start, end) = self.text()?;
        self.read_region(regs, start, end).ok()
    }

    /// The kernel text's hash now (as `hash_text`) and its changes since the first probe,
    /// from one read.
    pub(super) fn text_after(&self, regs: &GuestRegisters) -> (Option<u64>, Option<TextChanges>) {
        let now = self.read_text(regs);
        let after = now.as_deref().map(probe_core::integrity::fnv1a);
        (after, now.and_then(|n| self.text_changes(&n)))
    }

    /// The kernel text's changes since the first probe (`now`: the text, every probe out):
    /// those at a site hvprobe planted (a failed restore) told from the guest's own
    /// patching elsewhere.
    fn text_changes(&self, now: &[u8]) -> Option<TextChanges> {
        let changed = self.text_blocks.as_ref()?.changes(now).ok()?;
        let touched = self.engine.touched_text();
        let at_probe_sites = changed
            .iter()
            .filter(|c| {
                touched
                    .iter()
                    .any(|&(va, len)| va < c.start + c.len && va + len > c.start)
            })
            .count();
        Some(TextChanges {
            at_probe_sites,
            by_the_guest: changed.len() - at_probe_sites,
        })
    }

    /// The regions, syscall table and protection settings `--integrity` compares, as they
    /// are now (the slide known); a region that cannot be read is left out, said on stderr.
    fn integrity_baseline(
        &self,
        regs: &GuestRegisters,
        control: Vec<(&'static str, u64)>,
    ) -> IntegrityBaseline {
        let slide = self.setup.slide.load(Ordering::SeqCst);
        let Some(wanted) = self.setup.integrity.as_ref() else {
            return IntegrityBaseline {
                regions: Vec::new(),
                text: None,
                syscall_table: None,
                control,
            };
        };
        let mut regions = Vec::new();
        let slid = |(s, e): (u64, u64)| (s.wrapping_add(slide), e.wrapping_add(slide));
        for (name, range) in [("text", self.text()), ("rodata", wanted.rodata.map(slid))] {
            let Some((start, end)) = range else { continue };
            match self.read_region(regs, start, end) {
                Ok(bytes) => regions.push(RegionBaseline::new(name, start, &bytes)),
                Err(e) => eprintln!("hvprobe: integrity: cannot read the kernel's {name}: {e}"),
            }
        }
        IntegrityBaseline {
            regions,
            text: self.text(),
            syscall_table: wanted
                .syscall_table
                .map(|(at, n)| (at.wrapping_add(slide), n)),
            control,
        }
    }

    /// Compares the kernel now (every vCPU paused, every probe out) with the baseline.
    fn integrity_report(
        &self,
        base: &IntegrityBaseline,
        regs: &GuestRegisters,
        control: &[(&'static str, u64)],
    ) -> IntegrityReport {
        let mut report = IntegrityReport::default();
        let slide = self.setup.slide.load(Ordering::SeqCst);
        for region in &base.regions {
            match self
                .read_region(regs, region.start, region.start + region.len)
                .map(|mut now| {
                    // hvprobe's own probes, when they are in (a check on demand), are not
                    // changes of the guest's.
                    self.engine.without_own_patches(region.start, &mut now);
                    now
                })
                .map_err(|e| e.to_string())
                .and_then(|now| region.changes(&now).map_err(|e| e.to_string()))
            {
                Ok(changes) => report.changed.extend(changes.into_iter().map(|c| {
                    // Named by the symbols it spans: a 64-byte block may straddle two.
                    let symbol = self.setup.integrity.as_ref().map_or_else(String::new, |w| {
                        let first = c.start.wrapping_sub(slide);
                        let last = first + c.len - 1;
                        match (w.symbols.containing(first), w.symbols.containing(last)) {
                            (Some((a, _)), Some((b, _))) if a.name != b.name => format!(
                                "{}..{}",
                                w.symbols.describe(first),
                                w.symbols.describe(last)
                            ),
                            _ => w.symbols.describe(first),
                        }
                    });
                    (region.name, c, symbol)
                })),
                Err(e) => report.errors.push(format!("{}: {e}", region.name)),
            }
        }
        if let (Some((at, n)), Some(text)) = (base.syscall_table, base.text) {
            match self.read_region(regs, at, at + n as u64 * 8) {
                Ok(entries) => {
                    report.syscalls_outside_text = integrity::syscalls_outside_text(&entries, text);
                }
                Err(e) => report.errors.push(format!("syscall table: {e}")),
            }
        }
        report.control = integrity::control_changes(&base.control, control);
        report
    }

    pub(super) fn hash_text(&self, regs: &GuestRegisters) -> Option<u64> {
        let (start, end) = self.text()?;
        hash_guest_virtual::<Guest, _>(self.engine.memory(), regs, start, end).ok()
    }

    /// Finds the running kernel's KASLR slide from the architecture's anchor register
    /// (`running`) against System.map's address of its symbol.
    fn apply_kaslr_slide(&mut self, running: u64) -> Result<(), PlantingError> {
        if self.setup.kaslr_anchors.is_empty() {
            return Ok(());
        }
        let (slide, anchor) = arch::Host::KASLR_ANCHOR
            .slide(running, &self.setup.kaslr_anchors)
            .map_err(PlantingError::Kaslr)?;
        self.report.kaslr_slide = Some(slide);
        self.report.kaslr_anchor = Some(anchor.to_string());
        self.setup.slide.store(slide, Ordering::SeqCst);
        Ok(())
    }

    /// The running kernel's text range: System.map's moved by the KASLR slide. Every address
    /// of the setup stays System.map's and is moved where it is used, so none is moved twice.
    fn text(&self) -> Option<(u64, u64)> {
        let slide = self.setup.slide.load(Ordering::SeqCst);
        self.setup
            .text
            .map(|(s, e)| (s.wrapping_add(slide), e.wrapping_add(slide)))
    }

    /// When [`ProbeSession::tick`] has work next: a rate-capped site's window ends, or the
    /// once-a-second hit-rate check; `None` before the probes are in.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.regs.as_ref()?;
        let check = self
            .rates
            .checked
            .map_or_else(Instant::now, |t| t + RATE_CHECK_PERIOD);
        let resume = self
            .engine
            .next_paused_site_due()
            .map(|d| Instant::now() + d);
        Some(resume.map_or(check, |r| r.min(check)))
    }

    /// While the run goes on: puts back the traps of sites whose rate-cap window is over
    /// (every vCPU paused meanwhile, only when one is due), and once a second reports a probe
    /// whose hit rate passed [`HOT_HITS_PER_SECOND`], with its rate.
    pub(super) fn tick(&mut self, handles: &[VcpuHandle]) {
        if self.regs.is_none() {
            return;
        }
        if self.engine.next_paused_site_due() == Some(Duration::ZERO) {
            pause_all(handles);
            self.engine.resume_paused_sites();
            resume_all(handles);
        }
        let now = Instant::now();
        let Some(since) = self.rates.checked.replace(now) else {
            return;
        };
        let elapsed = now.duration_since(since).as_secs_f64();
        if elapsed < RATE_CHECK_PERIOD.as_secs_f64() {
            self.rates.checked = Some(since);
            return;
        }
        // A jump-plan probe costs the guest no exit: however hot, it is not reported.
        for s in self
            .engine
            .stats()
            .into_iter()
            .filter(|s| s.plan != PlanKind::Jump)
        {
            let seen = s.hits + s.missed;
            let before = self.rates.hits.insert(s.id.0, seen).unwrap_or(0);
            let rate = (seen - before.min(seen)) as f64 / elapsed;
            if rate >= HOT_HITS_PER_SECOND as f64 && self.rates.reported.insert(s.id.0) {
                let advice = match self.setup.max_rate {
                    Some(n) => format!("capped at {n}/s"),
                    None => "--max-rate N caps it".into(),
                };
                eprintln!(
                    "hvprobe: probe {} is hot: {rate:.0} hits/s ({advice})",
                    s.location
                );
            }
        }
    }

    /// With every vCPU paused: reads the state of a vCPU in the kernel, finds the KASLR slide,
    /// the guest's exception table and kprobes, and hashes the kernel text as it was before
    /// any probe. Done once, at the first planting.
    pub(super) fn attach(
        &mut self,
        handles: &[VcpuHandle],
    ) -> Result<GuestRegisters, PlantingError> {
        if let Some(regs) = &self.regs {
            return Ok(regs.clone());
        }
        // The registers of a vCPU in the kernel, where one is (the first otherwise).
        let mut state = paused_state(&handles[0])?;
        for h in &handles[1..] {
            if state.in_kernel {
                break;
            }
            let other = paused_state(h)?;
            if other.in_kernel {
                state = other;
            }
        }
        let regs = state.regs;
        // The features are `()` on x86_64, where no plan depends on them.
        #[allow(clippy::unit_arg)]
        self.engine.set_cpu_features(state.cpu_features);
        if let Some((counter, khz)) = state.counter {
            self.engine.set_guest_clock(counter, khz);
        }
        self.apply_kaslr_slide(state.kaslr_anchor)?;
        let slide = self.setup.slide.load(Ordering::SeqCst);
        let regs = self.kernel_view(regs);
        let regs = self.lasting_view(regs, slide);
        for (start, end, why) in self.setup.jump.iter().flat_map(|j| &j.excluded) {
            self.engine
                .exclude_from_jump(start.wrapping_add(slide), end.wrapping_add(slide), why);
        }
        let window = self
            .setup
            .code_window
            .map(|(s, e)| (s.wrapping_add(slide), e.wrapping_add(slide)));
        let space = <Guest as probe_core::arch::Arch>::address_space(&regs);
        if let Err(e) = self.engine.attach_code(slide, window, space) {
            eprintln!(
                "hvprobe: no alias of the XOL code within reach of the kernel text ({e}): the jump plan is off and steps out of line take two exits"
            );
        }
        if let Some(at) = self.setup.user_return {
            self.user_return
                .store(at.wrapping_add(slide), Ordering::SeqCst);
        }
        if let Some((start, end)) = self.setup.exception_table {
            let (start, end) = (start.wrapping_add(slide), end.wrapping_add(slide));
            let mut bytes = vec![0u8; end.saturating_sub(start) as usize];
            read_guest_virtual::<Guest, _>(self.engine.memory(), &regs, start, &mut bytes)
                .map_err(PlantingError::ExceptionTable)?;
            self.engine
                .set_exception_table(extable::instruction_addresses(start, &bytes));
        }
        for &(start, end, size, what) in &self.setup.patched_text {
            let (start, end) = (start.wrapping_add(slide), end.wrapping_add(slide));
            let mut bytes = vec![0u8; end.saturating_sub(start) as usize];
            match read_guest_virtual::<Guest, _>(self.engine.memory(), &regs, start, &mut bytes) {
                Ok(()) => self
                    .engine
                    .set_patched_text(patched_text::sites(start, &bytes, size), what),
                Err(e) => eprintln!("hvprobe: cannot read the kernel's table of {what}s: {e}"),
            }
        }
        if let Some(layout) = self.setup.guest_kprobes {
            let mem = self.engine.memory();
            let read = |va: u64, buf: &mut [u8]| {
                read_guest_virtual::<Guest, _>(mem, &regs, va, buf).is_ok()
            };
            match layout.read(slide, &read) {
                Ok(kprobes) => self.engine.set_guest_kprobes(kprobes),
                Err(e) => eprintln!(
                    "hvprobe: {e}; probes past an int3 that may be a guest kprobe are refused"
                ),
            }
        }
        // Hashed whole (`text_before`, as `hash_text` hashes) and by block from one read.
        let text = self.read_text(&regs);
        self.text_before = text.as_deref().map(probe_core::integrity::fnv1a);
        self.text_blocks = self.text().zip(text).map(|((start, _), bytes)| {
            probe_core::integrity::RegionBaseline::new("text", start, &bytes)
        });
        if self.setup.integrity.is_some() {
            self.integrity = Some(self.integrity_baseline(&regs, state.control));
        }
        self.regs = Some(regs.clone());
        Ok(regs)
    }

    /// `regs` on the kernel's own top-level page table where the architecture names one and
    /// it reads the kernel text: the session keeps the registers of the attach for the whole
    /// run (the text hash at the end, integrity checks, live changes), and the page tables of
    /// the process they came from are freed when it ends or execs (under `--rootfs` the
    /// initramfs's `/init` becomes systemd).
    fn lasting_view(&self, regs: GuestRegisters, slide: u64) -> GuestRegisters {
        use probe_core::arch::Arch;
        let Some(root) = self.setup.kernel_root else {
            return regs;
        };
        let mem = self.engine.memory();
        let Ok(t) = Guest::translate(mem, Guest::address_space(&regs), root.wrapping_add(slide))
        else {
            return regs;
        };
        match Guest::on_page_table_root(&regs, t.gpa) {
            Some(own) if self.reads_text(&own) => own,
            _ => regs,
        }
    }

    /// Whether `regs` map the first byte of the running kernel's text.
    fn reads_text(&self, regs: &GuestRegisters) -> bool {
        self.text().is_some_and(|(start, _)| {
            read_guest_virtual::<Guest, _>(self.engine.memory(), regs, start, &mut [0u8; 1]).is_ok()
        })
    }

    /// The registers to read the kernel through: `regs` as they are, unless their vCPU was on
    /// page tables that may lack most of the kernel (page-table isolation's user ones: in a
    /// user process, and in kernel mode too on the entry and exit paths before and after the
    /// switch of CR3) and the kernel's own page tables
    /// ([`probe_core::arch::Arch::kernel_page_tables`]) read its text.
    fn kernel_view(&self, regs: GuestRegisters) -> GuestRegisters {
        // The kernel's page tables map all the user ones map of the kernel (its data too,
        // which the user ones lack even where they map its text), so they are taken when
        // they read the text at all.
        match <Guest as probe_core::arch::Arch>::kernel_page_tables(&regs) {
            Some(k) if self.reads_text(&k) => k,
            _ => regs,
        }
    }

    /// Plants `req` (its address moved by the KASLR slide); every vCPU is paused.
    pub(super) fn plant_one(
        &mut self,
        mut req: ProbeRequest,
        regs: &GuestRegisters,
    ) -> Result<ProbeId, RefusedProbe> {
        let slide = self.setup.slide.load(Ordering::SeqCst);
        req.target.va = req.target.va.wrapping_add(slide);
        req.target.function_start = req.target.function_start.map(|f| f.wrapping_add(slide));
        match self.engine.plant(req.probe, req.target, regs) {
            Ok(id) => {
                self.names.insert(id, (req.spec, req.event));
                if self.drain.is_none() && self.engine.has_jump_sites() {
                    match RingDrain::start(self.engine.clone()) {
                        Ok(d) => self.drain = Some(d),
                        Err(e) => eprintln!("hvprobe: cannot start the ring drain: {e}"),
                    }
                }
                Ok(id)
            }
            Err(e) => Err(RefusedProbe::from(&e)),
        }
    }

    /// Pauses every vCPU, runs `change`, resumes them, and counts the pause as a change's
    /// (the attach at `/init` with no probes to plant is not one).
    pub(super) fn paused<T>(
        &mut self,
        handles: &[VcpuHandle],
        change: impl FnOnce(&mut Self) -> T,
    ) -> T {
        let start = Instant::now();
        let counts = self.regs.is_some() || !self.setup.requests.is_empty();
        pause_all(handles);
        let out = change(self);
        self.apply_protection();
        resume_all(handles);
        if counts {
            self.pauses.count(start.elapsed());
        }
        out
    }
    /// Plants every requested probe with all vCPUs paused; all or nothing (unless
    /// `--skip-refused`). Once they are in, the console keeps the guest kernel's fault reports.
    pub(super) fn plant(
        &mut self,
        handles: &[VcpuHandle],
        started: Instant,
        console: &ConsoleWatch,
    ) -> Result<(), PlantingError> {
        self.planted = true;
        let result = self.paused(handles, |s| {
            let regs = s.attach(handles)?;
            let mut ids = Vec::new();
            let mut refused = Vec::new();
            for req in std::mem::take(&mut s.setup.requests) {
                match s.plant_one(req, &regs) {
                    Ok(id) => ids.push(id),
                    Err(r) => refused.push(r),
                }
            }
            if !refused.is_empty() && !s.setup.skip_refused {
                for id in ids {
                    let _ = s.engine.remove(id);
                    s.names.remove(&id);
                }
                if let (Some(b), Some(a)) = (s.text_before, s.hash_text(&regs)) {
                    s.report.text = Some(TextHashes {
                        before: b,
                        planted: a,
                        after: Some(a),
                        changed: None,
                    });
                }
                s.report.refused = refused.clone();
                return Err(PlantingError::Refused(refused));
            }
            for r in &refused {
                eprintln!("hvprobe: skipped refused probe: {r}");
            }
            s.report.refused = std::mem::take(&mut s.setup.refused);
            s.report.refused.extend(refused);
            if let (Some(b), Some(p)) = (s.text_before, s.hash_text(&regs)) {
                s.report.text = Some(TextHashes {
                    before: b,
                    planted: p,
                    after: None,
                    changed: None,
                });
            }
            Ok(())
        });
        self.report.planted_at = Some(started.elapsed());
        if result.is_ok() {
            console.lock().unwrap_or_else(|e| e.into_inner()).probes_in = true;
        } else {
            self.regs = None;
        }
        result
    }

    /// Compares the kernel now with its state at the baseline (`/init`), every vCPU paused
    /// meanwhile and hvprobe's own probes left out of the comparison: the live-session API's
    /// check on demand.
    pub(super) fn integrity_now(
        &mut self,
        handles: &[VcpuHandle],
    ) -> Result<IntegrityReport, String> {
        let (Some(base), Some(regs)) = (self.integrity.as_ref(), self.regs.clone()) else {
            return Err("no baseline yet: the guest's /init has not started".into());
        };
        let start = Instant::now();
        pause_all(handles);
        let control = paused_state(&handles[0]).map(|s| s.control);
        let report = control.map(|c| self.integrity_report(base, &regs, &c));
        resume_all(handles);
        self.pauses.count(start.elapsed());
        report.map_err(|e| e.to_string())
    }

    /// Removes every probe with all vCPUs paused and fills in the report.
    pub(super) fn finish(mut self, handles: &[VcpuHandle], console: &ConsoleWatch) -> ProbeReport {
        if self.regs.is_some() {
            pause_all(handles);
            console.lock().unwrap_or_else(|e| e.into_inner()).probes_in = false;
            // Every hit recorded until the pause reaches the handlers before the counts.
            if let Some(d) = self.drain.take() {
                d.stop();
            }
            self.engine.drain_jump_rings();
            self.report.jump_dropped = self.engine.jump_dropped();
            self.report.stats = self.engine.stats();
            self.report.rewritten = self.engine.remove_all();
            self.apply_protection();
            if let Some(regs) = &self.regs {
                let (after, changed) = self.text_after(regs);
                if let Some(t) = &mut self.report.text {
                    t.after = after;
                    t.changed = changed;
                }
                if let Some(base) = self
                    .integrity
                    .as_ref()
                    .filter(|_| self.setup.integrity.as_ref().is_some_and(|w| w.at_end))
                {
                    let control = paused_state(&handles[0])
                        .map(|s| s.control)
                        .unwrap_or_default();
                    self.report.integrity = Some(self.integrity_report(base, regs, &control));
                }
            }
        }
        self.report.exits = self.engine.exit_stats();
        self.report.register_ioctls = self.register_ioctls.counts();
        self.report.device_writes_refused = self.device_writes_refused();
        self.report.vcpus = self.vcpus.iter().map(VcpuCounts::snapshot).collect();
        self.report.traps = Some(self.setup.traps.clone());
        self.report
    }
}
