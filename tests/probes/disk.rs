//! `--disk`: a raw ext4 image made on the host with the standard tools, the guest's
//! `/dev/vda` (virtio-blk on virtio-mmio, found by the stock kernel through ACPI or the FDT),
//! mounted on `/mnt` by the default guest: what the guest reads is the image's bytes, what it
//! writes and syncs is in the image afterwards, a read-only disk never changes, and a probe
//! on `vfs_read` counts the reads of a file on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// `len` bytes that are not all alike (splitmix64 from `seed`).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An ext4 image of `mib` MiB holding `files`, made by `mke2fs -d` as a user would.
fn ext4_image(dir: &Path, files: &[(&str, &[u8])], mib: u32) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    for (name, bytes) in files {
        std::fs::write(root.join(name), bytes).unwrap();
    }
    let img = dir.join("disk.img");
    let out = Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(&root)
        .arg(&img)
        .arg(format!("{mib}M"))
        .output()
        .expect("mke2fs (e2fsprogs)");
    assert!(out.status.success(), "{}", text(&out.stderr));
    img
}

/// `path`'s bytes in the ext4 image `img`, read on the host with debugfs.
fn file_in_image(img: &Path, path: &str, dir: &Path) -> Vec<u8> {
    let dumped = dir.join("dumped");
    let _ = std::fs::remove_file(&dumped);
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump {path} {}", dumped.display()))
        .arg(img)
        .output()
        .expect("debugfs (e2fsprogs)");
    std::fs::read(&dumped)
        .unwrap_or_else(|e| panic!("debugfs could not dump {path}: {e}: {}", text(&out.stderr)))
}

/// The `fnv1a=` of an `open-read-loop` line about `path`.
fn guest_fnv(stdout: &str, path: &str) -> Option<String> {
    stdout
        .lines()
        .find(|l| l.contains(&format!("path={path} ")))
        .and_then(|l| l.split("fnv1a=").nth(1))
        .map(str::to_string)
}

pub(super) fn a_file_on_the_disk_reads_back_counted_by_vfs_read_and_a_synced_write_reaches_the_image()
 {
    let dir = work_dir("disk-rw");
    // 16 full 4 KiB reads, a short one and the read at the end: 18 reads of `data`.
    let data = pattern(25, 16 * 4096 + 100);
    let img = ext4_image(&dir, &[("data", &data)], 32);
    let events = dir.join("events.json");
    let out = run_probed(
        "1",
        "open-read-loop 1 /mnt/data; \
         dd if=/dev/urandom of=/mnt/new bs=4096 count=64 conv=fsync 2>/dev/null; \
         open-read-loop 1 /mnt/new; echo size=$(cat /sys/block/vda/size); \
         echo serial=$(cat /sys/block/vda/serial)",
        &["p:hv/rd vfs_read"],
        &[
            "--disk",
            img.to_str().unwrap(),
            "--json",
            "-o",
            events.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(
        &stdout,
        &format!(
            "open-read-loop: path=/mnt/data opens=1 bytes={} fnv1a={:016x}",
            data.len(),
            fnv1a(&data)
        ),
        &out,
    );
    assert_has(&stdout, "size=65536\n", &out);
    assert!(
        stdout.lines().any(|l| l
            .strip_prefix("serial=")
            .is_some_and(|s| s.starts_with("hv"))),
        "{}",
        explain(&out)
    );
    // The reads each open-read-loop made, per process: 18 of data, 65 of the new file.
    let trace = std::fs::read_to_string(&events).unwrap_or_default();
    let mut per_pid: BTreeMap<u64, u64> = BTreeMap::new();
    for line in trace.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["comm"] == "open-read-loop" {
            *per_pid.entry(v["pid"].as_u64().unwrap()).or_default() += 1;
        }
    }
    let mut counts: Vec<u64> = per_pid.into_values().collect();
    counts.sort();
    assert_eq!(counts, vec![18, 65], "{}", explain(&out));
    // The written file, read on the host from the image.
    let new = file_in_image(&img, "/new", &dir);
    assert_eq!(new.len(), 64 * 4096);
    assert_eq!(
        guest_fnv(&stdout, "/mnt/new"),
        Some(format!("{:016x}", fnv1a(&new))),
        "{}",
        explain(&out)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "{}", text(&fsck.stdout));
    assert_text_restored(&out);
    std::fs::remove_dir_all(&dir).unwrap();
}

pub(super) fn a_read_only_disk_fails_the_guests_writes_and_its_image_never_changes() {
    let dir = work_dir("disk-ro");
    let data = pattern(7, 10_000);
    let img = ext4_image(&dir, &[("data", &data)], 8);
    let before = std::fs::read(&img).unwrap();
    let out = run_probed(
        "1",
        "open-read-loop 1 /mnt/data; echo x > /mnt/w || echo file-write-failed; \
         dd if=/dev/zero of=/dev/vda bs=512 count=1 2>/dev/null || echo raw-write-failed; \
         echo ro=$(cat /sys/block/vda/ro)",
        &[],
        &["--disk", &format!("{},ro", img.display())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(
        &stdout,
        &format!("bytes=10000 fnv1a={:016x}", fnv1a(&data)),
        &out,
    );
    for says in ["file-write-failed", "raw-write-failed", "ro=1"] {
        assert_has(&stdout, says, &out);
    }
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
    std::fs::remove_dir_all(&dir).unwrap();
}

pub(super) fn a_program_built_on_the_host_runs_from_a_share_beside_a_second_disk() {
    let dir = work_dir("disk-share");
    // A CI job's own program: built here with the guest's C compiler, run in the guest.
    let build = dir.join("build");
    std::fs::create_dir_all(build.join("bin")).unwrap();
    let src = dir.join("t.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n#include <stdlib.h>\nint main(int c, char **v) { long s = 0; \
         for (int i = 1; i < c; i++) s += strtol(v[i], 0, 0) * i; \
         printf(\"host-built: args=%d weighted=%ld\\n\", c - 1, s); return 3; }\n",
    )
    .unwrap();
    let cc = Command::new(guest_arch().c_compiler())
        .args(["-static", "-O2", "-o"])
        .arg(build.join("bin/run-tests"))
        .arg(&src)
        .output()
        .expect("the guest's C compiler");
    assert!(cc.status.success(), "{}", text(&cc.stderr));
    let notes = pattern(3, 5000);
    std::fs::write(build.join("notes"), &notes).unwrap();
    // The first disk at /mnt, a second at /data, the share where it is asked to be.
    let first = ext4_image(&dir.join("a"), &[("a", b"first\n")], 8);
    let second = ext4_image(&dir.join("b"), &[("b", b"second\n")], 8);
    let out = run_probed(
        "1",
        "cat /mnt/a /data/b; open-read-loop 1 /opt/build/notes; \
         /opt/build/bin/run-tests 5 6 7; echo status=$?; \
         touch /opt/build/x 2>/dev/null || echo share-is-read-only; \
         ls /mnt/build 2>/dev/null; mount | grep -c ' /opt/build '",
        &[],
        &[
            "--disk",
            first.to_str().unwrap(),
            "--disk",
            &format!("{},at=/data", second.display()),
            "--share",
            &format!("{}:/opt/build", build.display()),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    for says in [
        "first\nsecond\n",
        "host-built: args=3 weighted=38\n",
        "status=3\n",
        "share-is-read-only\n",
    ] {
        assert_has(&stdout, says, &out);
    }
    assert_has(
        &stdout,
        &format!("bytes=5000 fnv1a={:016x}", fnv1a(&notes)),
        &out,
    );
    assert!(
        !stdout.contains("hvprobe-init:"),
        "a disk was not mounted: {}",
        explain(&out)
    );
    // The packed image is gone with the run.
    let leftovers = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("hvprobe-shares-")
        })
        .count();
    assert_eq!(leftovers, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

pub(super) fn disks_that_cannot_be_used_are_refused_by_name_before_any_vm_starts() {
    let dir = work_dir("disk-bad");
    let odd = dir.join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let locked = dir.join("locked.img");
    std::fs::write(&locked, vec![0u8; 4096]).unwrap();
    // Another process's lock: this one holds it for the run below.
    let holder = std::fs::File::open(&locked).unwrap();
    holder.lock().unwrap();
    let missing = dir.join("missing.img");
    for (disk, says) in [
        (missing.display().to_string(), "No such file"),
        (odd.display().to_string(), "is 1000 bytes"),
        (format!("{},bogus", odd.display()), "unknown option `bogus`"),
        (format!("{},ro", dir.display()), "not a regular file"),
        (locked.display().to_string(), "in use by another process"),
        (
            format!("{},ro", locked.display()),
            "in use by another process",
        ),
    ] {
        let out = hvprobe(&["run", "--disk", &disk, "--exec", "true", "--timeout", "60"]);
        check_refused(&out, &disk, says);
    }
    let nine: Vec<String> = (0..9).map(|_| odd.display().to_string()).collect();
    let mut args = vec!["run", "--exec", "true"];
    for d in &nine {
        args.extend(["--disk", d.as_str()]);
    }
    check_refused(&hvprobe(&args), "9 disks", "at most 8");
    let missing_dir = dir.join("no-such-dir");
    let shown = missing_dir.display().to_string();
    let out = hvprobe(&["run", "--share", &shown, "--exec", "true"]);
    check_refused(&out, &shown, "no such directory");
    drop(holder);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A refusal of `what` before any guest ran, saying `says`.
fn check_refused(out: &std::process::Output, what: &str, says: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {}", explain(out));
    assert_has(&stderr, says, out);
    let named = what.trim_end_matches(",ro").trim_end_matches(",bogus");
    assert_has(&stderr, named, out);
    assert!(
        !text(&out.stdout).contains(hvprobe_guest::INIT_READY_MARKER),
        "{what}: a guest ran"
    );
}

pub(super) fn a_run_killed_mid_write_leaves_an_image_e2fsck_repairs_with_every_synced_file() {
    use std::io::{BufRead, BufReader};
    let dir = work_dir("disk-kill");
    let img = ext4_image(&dir, &[("old", b"there before\n")], 64);
    let mut child = Command::new(common::HVPROBE)
        .args(["run", "--arch", guest_arch().name(), "--timeout", "400"])
        .args(["--disk", img.to_str().unwrap()])
        .arg("--exec")
        .arg(
            "for i in 1 2 3; do dd if=/dev/urandom of=/mnt/f$i bs=4096 count=16 conv=fsync \
             2>/dev/null; done; open-read-loop 1 /mnt/f1 /mnt/f2 /mnt/f3; echo SYNCED; \
             while true; do dd if=/dev/urandom of=/mnt/junk bs=65536 count=32 2>/dev/null; \
             rm /mnt/junk; done",
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("hvprobe starts");
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap_or_default();
        let done = line.trim() == "SYNCED";
        lines.push(line);
        if done {
            break;
        }
    }
    assert!(
        lines.last().is_some_and(|l| l.trim() == "SYNCED"),
        "the guest never synced: {lines:?}"
    );
    // Let the unsynced writes run a while, then kill hvprobe outright.
    std::thread::sleep(std::time::Duration::from_secs(3));
    child.kill().unwrap();
    child.wait().unwrap();
    // Nothing writes the image any more (the runner's emulator died with hvprobe).
    let settled = std::fs::read(&img).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        std::fs::read(&img).unwrap() == settled,
        "the image still changes"
    );
    let fsck = Command::new("e2fsck")
        .arg("-fy")
        .arg(&img)
        .output()
        .unwrap();
    // 0: clean, 1: errors corrected; anything more is a file system e2fsck could not mend.
    assert!(
        matches!(fsck.status.code(), Some(0) | Some(1)),
        "{}",
        text(&fsck.stdout)
    );
    let stdout = lines.join("\n");
    for f in ["f1", "f2", "f3"] {
        let bytes = file_in_image(&img, &format!("/{f}"), &dir);
        assert_eq!(bytes.len(), 16 * 4096, "{f}");
        assert_eq!(
            guest_fnv(&stdout, &format!("/mnt/{f}")),
            Some(format!("{:016x}", fnv1a(&bytes))),
            "{f}: {stdout}"
        );
    }
    assert_eq!(file_in_image(&img, "/old", &dir), b"there before\n");
    std::fs::remove_dir_all(&dir).unwrap();
}
