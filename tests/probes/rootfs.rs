//! `--rootfs`: Debian 12 booted from a disk with systemd as init, probed from the first
//! process systemd starts to the command the autorun unit runs; the image a run is given
//! keeps the guest's writes, the cached one never changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// The cached Debian root file system of the guests under test (`hvprobe guest rootfs`,
/// built on first use).
fn rootfs_image() -> PathBuf {
    let out = hvprobe(&["guest", "rootfs", "--arch", guest_arch().name()]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("rootfs "))
        .unwrap_or_else(|| panic!("no `rootfs PATH` line\n{}", explain(&out)));
    PathBuf::from(line)
}

/// The JSON events of a run's `-o` file.
fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `child=` argument of a `kernel_clone` return event (`$retval:s64`: a JSON number).
fn child(e: &serde_json::Value) -> Option<i64> {
    e["args"]["child"].as_i64()
}

/// FNV-1a of the whole image, holes included.
fn image_digest(img: &Path) -> u64 {
    fnv1a(&std::fs::read(img).unwrap())
}

pub(super) fn the_debian_rootfs_boots_systemd_and_its_units_are_probed_from_boot_to_the_command() {
    let cached = rootfs_image();
    let before = image_digest(&cached);
    let dir = work_dir("rootfs-boot");
    // A file of known size from a share mounted inside the root: 18 reads by open-read-loop
    // (16 full 4 KiB reads, a short one, end of file).
    let share = dir.join("files");
    std::fs::create_dir_all(&share).unwrap();
    let data: Vec<u8> = (0..16 * 4096 + 100).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(share.join("data"), &data).unwrap();
    let trace = dir.join("events.json");
    let out = run_probed(
        "1",
        "echo debian=$(cat /etc/debian_version); echo init=$(cat /proc/1/comm); \
         echo state=$(systemctl is-system-running); open-read-loop 1 /mnt/files/data; \
         echo autorun-pid=$PPID; exit 7",
        &[
            "p:hv/open do_sys_openat2",
            "r:hv/clone kernel_clone child=$retval:s64",
            "p:hv/rd vfs_read",
        ],
        &[
            "--rootfs",
            "--share",
            share.to_str().unwrap(),
            "--json",
            "-o",
            trace.to_str().unwrap(),
            "--timings",
        ],
    );
    // The autorun unit relays the command's status.
    assert_eq!(out.status.code(), Some(7), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert!(
        stdout.lines().any(|l| l
            .strip_prefix("debian=")
            .is_some_and(|v| v.starts_with("12."))),
        "{}",
        explain(&out)
    );
    assert_has(&stdout, "init=systemd\n", &out);
    assert_has(&stdout, "state=running\n", &out);
    assert_has(
        &stdout,
        &format!(
            "open-read-loop: path=/mnt/files/data opens=1 bytes={} fnv1a={:016x}",
            data.len(),
            fnv1a(&data)
        ),
        &out,
    );
    assert_has(
        &text(&out.stderr),
        "/init to the autorun unit (systemd)",
        &out,
    );
    let autorun_pid: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("autorun-pid="))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no autorun-pid line\n{}", explain(&out)));

    let events = events(&trace);
    let of = |event: &'static str| events.iter().filter(move |e| e["event"] == event);
    // Boot-time opens by systemd itself and by the units it starts (journald, udevd).
    let opened_by: BTreeMap<String, u64> = of("hv/open").fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e["comm"].as_str().unwrap().to_string())
            .or_default() += 1;
        m
    });
    for comm in ["systemd", "systemd-journal", "systemd-udevd"] {
        assert!(
            opened_by.contains_key(comm),
            "no open by {comm}: {opened_by:?}"
        );
    }
    assert!(
        of("hv/open").any(|e| e["comm"] == "systemd" && e["pid"] == 1),
        "no open by PID 1"
    );
    // The autorun script's shell was forked by systemd: a kernel_clone return in PID 1 gave
    // its PID, and the shell's own opens carry its name.
    assert!(
        of("hv/clone").any(|e| e["pid"] == 1 && child(e) == Some(autorun_pid as i64)),
        "no kernel_clone return in PID 1 with the autorun's PID {autorun_pid}: {:?}",
        of("hv/clone")
            .filter(|e| e["pid"] == 1)
            .filter_map(child)
            .collect::<Vec<_>>()
    );
    assert!(
        of("hv/open").any(|e| e["pid"] == autorun_pid && e["comm"] == "hvprobe-autorun"),
        "no open by the autorun's shell"
    );
    let reads = of("hv/rd")
        .filter(|e| e["comm"] == "open-read-loop")
        .count();
    assert_eq!(reads, 18, "{}", explain(&out));
    assert_text_restored(&out);
    assert!(out.summary().faults_with_probes.is_empty());
    // The run used a copy: the cached image is as it was.
    assert_eq!(image_digest(&cached), before, "the cached image changed");
    std::fs::remove_dir_all(&dir).unwrap();
}

pub(super) fn a_given_root_image_keeps_the_guests_synced_writes_and_bad_roots_are_refused() {
    let cached = rootfs_image();
    let dir = work_dir("rootfs-given");
    let img = dir.join("root.img");
    let cp = Command::new("cp")
        .arg("--sparse=always")
        .arg(&cached)
        .arg(&img)
        .output()
        .unwrap();
    assert!(cp.status.success());
    let out = run_probed(
        "1",
        "echo kept-by-the-image > /root/note; sync; cat /root/note",
        &[],
        &["--rootfs", img.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_has(&text(&out.stdout), "kept-by-the-image", &out);
    let dumped = dir.join("note");
    let dbg = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /root/note {}", dumped.display()))
        .arg(&img)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert!(dbg.status.success(), "{}", text(&dbg.stderr));
    assert_eq!(
        std::fs::read(&dumped).unwrap_or_default(),
        b"kept-by-the-image\n"
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .unwrap();
    assert!(fsck.status.success(), "{}", text(&fsck.stdout));

    // Refused before any VM starts, by name.
    for (args, says) in [
        (
            vec!["--rootfs", "/nonexistent/root.img"],
            "--rootfs /nonexistent/root.img: no such image file".to_string(),
        ),
        (
            vec![
                "--rootfs",
                img.to_str().unwrap(),
                "--disk",
                &format!("{},at=/", img.display()),
            ],
            "only one root file system".to_string(),
        ),
    ] {
        let mut full = vec!["run", "--exec", "true"];
        full.extend(args);
        let out = hvprobe(&full);
        assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
        assert_has(&text(&out.stderr), &says, &out);
        assert!(
            !text(&out.stdout).contains("HVPROBE-INIT-READY"),
            "a guest booted"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
