//! Helpers shared by the integration tests: running the `hvprobe` binary and checking what it
//! printed.
#![allow(dead_code)]

use std::process::{Command, Output};

pub const HVPROBE: &str = env!("CARGO_BIN_EXE_hvprobe");

/// Runs `hvprobe ARGS` and returns its output (stdin closed).
pub fn hvprobe(args: &[&str]) -> Output {
    Command::new(HVPROBE)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("hvprobe starts")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\r', "")
}

/// Fails with everything hvprobe printed.
pub fn explain(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Asserts that `haystack` (stdout or stderr of `out`) contains `needle`.
#[track_caller]
pub fn assert_has(haystack: &str, needle: &str, out: &Output) {
    assert!(
        haystack.contains(needle),
        "expected {needle:?}\n{}",
        explain(out)
    );
}

/// FNV-1a, as the guest workloads print it.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(1469598103934665603u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(1099511628211)
    })
}
