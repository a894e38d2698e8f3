//! The live-session API: HTTP/1.1 and JSON on a Unix socket (`hvprobe run --api-socket PATH`),
//! so that `curl --unix-socket PATH http://localhost/probes` works, as with Firecracker's API
//! socket. The server (`http.rs`) turns each request into an [`ApiRequest`] for the run loop,
//! which handles one at a time with every vCPU paused for a change; event streams are served
//! from the [`events::EventHub`] without the loop. `client.rs` is the command-line clients'
//! side; `mux.rs` carries connections through the emulated runner into L1. docs/api.md has
//! every endpoint with examples.

pub mod client;
pub mod events;
pub mod http;
pub mod mux;

use serde::{Deserialize, Serialize};

use crate::refusal::RefusedProbe;
use crate::summary::{ExitSummary, ProbeSummary, VcpuSummary};
use probe_core::catalog::FunctionInfo;

/// What a client asks of the run loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// Plant these probes (any form `-p` takes).
    AddProbes(Vec<String>),
    /// List the probes in.
    ListProbes,
    /// Remove probes.
    RemoveProbes(ProbeSelector),
    /// The kernel's functions matching a glob.
    Functions(String),
    /// Exit counts, per vCPU, pause figures.
    Stats,
    /// Remove every probe and check the kernel text; the VM keeps running.
    Detach,
    /// Compare kernel text, read-only data, the syscall table and the protection settings
    /// with their state when `/init` started.
    Integrity,
    /// Stop the VM.
    Stop,
}

/// Which probes a removal takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeSelector {
    /// The probe with this id.
    Id(u64),
    /// Every probe of this event (`group/event`, or the location of a bare probe).
    Event(String),
    /// Every probe.
    All,
}

/// The run loop's answer: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiReply {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: serde_json::Value,
}

impl ApiReply {
    /// A 200 reply with `body`.
    pub fn ok(body: &impl Serialize) -> ApiReply {
        ApiReply::with_status(200, body)
    }

    /// A reply with `status` and `body`.
    pub fn with_status(status: u16, body: &impl Serialize) -> ApiReply {
        ApiReply {
            status,
            body: serde_json::to_value(body).unwrap_or(serde_json::Value::Null),
        }
    }

    /// An error reply: `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> ApiReply {
        ApiReply::with_status(
            status,
            &ErrorReply {
                error: message.into(),
            },
        )
    }
}

/// The body of every error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// What went wrong, in one line.
    pub error: String,
}

/// `PUT /probes`: the probes to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddProbes {
    /// Each in any form `-p` takes: `SYMBOL[+OFF]`, `0xADDR`, a kprobe_events definition.
    pub probes: Vec<String>,
}

/// A probe that is in, as `GET /probes` lists it: the summary's probe record with its id,
/// how it was given, its event, and its return instances outstanding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeInfo {
    /// Its id, for removal.
    pub id: u64,
    /// The probe as it was given.
    pub spec: String,
    /// Its event: `group/event` of a definition, else its location.
    pub event: String,
    /// Return instances outstanding.
    pub outstanding: usize,
    /// Location, address, instruction, plan, trap and counters, as the run summary has them.
    #[serde(flatten)]
    pub probe: ProbeSummary,
}

/// `GET /probes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeList {
    /// The probes in, by id.
    pub probes: Vec<ProbeInfo>,
}

/// `PUT /probes`: each probe planted or refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddReply {
    /// The probes planted.
    pub planted: Vec<ProbeInfo>,
    /// The probes refused, each with its reason.
    pub refused: Vec<RefusedProbe>,
}

/// `DELETE /probes...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveReply {
    /// The ids removed.
    pub removed: Vec<u64>,
}

/// `GET /stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// Seconds since the VM started.
    pub uptime_s: f64,
    /// Probes in.
    pub probes: usize,
    /// Exit counts since the VM started.
    pub exits: ExitSummary,
    /// Per vCPU, by id.
    pub vcpus: Vec<VcpuSummary>,
    /// Changes made (plantings, removals, detaches), each with every vCPU paused.
    pub changes: u64,
    /// The longest time every vCPU was held out of the guest for one change, microseconds.
    pub longest_pause_us: u64,
    /// The last change's pause, microseconds.
    pub last_pause_us: u64,
    /// Return instances not yet returned, of probes in and of probes removed since (those
    /// still return through the trampoline to their real return addresses).
    pub returns_outstanding: usize,
}

/// `PUT /detach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachReply {
    /// Probes removed.
    pub removed: usize,
    /// Kernel text hash before the first probe went in.
    pub text_before: Option<u64>,
    /// Kernel text hash now.
    pub text_after: Option<u64>,
    /// Every byte hvprobe wrote is back as the guest had it: `text_after == text_before`,
    /// or the text differs only away from hvprobe's sites (the guest patched itself).
    pub restored: bool,
}

/// `GET /functions?pattern=GLOB`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionList {
    /// The matching functions, in address order.
    pub functions: Vec<FunctionInfo>,
}

/// `GET /`: what is running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionReply {
    /// hvprobe's version string.
    pub version: String,
    /// The guest's architecture.
    pub arch: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::TrapName;
    use probe_core::arch::PlanKind;

    #[test]
    fn a_listed_probe_is_one_flat_object_and_reads_back() {
        let info = ProbeInfo {
            id: 3,
            spec: "p:hv/gp __x64_sys_getpid".into(),
            event: "hv/gp".into(),
            outstanding: 0,
            probe: ProbeSummary {
                location: "__x64_sys_getpid".into(),
                address: 0xffff_ffff_8100_0000,
                instruction: "nop".into(),
                plan: PlanKind::Emulate,
                exits_per_hit: 1,
                no_jump: None,
                trap: TrapName::Int3,
                hits: 7,
                missed: 0,
                handler_errors: 0,
                return_probe: false,
                returns: 0,
                nmissed: 0,
            },
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["hits"], 7);
        assert_eq!(json["event"], "hv/gp");
        assert_eq!(json["plan"], "emulate");
        assert_eq!(serde_json::from_value::<ProbeInfo>(json).unwrap(), info);
    }
}
