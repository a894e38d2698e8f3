//! Bad probes and refused instructions: named, and nothing left in the guest.

use super::*;
use hvprobe_vmm::refusal::RefusalStage;
use hvprobe_vmm::summary::OutcomeKind;

pub(super) fn bad_probes_are_refused_and_leave_the_guest_unchanged() {
    // Unknown symbol: refused before any VM starts.
    let out = run_probed("1", "true", &["no_such_function_hvprobe"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    out.assert_refused(
        "no_such_function_hvprobe",
        RefusalStage::Resolution,
        "no_such_function_hvprobe",
    );
    assert_eq!(out.summary().outcome.kind, OutcomeKind::ProbeRefused);
    assert!(!text(&out.stdout).contains(hvprobe_guest::INIT_READY_MARKER));

    let k = KernelText::load();
    // An offset inside a multi-byte instruction, after a good probe that must be taken back.
    let (off, insn) = k
        .function("__x64_sys_getpid")
        .into_iter()
        .skip(1)
        .find(|(_, i)| i.len() > 1)
        .unwrap();
    let inside = format!("__x64_sys_getpid+{:#x}", off + 1);
    let out = run_probed(
        "1",
        "echo SHOULD-NOT-RUN",
        &["__x64_sys_getpid", &inside],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    out.assert_refused(
        &inside,
        RefusalStage::Planting,
        "not on an instruction boundary",
    );
    out.assert_refused(&inside, RefusalStage::Planting, &insn.text);
    assert_eq!(out.summary().refused.len(), 1, "{}", explain(&out));
    // What the user reads says that nothing stayed behind (the summary's restored text hash
    // below is the proof).
    assert_has(&text(&out.stderr), "no probe was left in the guest", &out);
    assert!(
        !text(&out.stdout).contains("SHOULD-NOT-RUN\n"),
        "{}",
        explain(&out)
    );
    assert_text_restored(&out);

    // An instruction that cannot be stepped: sysretq on the syscall return path.
    let sysret = k.find("syscall_return_via_sysret", |i| {
        i.text.starts_with("sysret")
    });
    let out = run_probed("1", "true", &[&sysret], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    out.assert_refused(
        &sysret,
        RefusalStage::Planting,
        "refusing to probe `sysretq`",
    );
    assert_text_restored(&out);
}

pub(super) fn every_refused_probe_is_named_in_one_pass_and_skip_refused_plants_the_rest() {
    let k = KernelText::load();
    let (off, insn) = k
        .function("__x64_sys_getpid")
        .into_iter()
        .skip(1)
        .find(|(_, i)| i.len() > 1)
        .unwrap();
    let inside = format!("__x64_sys_getpid+{:#x}", off + 1);
    let sysret = k.find("syscall_return_via_sysret", |i| {
        i.text.starts_with("sysret")
    });
    // A probe file takes every form -p takes: a bare location, an address, a definition.
    let file = std::env::temp_dir().join(format!("hvprobe-probes-{}", std::process::id()));
    let write = |lines: &[&str]| std::fs::write(&file, lines.join("\n")).unwrap();
    let f = file.to_str().unwrap();

    // Refusals found before boot (unknown symbols, bad syntax): all of them, no VM.
    write(&[
        "# mixed forms",
        "__x64_sys_getpid",
        "p:hv/open do_sys_openat2",
        "no_such_function_hvprobe_a",
        "no_such_function_hvprobe_b+0x4",
        "p:hv/bad do_sys_openat2 x=%nosuchreg",
    ]);
    let out = run_probed("1", "true", &[], &["-f", f]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    let resolution = RefusalStage::Resolution;
    out.assert_refused(
        "no_such_function_hvprobe_a",
        resolution,
        "no_such_function_hvprobe_a",
    );
    out.assert_refused(
        "no_such_function_hvprobe_b+0x4",
        resolution,
        "no_such_function_hvprobe_b",
    );
    out.assert_refused(
        "p:hv/bad do_sys_openat2 x=%nosuchreg",
        resolution,
        "%nosuchreg",
    );
    assert_eq!(out.summary().refused.len(), 3, "{}", explain(&out));
    assert!(!text(&out.stdout).contains(hvprobe_guest::INIT_READY_MARKER));

    // Refusals found at planting (instruction checks): all of them, nothing left planted.
    write(&["__x64_sys_getpid", &inside, &sysret]);
    let out = run_probed("1", "echo SHOULD-NOT-RUN", &[], &["-f", f]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    let planting = RefusalStage::Planting;
    out.assert_refused(&inside, planting, "not on an instruction boundary");
    out.assert_refused(&inside, planting, &insn.text);
    out.assert_refused(&sysret, planting, "refusing to probe `sysretq`");
    assert_eq!(out.summary().refused.len(), 2, "{}", explain(&out));
    assert!(out.summary().probes.is_empty(), "nothing stays planted");
    assert!(!text(&out.stdout).contains("SHOULD-NOT-RUN\n"));
    assert_text_restored(&out);

    // --skip-refused: the rest is planted and counts; the skipped ones are listed; the exit
    // status is the command's.
    write(&[
        "__x64_sys_getpid",
        "no_such_function_hvprobe_a",
        &inside,
        &sysret,
    ]);
    let out = run_probed(
        "1",
        "getpid-loop 50",
        &[],
        &["-f", f, "--skip-refused", "--quiet"],
    );
    std::fs::remove_file(&file).ok();
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_eq!(out.summary().refused.len(), 3, "{}", explain(&out));
    out.assert_refused(
        "no_such_function_hvprobe_a",
        resolution,
        "no_such_function_hvprobe_a",
    );
    out.assert_refused(&inside, planting, "not on an instruction boundary");
    out.assert_refused(&sysret, planting, "refusing to probe `sysretq`");
    // Each skipped probe is also named where the user looks while the run goes on.
    let skipped = text(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("hvprobe: skipped refused probe: "))
        .count();
    assert_eq!(skipped, 3, "{}", explain(&out));
    let (_, hits, _, _) = summary(&out, "__x64_sys_getpid");
    assert!((50..50 + OTHER_GETPID_CALLERS).contains(&hits), "{hits}");
    assert_text_restored(&out);
}

pub(super) fn an_instruction_with_an_exception_table_entry_is_refused_by_name() {
    // copy_user_enhanced_fast_string's `rep movsb` faults on bad user pointers and is fixed up
    // through __ex_table; a copy of it in a slot would oops the guest instead.
    let k = KernelText::load();
    let rep = k.find("copy_user_enhanced_fast_string", |i| {
        i.text.starts_with("rep movsb")
    });
    let out = run_probed("1", "echo SHOULD-NOT-RUN", &["__x64_sys_getpid", &rep], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    out.assert_refused(&rep, RefusalStage::Planting, "exception table (__ex_table)");
    assert!(
        !text(&out.stdout).contains("SHOULD-NOT-RUN\n"),
        "{}",
        explain(&out)
    );
    assert_text_restored(&out);
}

pub(super) fn arm64_refusals_name_the_instruction_and_plant_nothing() {
    let k = Arm64Text::load();
    let good = k.find("__arm64_sys_getpid", "xol");
    // cpu_do_idle waits (`wfi`): refused.
    let refused = k.find("cpu_do_idle", "refused");
    let out = run_probed(
        "1",
        "echo SHOULD-NOT-RUN",
        &[&good, &refused, "__arm64_sys_getpid+0x2"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    let planting = RefusalStage::Planting;
    out.assert_refused(&refused, planting, "refusing to probe `wfi`");
    out.assert_refused(&refused, planting, "it is a hint that waits");
    out.assert_refused(
        "__arm64_sys_getpid+0x2",
        planting,
        "not on an instruction boundary",
    );
    assert_eq!(out.summary().refused.len(), 2, "{}", explain(&out));
    assert!(out.summary().probes.is_empty(), "nothing stays planted");
    assert!(!text(&out.stdout).contains("SHOULD-NOT-RUN\n"));
    out.assert_text_restored();
}

pub(super) fn arm64_text_that_runs_at_another_address_is_refused_by_name_and_cpu1_comes_back() {
    // secondary_startup is in .idmap.text: a CPU coming online runs it from the identity map,
    // at its physical address, where a BRK would trap with the MMU half switched. Refused at
    // resolution (with --skip-refused, listed), while the other probe is planted; CPU1 goes
    // offline and online again.
    let getpid = sys("getpid");
    let out = run_probed(
        "2",
        "echo 0 > /sys/devices/system/cpu/cpu1/online && \
         echo 1 > /sys/devices/system/cpu/cpu1/online && \
         echo online=$(cat /sys/devices/system/cpu/online) && getpid-loop 10",
        &["secondary_startup", &getpid],
        &["--skip-refused"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_has(&text(&out.stdout), "online=0-1\n", &out);
    out.assert_refused("secondary_startup", RefusalStage::Resolution, ".idmap.text");
    assert!(out.probe(&getpid).hits >= 10, "{}", explain(&out));
    out.assert_text_restored();
}

pub(super) fn a_guest_kernel_fault_report_while_probes_are_in_fails_the_run_and_names_the_probes() {
    // A WARN-level report reaches the guest console through printk (here written by the
    // workload through /dev/kmsg, at KERN_WARNING, the level of a real WARN()): the command
    // still exits 0, but hvprobe must not pass the run as clean.
    let out = run_probed(
        "1",
        "getpid-loop 10; echo '<4>WARNING: CPU: 0 PID: 1 at hvprobe/fault-test.c:1 test+0x0/0x1' > /dev/kmsg; echo after-report",
        &[&sys("getpid")],
        &["--quiet"],
    );
    assert_eq!(out.status.code(), Some(125), "{}", explain(&out));
    assert_has(&text(&out.stdout), "after-report", &out);
    let summary = out.summary();
    let report = "WARNING: CPU: 0 PID: 1 at hvprobe/fault-test.c:1";
    assert_eq!(
        summary.outcome.kind,
        OutcomeKind::KernelFault,
        "{}",
        explain(&out)
    );
    assert!(
        summary
            .outcome
            .detail
            .as_deref()
            .is_some_and(|d| d.starts_with(report))
            && summary
                .faults_with_probes
                .first()
                .is_some_and(|f| f.starts_with(report)),
        "{}",
        explain(&out)
    );
    assert!(out.probe(&sys("getpid")).hits >= 10, "{}", explain(&out));
    // The user's report names the probes that were in (the summary carries them as data).
    assert_has(
        &text(&out.stderr),
        &format!("probes in at the time:\n  {} at 0x", sys("getpid")),
        &out,
    );
    assert_text_restored(&out);
}
