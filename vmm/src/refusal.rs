//! A probe that was refused, where and why: at resolution (syntax, unknown symbol, text that
//! runs elsewhere) or at planting in the running guest (instruction checks, see
//! [`probe_core::engine::PlantError`]). One record for the stderr lines, the run summary and
//! the live-session API.

use serde::{Deserialize, Serialize};

use probe_core::engine::PlantError;

/// When a probe was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefusalStage {
    /// Against System.map, before any VM started.
    Resolution,
    /// In the running guest, with every vCPU paused.
    Planting,
}

/// A refused probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedProbe {
    /// The probe as the user gave it (a definition, a location) or its location.
    pub location: String,
    /// Why, in one line.
    pub reason: String,
    /// When.
    pub stage: RefusalStage,
}

impl RefusedProbe {
    /// A probe refused at resolution.
    pub fn at_resolution(location: impl Into<String>, reason: impl Into<String>) -> RefusedProbe {
        RefusedProbe {
            location: location.into(),
            reason: reason.into(),
            stage: RefusalStage::Resolution,
        }
    }
}

impl From<&PlantError> for RefusedProbe {
    fn from(e: &PlantError) -> RefusedProbe {
        RefusedProbe {
            location: e.location.clone(),
            reason: e.kind.to_string(),
            stage: RefusalStage::Planting,
        }
    }
}

impl std::fmt::Display for RefusedProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

/// One refusal as it is, or several as `N probes refused:` and one per indented line.
pub fn refusal_list(refused: &[RefusedProbe]) -> String {
    let lines: Vec<String> = refused.iter().map(ToString::to_string).collect();
    crate::job::problem_list(&lines, "probes refused")
}
