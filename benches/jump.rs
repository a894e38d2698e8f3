//! The jump plan's cost per hit against the exit plan and the guest's own kprobe (whole-system
//! runs, not a timed test). The guest times bursts of `getpid-loop 2000` itself (the loop's
//! own CLOCK_MONOTONIC figure, `ns=`), with a pause between bursts so that the jump plan's ring
//! (2048 records) is drained and every hit is recorded, not dropped: unprobed and then with the
//! guest's own kprobe on the getpid syscall function (tracefs, the same run), with hvprobe's
//! jump probe on it, and with hvprobe's exit plan on it. Prints each per-hit cost and the
//! ratios. `cargo bench -p hvprobe-vmm --bench jump` (`HVPROBE_BENCH_BURSTS=N`, default 50;
//! `HVPROBE_TEST_ARCH=aarch64` for the arm64 guest).

use std::process::Command;

/// Calls per burst: one burst fits a vCPU's ring.
const BURST: u64 = 2000;

/// The `ns=` figures of every `getpid-loop` line, in order.
fn loop_ns(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("getpid-loop: calls="))
        .filter_map(|l| l.rsplit_once(" ns=")?.1.trim().parse().ok())
        .collect()
}

/// The guest architecture asked for (`HVPROBE_TEST_ARCH`, as the tests), and its getpid
/// syscall function.
fn guest() -> (&'static str, &'static str) {
    match std::env::var("HVPROBE_TEST_ARCH").as_deref() {
        Ok("aarch64") | Ok("arm64") => ("aarch64", "__arm64_sys_getpid"),
        _ => ("x86_64", "__x64_sys_getpid"),
    }
}

/// Runs hvprobe; the loops' times and the summary line of the probe ("" without one).
fn run(args: &[&str]) -> (Vec<u64>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .arg("run")
        .args(["--arch", guest().0])
        .args(args)
        .output()
        .expect("hvprobe runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hvprobe {args:?} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let probe = stdout
        .lines()
        .find(|l| l.starts_with("hvprobe: probe "))
        .unwrap_or("")
        .to_string();
    (loop_ns(&stdout), probe)
}

fn bursts(n: u64) -> String {
    format!("i=0; while [ $i -lt {n} ]; do getpid-loop {BURST}; sleep 0.05; i=$((i+1)); done")
}

fn main() {
    let n: u64 = std::env::var("HVPROBE_BENCH_BURSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let f = guest().1;
    let k = "/sys/kernel/tracing";
    let guest = format!(
        "{}; echo 'p:kprobes/g {f}' > {k}/kprobe_events && echo 1 > {k}/events/kprobes/g/enable && {}",
        bursts(n),
        bursts(n)
    );
    let (t, _) = run(&["--quiet", "--exec", &guest]);
    let (n_us, base, kprobe) = (n as usize, &t[..n as usize], &t[n as usize..]);
    assert_eq!(kprobe.len(), n_us, "{t:?}");
    let (jump, jump_line) = run(&["--quiet", "-p", f, "--plan", "auto", "--exec", &bursts(n)]);
    let m = (n / 10).max(1);
    let (exit, exit_line) = run(&["--quiet", "-p", f, "--plan", "exit", "--exec", &bursts(m)]);
    let calls = |t: &[u64]| (t.len() as u64 * BURST) as f64;
    let total = |t: &[u64]| t.iter().sum::<u64>() as f64;
    let per_call = total(base) / calls(base);
    let per_hit = |t: &[u64]| (total(t) / calls(t) - per_call) / 1000.0;
    let (pk, pj, pe) = (per_hit(kprobe), per_hit(&jump), per_hit(&exit));
    println!(
        "{n} bursts of getpid-loop {BURST}, unprobed: {:.3} us a call",
        per_call / 1000.0
    );
    println!("the guest's own kprobe on {f}: {pk:.3} us a hit");
    println!("hvprobe jump plan: {pj:.3} us a hit\n  {jump_line}");
    println!("hvprobe exit plan ({m} bursts): {pe:.2} us a hit\n  {exit_line}");
    println!(
        "jump / guest kprobe = {:.2}; exit / jump = {:.0}",
        pj / pk.max(1e-9),
        pe / pj.max(1e-9)
    );
}
