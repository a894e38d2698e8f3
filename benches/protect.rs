//! What `--protect` costs (whole-system runs, not a timed test): the guest times its own
//! workloads (CLOCK_MONOTONIC, `ns=`): `fork-exec-loop` (process creation: page tables, task
//! structures, the kernel's data written everywhere) and `write-loop` (a string written to
//! `/proc/sys/kernel/modprobe` again and again), unprotected, then with `--protect text`,
//! `--protect rodata` and `--protect modprobe_path` (a variable in `.data`, whose page's other
//! bytes the kernel writes too). Prints each workload's slowdown, the writes that exited
//! (protected and neighbours) and the cost of one write to protected bytes.
//! `cargo bench -p hvprobe-vmm --bench protect` (`HVPROBE_BENCH_RUNS=N` fork-execs, default
//! 200, writes = 2N; `HVPROBE_TEST_ARCH=aarch64` for the arm64 guest).

use std::process::Command;

/// The string the write loop stores: 31 characters and the NUL, each one store.
const STRING: &str = "/sbin/modprobe-hvprobe-bench-x1";

/// One run's figures.
struct Figures {
    fork_ns: f64,
    write_ns: f64,
    protected: u64,
    neighbours: u64,
    emulated: u64,
}

/// The value of `name=` in `line`.
fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name))
        .and_then(|v| v.parse().ok())
}

fn run(n: u64, protect: &[&str]) -> Figures {
    let arch = match std::env::var("HVPROBE_TEST_ARCH").as_deref() {
        Ok("aarch64") | Ok("arm64") => "aarch64",
        _ => "x86_64",
    };
    let exec = format!(
        "fork-exec-loop {n}; write-loop {} /proc/sys/kernel/modprobe {STRING}",
        2 * n
    );
    let mut args = vec![
        "run",
        "--arch",
        arch,
        "--quiet",
        "--timeout",
        "1200",
        "--exec",
        &exec,
    ];
    for p in protect {
        args.extend(["--protect", p]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .args(&args)
        .output()
        .expect("hvprobe runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hvprobe {args:?} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |prefix: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line\n{stdout}"))
            .to_string()
    };
    let fork = line("fork-exec-loop: ");
    let write = line("write-loop: ");
    let exits = stdout
        .lines()
        .find(|l| l.starts_with("hvprobe: exits: "))
        .unwrap_or("");
    Figures {
        fork_ns: field(&fork, "ns=").expect("fork ns") as f64,
        write_ns: field(&write, "ns=").expect("write ns") as f64,
        protected: field(exits, "protected_writes=").unwrap_or(0),
        neighbours: field(exits, "neighbour_writes=").unwrap_or(0),
        emulated: field(exits, "emulated_stores=").unwrap_or(0),
    }
}

fn main() {
    let n: u64 = std::env::var("HVPROBE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let base = run(n, &[]);
    println!(
        "unprotected: fork-exec-loop {n}: {:.1} us a run; write-loop {}: {:.1} us a write of {} bytes",
        base.fork_ns / n as f64 / 1000.0,
        2 * n,
        base.write_ns / (2 * n) as f64 / 1000.0,
        STRING.len()
    );
    for (name, protect) in [
        ("--protect text", &["text"][..]),
        ("--protect rodata", &["rodata"][..]),
        ("--protect modprobe_path", &["modprobe_path"][..]),
    ] {
        let f = run(n, protect);
        println!(
            "{name}: fork-exec-loop {:.2}x, write-loop {:.2}x; exits: protected_writes={} neighbour_writes={} emulated_stores={}",
            f.fork_ns / base.fork_ns,
            f.write_ns / base.write_ns,
            f.protected,
            f.neighbours,
            f.emulated
        );
        if f.protected > 0 {
            let per_write = (f.write_ns - base.write_ns) / f.protected as f64 / 1000.0;
            println!(
                "  one write to protected bytes: {per_write:.1} us (write-loop's added time / protected writes)"
            );
        }
    }
}
