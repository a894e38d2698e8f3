//! What a hit of each exit plan costs against the floor of a VM exit (a whole-system run, not a
//! timed test). The guest times, with its own clock, `exit-loop N` (N accesses that KVM hands
//! to the VMM's user space: a port read on x86_64, an unbacked MMIO read on arm64; the floor)
//! and `getpid-loop N`, unprobed, then with one hvprobe probe (`--plan exit`) on an emulated
//! instruction of the getpid syscall function (the entry word) and on one stepped out of line;
//! each probed boot times the floor again. Per hit = the probed call less the unprobed call;
//! the ratio is per hit over the same boot's floor, and per exit where a plan takes two.
//! `cargo bench -p hvprobe-vmm --bench exits` (`HVPROBE_BENCH_CALLS=N`, default 2000;
//! `HVPROBE_TEST_ARCH=aarch64` for the arm64 guest).

use std::process::Command;

/// The guest architecture asked for (`HVPROBE_TEST_ARCH`, as the tests), and its probe sites:
/// the entry word (emulated) and an instruction stepped out of line.
fn guest() -> (&'static str, &'static str, &'static str) {
    match std::env::var("HVPROBE_TEST_ARCH").as_deref() {
        Ok("aarch64") | Ok("arm64") => (
            "aarch64",
            "__arm64_sys_getpid",
            // mov x2, #0
            "__arm64_sys_getpid+0x10",
        ),
        _ => (
            "x86_64",
            "__x64_sys_getpid",
            // mov $0x1, %esi
            "__x64_sys_getpid+0x7",
        ),
    }
}

/// The `ns=` figure of the first line starting with `prefix`, per access or call.
fn per_op(stdout: &str, prefix: &str, n: u64) -> f64 {
    let ns: f64 = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(" ns=")?.1.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{prefix}` line in\n{stdout}"));
    ns / n as f64 / 1000.0
}

/// One boot: the floor (us an exit), getpid (us a call), and the probe's summary lines.
fn run(n: u64, probe: Option<&str>) -> (f64, f64, String) {
    let mut args = vec![
        "run".to_string(),
        "--arch".into(),
        guest().0.into(),
        "--quiet".into(),
        "--plan".into(),
        "exit".into(),
    ];
    if let Some(p) = probe {
        args.extend(["-p".into(), p.into()]);
    }
    args.extend([
        "--exec".into(),
        format!("exit-loop {n}; getpid-loop {n}; exit-loop {n}"),
    ]);
    let out = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .args(&args)
        .output()
        .expect("hvprobe runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "hvprobe {args:?} failed\n{stdout}\n{stderr}"
    );
    // The lower of the two floors: the first may pay for the mapping's first touch.
    let floors: Vec<f64> = stdout
        .lines()
        .filter(|l| l.starts_with("exit-loop: "))
        .map(|l| per_op(l, "exit-loop: ", n))
        .collect();
    let floor = floors.iter().cloned().fold(f64::INFINITY, f64::min);
    let summary = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| {
            l.starts_with("hvprobe: probe ")
                || l.starts_with("hvprobe: exits:")
                || l.starts_with("hvprobe: register ioctls")
        })
        .collect::<Vec<_>>()
        .join("\n  ");
    (floor, per_op(&stdout, "getpid-loop: ", n), summary)
}

fn main() {
    let n: u64 = std::env::var("HVPROBE_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let (arch, entry, stepped) = guest();
    let (floor0, base, _) = run(n, None);
    println!(
        "{arch}: {n} calls; unprobed: an exit to the VMM {floor0:.2} us, a getpid call {base:.2} us"
    );
    for (what, site) in [("emulated", entry), ("out of line", stepped)] {
        let (floor, probed, summary) = run(n, Some(site));
        let per_hit = probed - base;
        // Exits per hit, as the summary counts them (2 where a step needs its own trap).
        let exits: f64 = summary
            .split_once("exits per probe hit ")
            .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
            .filter(|e: &f64| *e > 0.0)
            .unwrap_or(1.0);
        println!(
            "{what} ({site}): {per_hit:.2} us a hit, floor {floor:.2} us: {:.2}x the floor ({:.2}x per exit, {exits:.2} exits a hit)\n  {summary}",
            per_hit / floor,
            per_hit / floor / exits
        );
    }
}
