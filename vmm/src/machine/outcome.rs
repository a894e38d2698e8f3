//! How a run ended ([`Outcome`]) and the report of it ([`RunReport`]), from the stop reason
//! and what the console showed.

use std::time::Duration;

use super::ProbeReport;
use crate::devices::console::ConsoleState;
use crate::vcpu::StopReason;

/// How a guest run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The default guest's command finished with this status and the guest shut down.
    CommandExited(i32),
    /// The guest shut down without reporting a command status.
    ShutDown,
    /// The guest kernel panicked; the panic line.
    Panicked(String),
    /// The guest kernel reported an oops, BUG, WARN or lockup while probes were in, and the
    /// guest went on to shut down; the first report line. Never passed over as a success:
    /// a probe may be what broke the guest.
    KernelFault(String),
    /// The guest did not finish within the time limit.
    TimedOut(Duration),
    /// A vCPU failed in a way KVM cannot continue from.
    VcpuError(String),
    /// The user interrupted the run.
    Interrupted,
    /// A client of the live-session API stopped the VM.
    Stopped,
    /// A probe could not be planted; nothing was left in the guest.
    ProbeRefused(String),
}

/// Exit status when the guest failed (panic, vCPU error, no status from the command).
pub const EXIT_GUEST_FAILED: i32 = 125;
/// Exit status when a probe could not be planted (bad location, refused instruction).
pub const EXIT_PROBE_REFUSED: i32 = 2;

impl Outcome {
    /// How a run that stopped for `reason` ended: a refusal at planting first, then the
    /// reason, and for a guest that went down by itself what its console showed (a panic, a
    /// fault report while probes were in, the command's status).
    pub(super) fn of(
        reason: StopReason,
        probe_refused: Option<String>,
        timeout: Option<Duration>,
        console: &ConsoleState,
    ) -> Outcome {
        if let Some(refused) = probe_refused {
            return Outcome::ProbeRefused(refused);
        }
        match reason {
            StopReason::Timeout => Outcome::TimedOut(timeout.unwrap_or_default()),
            StopReason::Interrupted => Outcome::Interrupted,
            StopReason::Requested => Outcome::Stopped,
            StopReason::VcpuError(e) => Outcome::VcpuError(e),
            StopReason::GuestReset | StopReason::GuestPoweroff => {
                match (
                    &console.panic,
                    console.faults_with_probes.first(),
                    console.exit_status,
                ) {
                    (Some(p), _, _) => Outcome::Panicked(p.clone()),
                    (None, Some(f), _) => Outcome::KernelFault(f.clone()),
                    (None, None, Some(s)) => Outcome::CommandExited(s),
                    (None, None, None) => Outcome::ShutDown,
                }
            }
        }
    }

    /// The process exit status that reports this outcome: the guest command's own status,
    /// 0 for a plain shutdown, 124 for a timeout (like `timeout(1)`), 125 for a guest
    /// failure, 130 for an interrupt.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::CommandExited(s) => *s,
            Outcome::ShutDown | Outcome::Stopped => 0,
            Outcome::TimedOut(_) => 124,
            Outcome::Panicked(_) | Outcome::KernelFault(_) | Outcome::VcpuError(_) => {
                EXIT_GUEST_FAILED
            }
            Outcome::Interrupted => 130,
            Outcome::ProbeRefused(_) => EXIT_PROBE_REFUSED,
        }
    }
}

/// How a run ended, with what is worth telling the user.
#[derive(Debug)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Time from VM start to the default guest's `/init` marker.
    pub boot_to_init: Option<Duration>,
    /// Time from VM start to the root file system's autorun unit (`--rootfs`).
    pub boot_to_autorun: Option<Duration>,
    /// Total time the VM ran.
    pub run_time: Duration,
    /// The last console lines, for error reports.
    pub console_tail: Vec<String>,
    /// The first line of each guest kernel fault report (oops, BUG, WARN, lockup, panic)
    /// printed while probes were in.
    pub faults_with_probes: Vec<String>,
    /// What the probes saw, when the run had any.
    pub probes: Option<ProbeReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_that_went_down_is_judged_by_its_console() {
        let mut console = ConsoleState::default();
        let end = |c: &ConsoleState| Outcome::of(StopReason::GuestPoweroff, None, None, c);
        assert_eq!(end(&console), Outcome::ShutDown);
        console.exit_status = Some(3);
        assert_eq!(end(&console), Outcome::CommandExited(3));
        console.faults_with_probes.push("BUG: oops".into());
        assert_eq!(end(&console), Outcome::KernelFault("BUG: oops".into()));
        console.panic = Some("Kernel panic - not syncing".into());
        assert_eq!(
            end(&console),
            Outcome::Panicked("Kernel panic - not syncing".into())
        );
        // A refusal at planting wins over how the guest went down; a timeout over the console.
        assert_eq!(
            Outcome::of(StopReason::GuestReset, Some("no".into()), None, &console),
            Outcome::ProbeRefused("no".into())
        );
        let t = Duration::from_secs(5);
        assert_eq!(
            Outcome::of(StopReason::Timeout, None, Some(t), &console).exit_code(),
            124
        );
    }
}
