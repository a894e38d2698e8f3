//! `--integrity`: the kernel at the end of the run against its state when `/init` started.

use super::*;

pub(super) fn integrity_finds_a_guest_kprobe_in_kernel_text_and_nothing_on_an_untouched_guest() {
    // Untouched: text, rodata, the syscall table and the protection settings as they were.
    let out = run_probed("1", "cat /proc/version", &[], &["--integrity"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let clean = out
        .summary()
        .integrity
        .clone()
        .expect("an integrity report");
    assert!(clean.clean, "{clean:?}\n{}", explain(&out));
    assert_has(
        &text(&out.stdout),
        "hvprobe: integrity: kernel text, read-only data, the syscall table and the protection settings are as when /init started",
        &out,
    );

    // The guest enables one of its own kprobes: the kernel patches its text at the probed
    // function (an int3 or BRK, or ftrace's call), which the report names.
    let t = "/sys/kernel/tracing";
    let exec = format!(
        "echo 'p:hvint vfs_read' > {t}/kprobe_events && \
         echo 1 > {t}/events/kprobes/hvint/enable && cat /proc/version"
    );
    let out = run_probed("1", &exec, &[], &["--integrity"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let report = out
        .summary()
        .integrity
        .clone()
        .expect("an integrity report");
    assert!(!report.clean, "{}", explain(&out));
    let guest = hvprobe_guest::default_guest_for(guest_arch()).unwrap();
    let map =
        SymbolMap::parse(&std::fs::read_to_string(guest.kernel.system_map()).unwrap()).unwrap();
    // The report gives the running kernel's addresses (arm64 guests boot with KASLR).
    let slide = out.summary().kaslr_slide.unwrap_or(0);
    let vfs_read = map.lookup("vfs_read").unwrap().addr.wrapping_add(slide);
    let at = report
        .changed
        .iter()
        .find(|c| c.region == "text" && (c.address..c.address + c.len).contains(&vfs_read))
        .unwrap_or_else(|| panic!("no change at vfs_read: {report:?}"));
    assert!(at.symbol.contains("vfs_read"), "{at:?}");
    assert_has(
        &text(&out.stdout),
        &format!("hvprobe: integrity: text changed at {}", at.symbol),
        &out,
    );
    // Tracing patches only text: read-only data, the syscall table and the protection
    // settings stay as they were.
    assert!(
        report.changed.iter().all(|c| c.region == "text"),
        "{report:?}"
    );
    assert!(report.syscalls_outside_text.is_empty(), "{report:?}");
    assert!(report.control.is_empty(), "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
}
