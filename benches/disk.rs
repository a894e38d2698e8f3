//! What a `--disk` moves (a whole-system run, not a timed test): `blk-bench` in the guest does
//! direct (O_DIRECT) sequential 1 MiB and random 4 KiB writes and reads on a raw scratch image
//! attached with `--disk`, and prints its rates; this prints them in one table. Every request
//! crosses the guest's virtio-blk driver, hvprobe's virtio-mmio transport (a notification is an
//! ioeventfd, a completion an irqfd) and its I/O thread's `pread`/`pwrite` on the image.
//! `cargo bench -p hvprobe-vmm --bench disk` (`HVPROBE_BENCH_MIB=N` MiB each way, default 64;
//! `HVPROBE_BENCH_IOS=N` random I/Os, default 2000; `HVPROBE_TEST_ARCH=aarch64` for arm64).

use std::process::Command;

fn number(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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
    let img = dir.join("scratch.img");
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
        .output()
        .expect("hvprobe runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "hvprobe failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("virtio-blk through hvprobe, {arch} guest ({mib} MiB sequential, {ios} random I/Os):");
    for line in stdout.lines().filter(|l| l.starts_with("blk-bench: ")) {
        let f = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or("?")
                .to_string()
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        println!(
            "  {:<5} {:<4} bs={:<8} {:>8} MB/s {:>8} IOPS",
            words[1],
            words[2],
            f("bs="),
            f("MBps="),
            f("iops=")
        );
    }
}
