//! The end-of-run summary: the one model of how a run went (how it ended, each probe's
//! counters, the exit counts, the kernel text hashes, the KASLR slide), rendered three ways
//! from the same value: the text summary lines ([`RunSummary::text_lines`]), `--summary-json
//! FILE`, and the tests' `Run` fixture, which reads the JSON back.

use crate::arch::VmmArch;
use serde::{Deserialize, Serialize};

use crate::machine::{Outcome, RunReport};
use crate::refusal::RefusedProbe;
use crate::selftest::{Reinjection, TrapSupport};
use probe_core::arch::PlanKind;
use probe_core::probe::TrapKind;

/// Prefix of the one stderr line that carries the summary out of the emulated runner's L1
/// (the runner takes it off the relayed stderr and writes the file on the host).
pub const STDERR_PREFIX: &str = "HVPROBE-SUMMARY-JSON ";

/// The `--summary-json` path the runner gives the hvprobe inside L1: "one stderr line".
pub const ON_STDERR: &str = "/dev/hvprobe-summary-on-stderr";

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeSummary {
    /// What ended it.
    pub kind: OutcomeKind,
    /// The process exit status hvprobe returns for it.
    pub exit_code: i32,
    /// The panic line, the fault report, the error or the refusal, when there is one.
    pub detail: Option<String>,
}

/// What ended a run ([`Outcome`] without its details).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeKind {
    /// The default guest's command exited.
    CommandExited,
    /// The guest shut down or reset.
    ShutDown,
    /// The guest kernel panicked.
    Panicked,
    /// The guest kernel reported a fault while probes were in.
    KernelFault,
    /// The time limit passed.
    TimedOut,
    /// A vCPU failed.
    VcpuError,
    /// SIGINT or SIGTERM.
    Interrupted,
    /// A live-session client stopped the VM.
    Stopped,
    /// A probe was refused in the running guest.
    ProbeRefused,
}

/// A probe's trap as the summary names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrapName {
    /// x86's software breakpoint.
    Int3,
    /// arm64's software breakpoint.
    Brk,
    /// A hardware breakpoint.
    Hw,
}

impl TrapName {
    /// The name of `trap` on this VMM's guests.
    pub fn of(trap: TrapKind) -> TrapName {
        match (trap, <crate::arch::Host as VmmArch>::ARCH) {
            (TrapKind::Hardware, _) => TrapName::Hw,
            (TrapKind::Software, hvprobe_guest::GuestArch::X86_64) => TrapName::Int3,
            (TrapKind::Software, hvprobe_guest::GuestArch::Aarch64) => TrapName::Brk,
        }
    }

    /// As the summary line and JSON spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            TrapName::Int3 => "int3",
            TrapName::Brk => "brk",
            TrapName::Hw => "hw",
        }
    }
}

impl std::fmt::Display for TrapName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One probe's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeSummary {
    /// The location as given.
    pub location: String,
    /// Its address in the running guest.
    pub address: u64,
    /// The probed instruction.
    pub instruction: String,
    /// The plan (`emulate`, `xol`, `xol-riprel`: a trap per hit; `jump`: no exit).
    pub plan: PlanKind,
    /// VM exits a hit costs at least: 0 for the jump plan, 1 for a trap (a trapped step or a
    /// post handler adds one).
    #[serde(default)]
    pub exits_per_hit: u32,
    /// Why a probe that could have run in the guest takes exits (its site cannot take a
    /// jump).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_jump: Option<String>,
    /// `int3`, `brk` or `hw`.
    pub trap: TrapName,
    /// Times a vCPU reached it.
    pub hits: u64,
    /// Hits on which the handlers could not run.
    pub missed: u64,
    /// Handler calls that failed.
    pub handler_errors: u64,
    /// Whether it is a return probe.
    pub return_probe: bool,
    /// Returns seen.
    pub returns: u64,
    /// Entries whose return could not be watched.
    pub nmissed: u64,
}

impl ProbeSummary {
    /// The record of the engine's counters `s`.
    pub fn new(s: &probe_core::engine::ProbeStats) -> ProbeSummary {
        ProbeSummary {
            location: s.location.clone(),
            address: s.address,
            instruction: s.instruction.clone(),
            plan: s.plan,
            exits_per_hit: s.plan.exits_per_hit(),
            no_jump: s.jump_refusal.map(str::to_string),
            trap: TrapName::of(s.trap),
            hits: s.hits,
            missed: s.missed,
            handler_errors: s.handler_errors,
            return_probe: s.return_probe,
            returns: s.returns,
            nmissed: s.nmissed,
        }
    }
}

impl std::fmt::Display for ProbeSummary {
    /// The probe as its summary line shows it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at {:#x} ({}; plan {}; trap {}): hits={} missed={} handler_errors={}",
            self.location,
            self.address,
            self.instruction,
            self.plan,
            self.trap,
            self.hits,
            self.missed,
            self.handler_errors
        )?;
        if self.return_probe {
            write!(f, " returns={} nmissed={}", self.returns, self.nmissed)?;
        }
        if self.plan == PlanKind::Jump {
            write!(f, " exits_per_hit=0")?;
        }
        if let Some(why) = &self.no_jump {
            write!(f, " (no jump: {why})")?;
        }
        Ok(())
    }
}

/// The exit counts of the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitSummary {
    /// Software breakpoint exits that were hvprobe's.
    pub breakpoints: u64,
    /// Hardware breakpoint exits that were hvprobe's.
    pub hw_breakpoints: u64,
    /// Trapped-slot int3 exits.
    pub slot_traps: u64,
    /// Returns through the trampoline.
    pub returns: u64,
    /// The guest's own #BPs handed back.
    pub reinjected: u64,
    /// The guest's own #DBs handed back.
    pub reinjected_debug: u64,
    /// Trapped steps that never reached their trap.
    pub abandoned_steps: u64,
    /// Emulated instructions left to their real copy.
    pub emulation_fallbacks: u64,
    /// Hits past a site's `--max-rate` (counted as missed too).
    #[serde(default)]
    pub rate_capped: u64,
    /// Exceptions taken inside trapped slots, rewound to the probed instruction.
    #[serde(default)]
    pub slot_exceptions: u64,
    /// Exits that began a step over a watched access (arm64: a watchpoint hit takes two).
    #[serde(default)]
    pub watch_steps: u64,
    /// Stores to protected pages that touched protected bytes (one exit each).
    #[serde(default)]
    pub protected_writes: u64,
    /// Stores to the unprotected rest of protected pages, completed silently (one exit each).
    #[serde(default)]
    pub neighbour_writes: u64,
    /// Of both, stores without a syndrome decoded and emulated by hvprobe (arm64).
    #[serde(default)]
    pub emulated_stores: u64,
    /// Writes to protected bytes by `--protect-allow` writers: made, not reported.
    #[serde(default)]
    pub exempted_writes: u64,
    /// Device requests (virtio-blk reads) refused because they would have written read-only
    /// guest memory: protected pages or hvprobe's code (not exits: the devices' own count).
    #[serde(default)]
    pub device_writes_refused: u64,
    /// Sites hit, by step plan.
    pub hits_by_plan: Vec<(PlanKind, u64)>,
    /// Register reads made while handling the exits (arm64: `KVM_GET_ONE_REG` calls; x86_64:
    /// none with sync regs).
    #[serde(default)]
    pub register_reads: u64,
    /// Register writes made while handling the exits.
    #[serde(default)]
    pub register_writes: u64,
}

impl ExitSummary {
    /// The counts as `name=N` pairs, as the summary line and `hvprobe stats` print them.
    pub fn counts(&self) -> String {
        format!(
            "breakpoint={} hw_breakpoint={} slot_trap={} return={} reinjected={} reinjected_debug={} abandoned_steps={} emulation_fallbacks={} rate_capped={} slot_exceptions={} watch_steps={} protected_writes={} neighbour_writes={} emulated_stores={} exempted_writes={} device_writes_refused={}",
            self.breakpoints,
            self.hw_breakpoints,
            self.slot_traps,
            self.returns,
            self.reinjected,
            self.reinjected_debug,
            self.abandoned_steps,
            self.emulation_fallbacks,
            self.rate_capped,
            self.slot_exceptions,
            self.watch_steps,
            self.protected_writes,
            self.neighbour_writes,
            self.emulated_stores,
            self.exempted_writes,
            self.device_writes_refused
        )
    }

    /// The engine's exit counts `e`, the register ioctls (reads, writes) made for them and
    /// the device writes refused.
    pub fn new(
        e: &probe_core::engine::ExitStats,
        (reads, writes): (u64, u64),
        device_writes_refused: u64,
    ) -> ExitSummary {
        ExitSummary {
            breakpoints: e.breakpoints,
            hw_breakpoints: e.hw_breakpoints,
            slot_traps: e.slot_traps,
            returns: e.returns,
            reinjected: e.reinjected,
            reinjected_debug: e.reinjected_debug,
            abandoned_steps: e.abandoned_steps,
            emulation_fallbacks: e.emulation_fallbacks,
            rate_capped: e.rate_capped,
            slot_exceptions: e.slot_exceptions,
            watch_steps: e.watch_steps,
            protected_writes: e.protected_writes,
            neighbour_writes: e.neighbour_writes,
            emulated_stores: e.emulated_stores,
            exempted_writes: e.exempted_writes,
            device_writes_refused,
            hits_by_plan: e.hits_by_plan.clone(),
            register_reads: reads,
            register_writes: writes,
        }
    }
}

/// Kernel text hashes around probing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextSummary {
    /// Before planting.
    pub before: u64,
    /// With the probes in.
    pub planted: u64,
    /// After removal, if checked.
    pub after: Option<u64>,
    /// Every byte hvprobe wrote is back as the guest had it: `after == before`, or the text
    /// differs only away from hvprobe's sites (`guest_changes`).
    pub restored: bool,
    /// Ranges of text (64-byte blocks, merged) the guest itself changed while the probes
    /// were in, away from hvprobe's sites: its static keys, ftrace, its own kprobes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_changes: Option<usize>,
}

/// The whole summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// How the run ended.
    pub outcome: OutcomeSummary,
    /// Seconds from VM start to the default guest's `/init`.
    pub boot_to_init_s: Option<f64>,
    /// Seconds from VM start to the root file system's autorun unit (`--rootfs`: the end of
    /// the systemd boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_to_autorun_s: Option<f64>,
    /// Seconds the VM ran.
    pub run_s: f64,
    /// Per probe, in planting order.
    pub probes: Vec<ProbeSummary>,
    /// Exit counts.
    pub exits: ExitSummary,
    /// Kernel text hashes.
    pub text: Option<TextSummary>,
    /// The running kernel's KASLR slide.
    pub kaslr_slide: Option<u64>,
    /// The System.map address the KASLR anchor register matched (arm64: `vectors`, or a slot
    /// of `__bp_harden_el1_vectors` on a Spectre-BHB CPU).
    #[serde(default)]
    pub kaslr_anchor: Option<String>,
    /// Probes refused, at resolution or at planting: skipped with `--skip-refused`, or what
    /// ended the run before its command (outcome `probe-refused`).
    #[serde(default)]
    pub refused: Vec<RefusedProbe>,
    /// What the trap self-test found on this KVM and the trap the probes use.
    #[serde(default)]
    pub self_test: Option<SelfTestSummary>,
    /// Per vCPU, by id: its debug exits, probe sites hit, the guest's own traps handed back.
    #[serde(default)]
    pub vcpus: Vec<VcpuSummary>,
    /// Guest kernel fault reports printed while probes were in.
    pub faults_with_probes: Vec<String>,
    /// Probed bytes the guest rewrote itself, left as it wrote them.
    #[serde(default)]
    pub rewritten: Vec<RewrittenSummary>,
    /// Hits the jump plan's trampolines could not record: on a vCPU without a ring, and in a
    /// full ring or nested in another trampoline (each also counted as its probe's missed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jump_dropped: Option<JumpDropped>,
    /// Every distinct kernel stack seen at hits (`--stack`, `stacktrace`), folded
    /// (`event;outermost;...;probed`), most frequent first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stacks: Vec<StackCount>,
    /// What `--integrity` found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<IntegritySummary>,
}

/// The kernel at the end of the run against its state when `/init` started (`--integrity`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IntegritySummary {
    /// Nothing changed and everything could be read.
    pub clean: bool,
    /// Changed ranges of kernel text and read-only data.
    pub changed: Vec<ChangedSummary>,
    /// Syscall table entries pointing outside kernel text: (index, value).
    pub syscalls_outside_text: Vec<(usize, u64)>,
    /// Protection settings and table bases that moved.
    pub control: Vec<ControlSummary>,
    /// What could not be read or compared.
    pub errors: Vec<String>,
}

/// A changed range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedSummary {
    /// `text` or `rodata`.
    pub region: String,
    /// The running kernel's address.
    pub address: u64,
    /// Bytes (whole 64-byte blocks).
    pub len: u64,
    /// The symbol it starts in (System.map's `name+0xoff`).
    pub symbol: String,
}

/// A protection setting that moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlSummary {
    /// What (`CR0.WP`, `VBAR_EL1`).
    pub name: String,
    /// When `/init` started.
    pub before: u64,
    /// At the end.
    pub now: u64,
}

impl IntegritySummary {
    /// The summary of report `r`.
    pub fn new(r: &crate::machine::IntegrityReport) -> IntegritySummary {
        IntegritySummary {
            clean: r.changed.is_empty()
                && r.syscalls_outside_text.is_empty()
                && r.control.is_empty()
                && r.errors.is_empty(),
            changed: r
                .changed
                .iter()
                .map(|(region, c, symbol)| ChangedSummary {
                    region: region.to_string(),
                    address: c.start,
                    len: c.len,
                    symbol: symbol.clone(),
                })
                .collect(),
            syscalls_outside_text: r.syscalls_outside_text.clone(),
            control: r
                .control
                .iter()
                .map(|c| ControlSummary {
                    name: c.name.to_string(),
                    before: c.before,
                    now: c.now,
                })
                .collect(),
            errors: r.errors.clone(),
        }
    }

    /// The report's lines.
    pub fn text_lines(&self) -> Vec<String> {
        if self.clean {
            return vec![
                "hvprobe: integrity: kernel text, read-only data, the syscall table and the protection settings are as when /init started".into(),
            ];
        }
        let mut out = Vec::new();
        for c in &self.changed {
            out.push(format!(
                "hvprobe: integrity: {} changed at {} ({:#x}, {} bytes)",
                c.region, c.symbol, c.address, c.len
            ));
        }
        for (i, v) in &self.syscalls_outside_text {
            out.push(format!(
                "hvprobe: integrity: syscall {i} points outside kernel text ({v:#x})"
            ));
        }
        for c in &self.control {
            out.push(format!(
                "hvprobe: integrity: {} changed from {:#x} to {:#x}",
                c.name, c.before, c.now
            ));
        }
        for e in &self.errors {
            out.push(format!("hvprobe: integrity: not checked: {e}"));
        }
        out
    }
}

/// Hits the jump plan could not record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JumpDropped {
    /// On a vCPU past the last ring.
    pub no_ring: u64,
    /// In a full ring, or nested in another trampoline on the same vCPU (an NMI).
    pub full_or_nested: u64,
}

/// One distinct folded stack and how many hits had it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackCount {
    /// `event;outermost;...;probed`.
    pub stack: String,
    /// Hits.
    pub count: u64,
}

impl From<(String, u64)> for StackCount {
    fn from((stack, count): (String, u64)) -> StackCount {
        StackCount { stack, count }
    }
}

/// Stacks listed per event in the summary's text.
const TOP_STACKS: usize = 3;

/// One check of the trap self-test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Whether this KVM delivers it.
    pub ok: bool,
    /// Why not, when it does not.
    pub why: Option<String>,
}

impl From<&Result<(), String>> for Check {
    fn from(r: &Result<(), String>) -> Check {
        Check {
            ok: r.is_ok(),
            why: r.as_ref().err().cloned(),
        }
    }
}

/// The trap self-test's verdict ([`TrapSupport`]) and the trap the probes use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTestSummary {
    /// The software breakpoint's debug exit (`int3`, `brk`).
    pub breakpoint: Check,
    /// The single-step exit.
    pub single_step: Check,
    /// Hardware execute breakpoints.
    pub hardware: Check,
    /// How many hardware breakpoints a vCPU has.
    pub hardware_count: usize,
    /// A trap that is not hvprobe's goes back to the guest: `None` when KVM injects it (x86),
    /// else the check of the VMM's emulated exception entry (arm64).
    pub reinjection: Option<Check>,
    /// The trap the probes use.
    pub probes_use: TrapName,
}

impl SelfTestSummary {
    /// The verdict of `support`, with probes using `trap`.
    pub fn new(support: &TrapSupport, trap: TrapKind) -> SelfTestSummary {
        SelfTestSummary {
            breakpoint: Check::from(&support.software),
            single_step: Check::from(&support.single_step),
            hardware: Check::from(&support.hardware),
            hardware_count: support.hardware_count,
            reinjection: match &support.reinjection {
                Reinjection::ByKvm => None,
                Reinjection::Emulated(r) => Some(Check::from(r)),
            },
            probes_use: TrapName::of(trap),
        }
    }
}

/// One vCPU's debug exits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuSummary {
    /// `KVM_EXIT_DEBUG` exits it took.
    pub debug_exits: u64,
    /// Probe sites it hit.
    pub site_hits: u64,
    /// The guest's own breakpoints and debug exceptions handed back to it.
    pub handed_back: u64,
}

/// A probed byte the guest rewrote while the probe was in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewrittenSummary {
    /// The probed address.
    pub va: u64,
    /// What the guest wrote there.
    pub found: Vec<u8>,
}

impl RunSummary {
    /// The summary of `report`, a run that ends with `exit_code`.
    pub fn new(report: &RunReport, exit_code: i32) -> RunSummary {
        let (kind, detail) = match &report.outcome {
            Outcome::CommandExited(_) => (OutcomeKind::CommandExited, None),
            Outcome::ShutDown => (OutcomeKind::ShutDown, None),
            Outcome::Panicked(l) => (OutcomeKind::Panicked, Some(l.clone())),
            Outcome::KernelFault(l) => (OutcomeKind::KernelFault, Some(l.clone())),
            Outcome::TimedOut(t) => (OutcomeKind::TimedOut, Some(format!("{} s", t.as_secs()))),
            Outcome::VcpuError(e) => (OutcomeKind::VcpuError, Some(e.clone())),
            Outcome::Interrupted => (OutcomeKind::Interrupted, None),
            Outcome::Stopped => (OutcomeKind::Stopped, None),
            Outcome::ProbeRefused(e) => (OutcomeKind::ProbeRefused, Some(e.clone())),
        };
        let probes = report.probes.as_ref();
        RunSummary {
            outcome: OutcomeSummary {
                kind,
                exit_code,
                detail,
            },
            boot_to_init_s: report.boot_to_init.map(|d| d.as_secs_f64()),
            boot_to_autorun_s: report.boot_to_autorun.map(|d| d.as_secs_f64()),
            run_s: report.run_time.as_secs_f64(),
            probes: probes
                .map(|p| p.stats.iter().map(ProbeSummary::new).collect())
                .unwrap_or_default(),
            exits: probes
                .map(|p| ExitSummary::new(&p.exits, p.register_ioctls, p.device_writes_refused))
                .unwrap_or_default(),
            jump_dropped: probes
                .and_then(|p| p.jump_dropped)
                .map(|(no_ring, full_or_nested)| JumpDropped {
                    no_ring,
                    full_or_nested,
                }),
            text: probes.and_then(|p| p.text).map(|t| TextSummary {
                before: t.before,
                planted: t.planted,
                after: t.after,
                restored: crate::machine::text_restored(Some(t.before), t.after, t.changed),
                guest_changes: t
                    .changed
                    .map(|c| c.by_the_guest)
                    .filter(|&n| n > 0 && t.after != Some(t.before)),
            }),
            integrity: probes
                .and_then(|p| p.integrity.as_ref())
                .map(IntegritySummary::new),
            kaslr_slide: probes.and_then(|p| p.kaslr_slide),
            kaslr_anchor: probes.and_then(|p| p.kaslr_anchor.clone()),
            refused: probes.map(|p| p.refused.clone()).unwrap_or_default(),
            self_test: probes
                .and_then(|p| p.traps.as_ref())
                .map(|(support, trap)| SelfTestSummary::new(support, *trap)),
            vcpus: probes
                .map(|p| {
                    p.vcpus
                        .iter()
                        .map(|&(debug_exits, site_hits, handed_back)| VcpuSummary {
                            debug_exits,
                            site_hits,
                            handed_back,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            stacks: Vec::new(),
            faults_with_probes: report.faults_with_probes.clone(),
            rewritten: probes
                .map(|p| {
                    p.rewritten
                        .iter()
                        .map(|r| RewrittenSummary {
                            va: r.va,
                            found: r.found.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The end-of-run summary lines of a run with probes: one per probe, the exit counts,
    /// register ioctls, the kernel text hashes, the KASLR slide, bytes the guest rewrote.
    pub fn text_lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .probes
            .iter()
            .map(|p| format!("hvprobe: probe {p}"))
            .collect();
        let e = &self.exits;
        let hits: u64 = self.probes.iter().map(|s| s.hits).sum();
        let exits = e.breakpoints
            + e.hw_breakpoints
            + e.slot_traps
            + e.returns
            + e.watch_steps
            + e.protected_writes
            + e.neighbour_writes;
        let all_exits = exits + e.reinjected + e.reinjected_debug;
        let plans: Vec<String> = e
            .hits_by_plan
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(p, n)| format!("{p}={n}"))
            .collect();
        let plan_hits = e.hits_by_plan.iter().map(|(_, n)| n).sum::<u64>().max(1);
        out.push(format!(
            "hvprobe: exits: {} (sites hit by plan: {}); exits per probe hit {}",
            e.counts(),
            if plans.is_empty() {
                "none".to_string()
            } else {
                plans.join(" ")
            },
            if hits == 0 {
                "n/a".to_string()
            } else {
                format!("{:.2}", exits as f64 / plan_hits as f64)
            }
        ));
        if let Some(d) = self
            .jump_dropped
            .filter(|d| d.no_ring + d.full_or_nested > 0)
        {
            out.push(format!(
                "hvprobe: jump plan: hits not recorded: {} in a full ring or nested, {} on a vCPU without a ring (counted as missed)",
                d.full_or_nested, d.no_ring
            ));
        }
        let (reads, writes) = (e.register_reads, e.register_writes);
        if all_exits > 0 {
            out.push(format!(
                "hvprobe: register ioctls: reads={reads} writes={writes} ({:.1} reads and {:.1} writes per exit)",
                reads as f64 / all_exits as f64,
                writes as f64 / all_exits as f64
            ));
        }
        if self.vcpus.len() > 1 {
            let per: Vec<String> = self
                .vcpus
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    format!(
                        "{i}: exits={} hits={} handed_back={}",
                        v.debug_exits, v.site_hits, v.handed_back
                    )
                })
                .collect();
            out.push(format!("hvprobe: per vCPU: {}", per.join("; ")));
        }
        let mut events: Vec<&str> = Vec::new();
        for s in &self.stacks {
            let event = s.stack.split(';').next().unwrap_or("");
            if !events.contains(&event) {
                events.push(event);
            }
        }
        for event in events {
            let of: Vec<&StackCount> = self
                .stacks
                .iter()
                .filter(|s| s.stack.split(';').next() == Some(event))
                .collect();
            let hits: u64 = of.iter().map(|s| s.count).sum();
            out.push(format!(
                "hvprobe: stacks of {event}: {} distinct in {hits} hits; top {}:",
                of.len(),
                of.len().min(TOP_STACKS)
            ));
            for s in of.iter().take(TOP_STACKS) {
                let path = s.stack.split_once(';').map_or("", |(_, p)| p);
                out.push(format!("hvprobe:   {:>8} {path}", s.count));
            }
        }
        if let Some(t) = &self.text {
            let after = t.after.map(|a| format!("{a:#018x}")).unwrap_or("-".into());
            let guest = format!(
                "hvprobe's sites restored byte-for-byte; the guest changed {} other range(s) of its text itself",
                t.guest_changes.unwrap_or(0)
            );
            let verdict = match t.after {
                Some(a) if a == t.before => "restored byte-for-byte",
                Some(_) if t.restored => &guest,
                Some(_) => "DIFFERS",
                None => "not checked",
            };
            out.push(format!(
                "hvprobe: kernel text hash before={:#018x} planted={:#018x} after={after} ({verdict})",
                t.before, t.planted
            ));
        }
        if let Some(slide) = self.kaslr_slide {
            out.push(format!(
                "hvprobe: kernel base slide {slide:#x} (the guest's {} against System.map's {})",
                crate::arch::Host::KASLR_ANCHOR.register,
                self.kaslr_anchor.as_deref().unwrap_or("anchor")
            ));
        }
        for r in &self.rewritten {
            out.push(format!(
                "hvprobe: warning: the guest rewrote the probed byte at {:#x} (now {:02x?}); left as the guest wrote it",
                r.va, r.found
            ));
        }
        if let Some(i) = &self.integrity {
            out.extend(i.text_lines());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(location: &str, plan: PlanKind, trap: TrapName, return_probe: bool) -> ProbeSummary {
        ProbeSummary {
            location: location.into(),
            address: 0xffff_ffff_8100_0010,
            instruction: "nop".into(),
            plan,
            exits_per_hit: plan.exits_per_hit(),
            no_jump: None,
            trap,
            hits: 3,
            missed: 1,
            handler_errors: 0,
            return_probe,
            returns: 2,
            nmissed: 0,
        }
    }

    #[test]
    fn one_model_gives_the_json_and_the_text_lines() {
        let summary = RunSummary {
            outcome: OutcomeSummary {
                kind: OutcomeKind::KernelFault,
                exit_code: 125,
                detail: Some("BUG: x".into()),
            },
            boot_to_init_s: Some(1.5),
            boot_to_autorun_s: None,
            run_s: 3.0,
            jump_dropped: None,
            probes: vec![
                probe("f", PlanKind::Emulate, TrapName::Hw, false),
                probe("r:g", PlanKind::XolRiprel, TrapName::Brk, true),
            ],
            exits: ExitSummary {
                breakpoints: 4,
                hits_by_plan: vec![(PlanKind::Emulate, 3), (PlanKind::XolRiprel, 3)],
                ..ExitSummary::default()
            },
            text: Some(TextSummary {
                before: 1,
                planted: 2,
                after: Some(1),
                restored: true,
                guest_changes: None,
            }),
            kaslr_slide: None,
            kaslr_anchor: None,
            refused: vec![RefusedProbe::at_resolution("nope", "unknown symbol")],
            self_test: None,
            vcpus: vec![
                VcpuSummary {
                    debug_exits: 5,
                    site_hits: 4,
                    handed_back: 1,
                },
                VcpuSummary {
                    debug_exits: 0,
                    site_hits: 0,
                    handed_back: 0,
                },
            ],
            faults_with_probes: vec!["BUG: x".into()],
            stacks: Vec::new(),
            integrity: None,
            rewritten: vec![RewrittenSummary {
                va: 0x10,
                found: vec![0x90],
            }],
        };
        let json = serde_json::to_string(&summary).unwrap();
        for spelled in [
            r#""kind":"kernel-fault""#,
            r#""plan":"xol-riprel""#,
            r#""trap":"brk""#,
            r#""trap":"hw""#,
            r#""stage":"resolution""#,
        ] {
            assert!(json.contains(spelled), "{spelled} in {json}");
        }
        let back: RunSummary = serde_json::from_str(&json).unwrap();
        assert_eq!(back, summary);
        let lines = back.text_lines();
        assert_eq!(
            lines[0],
            "hvprobe: probe f at 0xffffffff81000010 (nop; plan emulate; trap hw): hits=3 missed=1 handler_errors=0"
        );
        assert!(lines[1].ends_with("returns=2 nmissed=0"), "{}", lines[1]);
        assert!(
            lines[2]
                .contains("(sites hit by plan: emulate=3 xol-riprel=3); exits per probe hit 0.67"),
            "{}",
            lines[2]
        );
        assert!(lines.iter().any(|l| l.contains("(restored byte-for-byte)")));
        assert!(lines.iter().any(|l| l
            == "hvprobe: per vCPU: 0: exits=5 hits=4 handed_back=1; 1: exits=0 hits=0 handed_back=0"));
        assert!(
            lines
                .last()
                .unwrap()
                .contains("rewrote the probed byte at 0x10 (now [90])")
        );
    }

    #[test]
    fn text_the_guest_patched_away_from_hvprobes_sites_is_restored_and_counted() {
        use crate::machine::{Outcome, ProbeReport, RunReport, TextChanges, TextHashes};
        let report = |after: u64, changed: TextChanges| RunReport {
            outcome: Outcome::CommandExited(0),
            boot_to_init: None,
            boot_to_autorun: None,
            run_time: std::time::Duration::ZERO,
            console_tail: Vec::new(),
            faults_with_probes: Vec::new(),
            probes: Some(ProbeReport {
                text: Some(TextHashes {
                    before: 1,
                    planted: 2,
                    after: Some(after),
                    changed: Some(changed),
                }),
                ..ProbeReport::default()
            }),
        };
        let text = |after, at_probe_sites, by_the_guest| {
            let changed = TextChanges {
                at_probe_sites,
                by_the_guest,
            };
            RunSummary::new(&report(after, changed), 0).text.unwrap()
        };
        let same = text(1, 0, 0);
        assert!(same.restored && same.guest_changes.is_none());
        let guest = text(3, 0, 2);
        assert!(guest.restored);
        assert_eq!(guest.guest_changes, Some(2));
        let ours = text(3, 1, 2);
        assert!(
            !ours.restored,
            "a change at one of hvprobe's sites is a failed restore"
        );
        let summary = RunSummary::new(
            &report(
                3,
                TextChanges {
                    at_probe_sites: 0,
                    by_the_guest: 2,
                },
            ),
            0,
        );
        assert!(summary.text_lines().iter().any(|l| l.contains(
            "(hvprobe's sites restored byte-for-byte; the guest changed 2 other range(s) of its text itself)"
        )));
    }
}
