//! Data watchpoints: a write to a kernel variable reported with its writer, task and values,
//! and watchpoints the hardware cannot take refused before anything changes.

use super::*;
use hvprobe_vmm::refusal::RefusalStage;

/// The first eight bytes of `/sbin/modprobe`, the default `modprobe_path`, as a little-endian
/// number: what the watchpoint sees before the first write.
const SBIN_MO: u64 = u64::from_le_bytes(*b"/sbin/mo");

/// A hit line's `old=` and `new=` values.
fn old_new(line: &str) -> (u64, u64) {
    let field = |name: &str| {
        let v = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line}"));
        u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
    };
    (field("old="), field("new="))
}

pub(super) fn a_write_watchpoint_reports_the_sysctl_write_of_modprobe_path_by_sh() {
    let out = run_probed(
        "1",
        "echo /tmp/x > /proc/sys/kernel/modprobe; cat /proc/sys/kernel/modprobe; cat /proc/sys/kernel/core_pattern",
        &["w:hv/mp modprobe_path:8:w", "w:hv/cp core_pattern:8:rw"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    // The guest's own view is unchanged by the watch.
    assert!(
        stdout.lines().any(|l| l.trim_end() == "/tmp/x"),
        "{}",
        explain(&out)
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains(" hv/mp: ")).collect();
    let p = out.probe("modprobe_path");
    assert_eq!(p.plan.name(), "watch");
    assert_eq!(p.hits, lines.len() as u64, "one line per hit");
    // The sysctl handler copies the string byte by byte: one write per byte and the NUL.
    assert_eq!(lines.len(), "/tmp/x".len() + 1, "{}", explain(&out));
    let mut before = SBIN_MO;
    for l in &lines {
        // The shell's builtin echo writes, through the sysctl string handler.
        assert!(l.starts_with("sh-"), "{l}");
        assert!(l.contains(": (proc_dostring+0x"), "writer named: {l}");
        assert!(l.contains(" addr=modprobe_path "), "{l}");
        let (old, new) = old_new(l);
        assert_eq!(
            old, before,
            "each write starts from the last one's value: {l}"
        );
        before = new;
    }
    // The last write is the NUL after "/tmp/x": the bytes read "/tmp/x\0" and the old tail.
    assert_eq!(&before.to_le_bytes()[..7], b"/tmp/x\0", "{}", explain(&out));
    assert!(
        lines.last().unwrap().contains(r#"bytes="/tmp/x\x00o""#),
        "{}",
        explain(&out)
    );
    // A read watch: cat's read of core_pattern is reported, the value unchanged.
    let reads: Vec<&str> = stdout.lines().filter(|l| l.contains(" hv/cp: ")).collect();
    assert!(!reads.is_empty(), "{}", explain(&out));
    assert!(
        reads
            .iter()
            .any(|l| l.starts_with("cat-") && l.contains(" addr=core_pattern ")),
        "{}",
        explain(&out)
    );
    for l in &reads {
        let (old, new) = old_new(l);
        assert_eq!(old, new, "a read changes nothing: {l}");
    }
    assert_eq!(out.probe("core_pattern").hits, reads.len() as u64);
    // One exit an access on x86_64 (a trap after it); two on arm64 (the watchpoint before
    // the access, and the step over it).
    let hits = (lines.len() + reads.len()) as u64;
    let exits = &out.summary().exits;
    assert_eq!(exits.hw_breakpoints, hits);
    let steps = match guest_arch() {
        GuestArch::X86_64 => 0,
        GuestArch::Aarch64 => hits,
    };
    assert_eq!(exits.watch_steps, steps, "{}", explain(&out));
    assert_text_restored(&out);
}

pub(super) fn watchpoints_the_hardware_cannot_take_are_refused_and_nothing_changes() {
    // A length no debug register has, or a read-only watch: refused as written, before boot.
    for (bad, says) in [
        ("w:hv/a modprobe_path:3:w", "1, 2, 4 or 8 bytes"),
        ("w:hv/a modprobe_path:8:r", "reads alone"),
        (
            "w:hv/a no_such_variable_hvprobe:8:w",
            "no_such_variable_hvprobe",
        ),
    ] {
        let out = run_probed("1", "true", &[bad], &[]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", explain(&out));
        out.assert_refused(bad, RefusalStage::Resolution, says);
        assert!(!text(&out.stdout).contains(hvprobe_guest::INIT_READY_MARKER));
    }
    // Not aligned to its length: refused at planting, with the good watch taken back.
    let out = run_probed(
        "1",
        "echo SHOULD-NOT-RUN",
        &["w:hv/ok modprobe_path:8:w", "w:hv/bad modprobe_path+4:8:w"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    out.assert_refused("modprobe_path+0x4", RefusalStage::Planting, "not aligned");
    assert!(
        !text(&out.stdout).contains("SHOULD-NOT-RUN\n"),
        "{}",
        explain(&out)
    );
    assert_text_restored(&out);

    // More watchpoints than the vCPUs have registers (x86: four, shared with hardware
    // breakpoints; arm64: KVM_CAP_GUEST_DEBUG_HW_WPS, at most 16): the rest refused by name.
    let watches: Vec<String> = (0..17)
        .map(|n| format!("w:hv/w{n} modprobe_path+{:#x}:8:w", n * 8))
        .collect();
    let refs: Vec<&str> = watches.iter().map(String::as_str).collect();
    let out = run_probed("1", "echo SHOULD-NOT-RUN", &refs, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    let refused = out.summary().refused.len();
    let fit = match guest_arch() {
        GuestArch::X86_64 => 4,
        GuestArch::Aarch64 => 17 - refused,
    };
    assert!((1..=16).contains(&fit), "{}", explain(&out));
    assert_eq!(refused, 17 - fit, "{}", explain(&out));
    let says = match guest_arch() {
        GuestArch::X86_64 => "all 4 hardware breakpoints are in use",
        GuestArch::Aarch64 => "hardware watchpoints are in use",
    };
    out.assert_refused("modprobe_path+0x80", RefusalStage::Planting, says);
    assert!(
        !text(&out.stdout).contains("SHOULD-NOT-RUN\n"),
        "{}",
        explain(&out)
    );
    assert_text_restored(&out);
}
