//! What a `--disk` moves (a whole-system run, not a timed test): `blk-bench` in the guest does
//! direct (O_DIRECT) sequential 1 MiB and random 4 KiB writes and reads on a raw scratch image
//! attached with `--disk`, and prints its rates; this prints them in one table. Every request
//! crosses the guest's virtio-blk driver, hvprobe's virtio-mmio transport (a notification is an
//! ioeventfd, a completion an irqfd) and its I/O thread's `pread`/`pwrite` on the image.
//! The same runs again with QEMU as the VMM in hvprobe's place (`--l2-qemu`: the same L1,
//! guest, image and virtio-mmio transport; QEMU's `microvm` machine on x86_64, `virt` on arm64,
//! and its virtio-blk), and the table gets hvprobe's rate as a fraction of QEMU's.
//! `cargo bench -p hvprobe-vmm --bench disk` (`HVPROBE_BENCH_MIB=N` MiB each way, default 64;
//! `HVPROBE_BENCH_IOS=N` random I/Os, default 2000; `HVPROBE_TEST_ARCH=aarch64` for arm64).

use std::path::Path;
use std::process::Command;

fn number(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One `blk-bench` line: operation, pattern, block size, MB/s, IOPS.
struct Rate {
    op: String,
    pattern: String,
    bs: String,
    mbps: f64,
    iops: f64,
}

/// Runs the four `blk-bench` passes on a fresh sparse image with `extra` arguments.
fn measure(arch: &str, dir: &Path, mib: u64, ios: u64, extra: &[&str]) -> Vec<Rate> {
    let img = dir.join("scratch.img");
    let _ = std::fs::remove_file(&img);
    // Sparse: the first writes allocate, as on a fresh image.
    std::fs::File::create(&img)
        .unwrap()
        .set_len((mib + 64) << 20)
        .unwrap();
    let exec = format!(
        "blk-bench /dev/vda write seq 1048576 {mib}; blk-bench /dev/vda read seq 1048576 {mib}; \
         blk-bench /dev/vda write rand 4096 {ios}; blk-bench /dev/vda read rand 4096 {ios}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .args(["run", "--arch", arch, "--timeout", "1200", "--disk"])
        .arg(&img)
        .args(["--exec", &exec])
        .args(extra)
        .output()
        .expect("hvprobe runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hvprobe {extra:?} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| l.starts_with("blk-bench: "))
        .map(|line| {
            let f = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or("?")
                    .to_string()
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            Rate {
                op: words[1].to_string(),
                pattern: words[2].to_string(),
                bs: f("bs="),
                mbps: f("MBps=").parse().unwrap_or(f64::NAN),
                iops: f("iops=").parse().unwrap_or(f64::NAN),
            }
        })
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; a filter or `--list` from other harnesses is not ours.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let arch = match std::env::var("HVPROBE_TEST_ARCH").as_deref() {
        Ok("aarch64") | Ok("arm64") => "aarch64",
        _ => "x86_64",
    };
    let (mib, ios) = (
        number("HVPROBE_BENCH_MIB", 64),
        number("HVPROBE_BENCH_IOS", 2000),
    );
    let dir = std::env::temp_dir().join(format!("hvprobe-disk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ours = measure(arch, &dir, mib, ios, &[]);
    let qemu = Some(measure(arch, &dir, mib, ios, &["--l2-qemu"]));
    let _ = std::fs::remove_dir_all(&dir);
    println!("virtio-blk through hvprobe, {arch} guest ({mib} MiB sequential, {ios} random I/Os):");
    for (i, r) in ours.iter().enumerate() {
        let against = qemu
            .as_ref()
            .and_then(|q| q.get(i))
            .map(|q| {
                format!(
                    "   QEMU {:>8.1} MB/s {:>8.0} IOPS   hvprobe/QEMU {:.2}x",
                    q.mbps,
                    q.iops,
                    r.iops / q.iops
                )
            })
            .unwrap_or_default();
        println!(
            "  {:<5} {:<4} bs={:<8} {:>8.1} MB/s {:>8.0} IOPS{against}",
            r.op, r.pattern, r.bs, r.mbps, r.iops
        );
    }
}
