//! Helpers shared by the integration tests: running the `hvprobe` binary and checking what it
//! printed.
#![allow(dead_code)]

use std::ops::Deref;
use std::process::{Command, Output};

use hvprobe_vmm::refusal::{RefusalStage, RefusedProbe};
use hvprobe_vmm::summary::{ProbeSummary, RunSummary, SelfTestSummary};

pub const HVPROBE: &str = env!("CARGO_BIN_EXE_hvprobe");

/// The guest architecture under test: `$HVPROBE_TEST_ARCH` (`x86_64`, `aarch64`), else the
/// host's. One suite serves both; `.ci/run` runs it once per architecture.
pub fn guest_arch() -> hvprobe_guest::GuestArch {
    match std::env::var("HVPROBE_TEST_ARCH").as_deref() {
        Ok("aarch64") | Ok("arm64") => hvprobe_guest::GuestArch::Aarch64,
        Ok("x86_64") | Ok("amd64") => hvprobe_guest::GuestArch::X86_64,
        Ok(other) => panic!("HVPROBE_TEST_ARCH={other}: expected x86_64 or aarch64"),
        Err(_) => hvprobe_guest::GuestArch::host(),
    }
}

/// Which guests a test is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guests {
    /// Every architecture.
    Any,
    /// One architecture (its instructions, syscalls or CPU models); on the other it is
    /// skipped and reported as such, never counted as passed.
    Only(hvprobe_guest::GuestArch),
}

/// One test of a suite.
pub struct Case {
    /// Its name, as filters and reports show it.
    pub name: &'static str,
    /// The guests it is written for.
    pub guests: Guests,
    /// The test; it panics to fail.
    pub body: fn(),
}

/// The cases of a suite, grouped by the guests they are written for:
/// `cases![Guests::Any => [a, b], Guests::Only(GuestArch::X86_64) => [c]]`.
#[macro_export]
macro_rules! cases {
    ($($guests:expr => [$($f:ident),* $(,)?]),* $(,)?) => {
        vec![$($($crate::common::Case { name: stringify!($f), guests: $guests, body: $f }),*),*]
    };
}

/// Runs a suite with libtest's command line and output (libtest-mimic): each case for the
/// architecture under test; a case written for another is reported as ignored, with a line
/// that says how many ran and how many were not applicable. Run alone (`--ignored`), a case
/// of another architecture fails rather than pass without testing anything.
pub fn run_suite(suite: &str, cases: Vec<Case>) -> ! {
    // libtest takes several name filters (`cargo test -- a b`), libtest-mimic one: the names
    // are taken out here and applied below, the rest goes to libtest-mimic.
    let mut filters = Vec::new();
    let mut rest = Vec::new();
    let mut raw = std::env::args();
    rest.extend(raw.next());
    while let Some(a) = raw.next() {
        let takes_value = matches!(
            a.as_str(),
            "--test-threads" | "--logfile" | "--skip" | "--format" | "--color" | "-Z"
        );
        if a.starts_with('-') {
            rest.push(a);
            if takes_value {
                rest.extend(raw.next());
            }
        } else {
            filters.push(a);
        }
    }
    let args = libtest_mimic::Arguments::from_iter(rest);
    let chosen = |name: &str| {
        filters.is_empty()
            || filters.iter().any(|f| {
                if args.exact {
                    name == f
                } else {
                    name.contains(f.as_str())
                }
            })
    };
    let cases: Vec<Case> = cases.into_iter().filter(|c| chosen(c.name)).collect();
    let arch = guest_arch();
    let applies = |c: &Case| match c.guests {
        Guests::Any => true,
        Guests::Only(a) => a == arch,
    };
    let skipped = cases.iter().filter(|c| !applies(c)).count();
    if !args.list {
        println!(
            "\n{suite} on {arch} guests: {} tests apply, {skipped} written for another architecture are skipped (shown as ignored)",
            cases.len() - skipped
        );
    }
    let trials = cases
        .into_iter()
        .map(|c| {
            let run = applies(&c);
            let kind = match c.guests {
                Guests::Any => "",
                Guests::Only(a) => a.name(),
            };
            libtest_mimic::Trial::test(c.name, move || {
                if !run {
                    return Err(format!("written for {kind} guests, not {arch}").into());
                }
                (c.body)();
                Ok(())
            })
            .with_ignored_flag(!run)
            .with_kind(kind)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit()
}

/// The suffix of the default guest kernel's release (`-cloud-amd64`, `-cloud-arm64`).
pub fn kernel_release_suffix() -> String {
    format!("-cloud-{}", guest_arch().debian())
}

/// Runs `hvprobe ARGS` and returns its output (stdin closed); `run` gets the architecture under
/// test (`--arch`).
pub fn hvprobe(args: &[&str]) -> Output {
    hvprobe_in(None, args)
}

/// The same, started in directory `dir` (where a user happens to be) instead of the test's.
pub fn hvprobe_in(dir: Option<&std::path::Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(HVPROBE);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    match args.split_first() {
        Some((&"run", rest)) => {
            cmd.args(["run", "--arch", guest_arch().name()]).args(rest);
        }
        _ => {
            cmd.args(args);
        }
    }
    cmd.stdin(std::process::Stdio::null())
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

/// A finished `hvprobe run`: its output and its `--summary-json` summary, so that tests read
/// counters as data instead of scraping summary lines.
pub struct Run {
    /// What hvprobe printed and its exit status.
    pub out: Output,
    /// The summary, when the run got as far as a VM.
    pub summary: Option<RunSummary>,
}

impl Deref for Run {
    type Target = Output;

    fn deref(&self) -> &Output {
        &self.out
    }
}

impl Run {
    /// Runs `hvprobe run ARGS --summary-json TMP` and reads the summary.
    pub fn new(args: &[&str]) -> Run {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "hvprobe-summary-{}-{}.json",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_file(&path);
        let mut all: Vec<&str> = args.to_vec();
        let p = path.to_str().expect("utf-8 temp path");
        all.extend(["--summary-json", p]);
        let out = hvprobe(&all);
        let summary = std::fs::read_to_string(&path)
            .ok()
            .map(|t| serde_json::from_str(&t).expect("a valid summary"));
        let _ = std::fs::remove_file(&path);
        Run { out, summary }
    }

    /// The summary; fails with everything hvprobe printed when there is none.
    #[track_caller]
    pub fn summary(&self) -> &RunSummary {
        self.summary
            .as_ref()
            .unwrap_or_else(|| panic!("no run summary\n{}", explain(&self.out)))
    }

    /// The trap self-test's verdict.
    #[track_caller]
    pub fn self_test(&self) -> &SelfTestSummary {
        self.summary()
            .self_test
            .as_ref()
            .unwrap_or_else(|| panic!("no self-test verdict\n{}", explain(&self.out)))
    }

    /// The counters of the probe at `location` (as given).
    #[track_caller]
    pub fn probe(&self, location: &str) -> &ProbeSummary {
        self.summary()
            .probes
            .iter()
            .find(|p| p.location == location)
            .unwrap_or_else(|| panic!("no probe {location}\n{}", explain(&self.out)))
    }

    /// The refusal of the probe whose location is `location` (as given, or as the engine
    /// names it), at resolution or planting.
    #[track_caller]
    pub fn refusal(&self, location: &str) -> &RefusedProbe {
        let refused = &self.summary().refused;
        refused
            .iter()
            .find(|r| r.location == location)
            .unwrap_or_else(|| {
                panic!(
                    "no refusal of {location} in {refused:?}\n{}",
                    explain(&self.out)
                )
            })
    }

    /// Asserts the probe at `location` was refused at `stage` for a reason that says `why`.
    #[track_caller]
    pub fn assert_refused(&self, location: &str, stage: RefusalStage, why: &str) {
        let r = self.refusal(location);
        assert!(
            r.stage == stage && r.reason.contains(why),
            "{r:?} is not a refusal at {stage:?} for \"{why}\"\n{}",
            explain(&self.out)
        );
    }

    /// Asserts the kernel text came back byte-for-byte after the probes were removed.
    #[track_caller]
    pub fn assert_text_restored(&self) {
        let text = self.summary().text.as_ref();
        assert!(
            text.is_some_and(|t| t.restored),
            "text not restored: {text:?}\n{}",
            explain(&self.out)
        );
    }
}
