//! The jump plan's cost per hit against the exit plan and the guest's own kprobe (whole-system
//! runs, not a timed test): `getpid-loop N` timed inside the guest (busybox `time`) with
//! nothing probed, with the guest's own kprobe on the getpid syscall function (tracefs, in
//! the same run as the unprobed loop), with hvprobe's jump probe on it, and with hvprobe's
//! exit plan on it. Prints each per-hit cost and the ratios. `cargo bench -p hvprobe-vmm
//! --bench jump` (`HVPROBE_BENCH_CALLS=N`; the exit plan's loop is a tenth as long).

use std::process::Command;

/// Seconds of every `real` line busybox `time` printed, in order.
fn real_seconds(stderr: &str) -> Vec<f64> {
    stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("real"))
        .filter_map(|t| {
            // busybox: "real\t0m 1.53s"
            let t = t.trim().trim_end_matches('s');
            let (m, s) = t.split_once('m')?;
            Some(m.trim().parse::<f64>().ok()? * 60.0 + s.trim().parse::<f64>().ok()?)
        })
        .collect()
}

fn run(args: &[&str]) -> (Vec<f64>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .arg("run")
        .args(args)
        .output()
        .expect("hvprobe runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hvprobe {args:?} failed\n{stdout}\n{stderr}"
    );
    (real_seconds(&format!("{stdout}\n{stderr}")), stderr)
}

fn main() {
    let n: u64 = std::env::var("HVPROBE_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let f = "__x64_sys_getpid";
    let k = "/sys/kernel/tracing";
    let guest = format!(
        "time getpid-loop {n} >/dev/null; \
         echo 'p:kprobes/g {f}' > {k}/kprobe_events && echo 1 > {k}/events/kprobes/g/enable && \
         time getpid-loop {n} >/dev/null; echo 0 > {k}/events/kprobes/g/enable; \
         grep -w g {k}/kprobe_profile"
    );
    let (t, _) = run(&["--quiet", "--exec", &guest]);
    let (base, kprobe) = (t[0], t[1]);
    let (t, _) = run(&[
        "--quiet",
        "-p",
        f,
        "--plan",
        "auto",
        "--exec",
        &format!("time getpid-loop {n} >/dev/null"),
    ]);
    let jump = t[0];
    let m = n / 10;
    let (t, _) = run(&[
        "--quiet",
        "-p",
        f,
        "--plan",
        "exit",
        "--exec",
        &format!("time getpid-loop {m} >/dev/null"),
    ]);
    let exit = t[0];
    let per =
        |t: f64, calls: u64| (t - base * calls as f64 / n as f64).max(0.0) / calls as f64 * 1e6;
    let (pk, pj, pe) = (per(kprobe, n), per(jump, n), per(exit, m));
    println!(
        "getpid-loop {n} unprobed: {base:.3} s ({:.2} us a call)",
        base / n as f64 * 1e6
    );
    println!("the guest's own kprobe on {f}: {kprobe:.3} s, {pk:.2} us a hit");
    println!("hvprobe jump plan (0 exits): {jump:.3} s, {pj:.2} us a hit");
    println!("hvprobe exit plan (getpid-loop {m}): {exit:.3} s, {pe:.2} us a hit");
    println!(
        "jump / guest kprobe = {:.2}; exit / jump = {:.1}",
        pj / pk.max(1e-9),
        pe / pj.max(1e-9)
    );
}
