//! The end-of-run summary as data (`--summary-json FILE`): how the run ended, each probe's
//! counters, the exit counts, the kernel text hashes and the KASLR slide, for programs and
//! tests that would otherwise scrape the summary lines.

use crate::arch::VmmArch;
use serde::{Deserialize, Serialize};

use crate::machine::{Outcome, RunReport};
use probe_core::probe::TrapKind;

/// Prefix of the one stderr line that carries the summary out of the emulated runner's L1
/// (the runner takes it off the relayed stderr and writes the file on the host).
pub const STDERR_PREFIX: &str = "HVPROBE-SUMMARY-JSON ";

/// The `--summary-json` path the runner gives the hvprobe inside L1: "one stderr line".
pub const ON_STDERR: &str = "/dev/hvprobe-summary-on-stderr";

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeSummary {
    /// `command-exited`, `shut-down`, `panicked`, `kernel-fault`, `timed-out`, `vcpu-error`,
    /// `interrupted` or `probe-refused`.
    pub kind: String,
    /// The process exit status hvprobe returns for it.
    pub exit_code: i32,
    /// The panic line, the fault report, the error or the refusal, when there is one.
    pub detail: Option<String>,
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
    /// The step plan (`emulate`, `xol`, `xol-riprel`).
    pub plan: String,
    /// `int3` or `hw`.
    pub trap: String,
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
    /// Sites hit, by step plan.
    pub hits_by_plan: Vec<(String, u64)>,
    /// Register reads made while handling the exits (arm64: `KVM_GET_ONE_REG` calls; x86_64:
    /// none with sync regs).
    #[serde(default)]
    pub register_reads: u64,
    /// Register writes made while handling the exits.
    #[serde(default)]
    pub register_writes: u64,
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
    /// `after == before`.
    pub restored: bool,
}

/// The whole summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// How the run ended.
    pub outcome: OutcomeSummary,
    /// Seconds from VM start to the default guest's `/init`.
    pub boot_to_init_s: Option<f64>,
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
    /// Probes refused at planting and skipped (`--skip-refused`).
    pub skipped: Vec<String>,
    /// Guest kernel fault reports printed while probes were in.
    pub faults_with_probes: Vec<String>,
}

impl RunSummary {
    /// The summary of `report`, a run that ends with `exit_code`.
    pub fn new(report: &RunReport, exit_code: i32) -> RunSummary {
        let (kind, detail) = match &report.outcome {
            Outcome::CommandExited(_) => ("command-exited", None),
            Outcome::ShutDown => ("shut-down", None),
            Outcome::Panicked(l) => ("panicked", Some(l.clone())),
            Outcome::KernelFault(l) => ("kernel-fault", Some(l.clone())),
            Outcome::TimedOut(t) => ("timed-out", Some(format!("{} s", t.as_secs()))),
            Outcome::VcpuError(e) => ("vcpu-error", Some(e.clone())),
            Outcome::Interrupted => ("interrupted", None),
            Outcome::ProbeRefused(e) => ("probe-refused", Some(e.clone())),
        };
        let probes = report.probes.as_ref();
        RunSummary {
            outcome: OutcomeSummary {
                kind: kind.into(),
                exit_code,
                detail,
            },
            boot_to_init_s: report.boot_to_init.map(|d| d.as_secs_f64()),
            run_s: report.run_time.as_secs_f64(),
            probes: probes
                .map(|p| {
                    p.stats
                        .iter()
                        .map(|s| ProbeSummary {
                            location: s.location.clone(),
                            address: s.address,
                            instruction: s.instruction.clone(),
                            plan: s.plan.name().into(),
                            trap: match s.trap {
                                TrapKind::Software => crate::arch::Host::BREAKPOINT_NAME,
                                TrapKind::Hardware => "hw",
                            }
                            .into(),
                            hits: s.hits,
                            missed: s.missed,
                            handler_errors: s.handler_errors,
                            return_probe: s.return_probe,
                            returns: s.returns,
                            nmissed: s.nmissed,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            exits: probes
                .map(|p| {
                    let e = &p.exits;
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
                        hits_by_plan: e
                            .hits_by_plan
                            .iter()
                            .map(|(n, c)| (n.to_string(), *c))
                            .collect(),
                        register_reads: p.register_ioctls.0,
                        register_writes: p.register_ioctls.1,
                    }
                })
                .unwrap_or_default(),
            text: probes.and_then(|p| p.text).map(|t| TextSummary {
                before: t.before,
                planted: t.planted,
                after: t.after,
                restored: t.after == Some(t.before),
            }),
            kaslr_slide: probes.and_then(|p| p.kaslr_slide),
            kaslr_anchor: probes.and_then(|p| p.kaslr_anchor.clone()),
            skipped: probes.map(|p| p.skipped.clone()).unwrap_or_default(),
            faults_with_probes: report.faults_with_probes.clone(),
        }
    }
}
