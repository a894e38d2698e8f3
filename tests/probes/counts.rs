//! Counting hits: one probe, two vCPUs, chained probes, hardware breakpoints, KASLR guests.

use super::*;
use hvprobe_vmm::summary::TrapName;

pub(super) fn a_getpid_probe_counts_the_workload_calls_and_prints_each_hit() {
    let out = run_probed("1", "getpid-loop 2000", &["__x64_sys_getpid"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    // The runner's emulator must deliver int3 exits: the self-test says so, or this fails.
    let traps = out.self_test();
    assert!(
        traps.breakpoint.ok && traps.single_step.ok && traps.probes_use == TrapName::Int3,
        "{traps:?}"
    );
    // Every hit was vCPU 0's, and none of its debug exits was the guest's own.
    let vcpu0 = &out.summary().vcpus[0];
    assert_eq!(
        vcpu0.site_hits,
        out.probe("__x64_sys_getpid").hits,
        "{vcpu0:?}"
    );
    assert_eq!(vcpu0.handed_back, 0, "{vcpu0:?}");
    let (plan, hits, missed, errors) = summary(&out, "__x64_sys_getpid");
    assert!(
        (2000..=2000 + OTHER_GETPID_CALLERS).contains(&hits),
        "hits {hits}\n{}",
        explain(&out)
    );
    assert_eq!((missed, errors), (0, 0));
    assert_eq!(plan, "emulate", "the first instruction is emulated");
    let stdout = text(&out.stdout);
    let hit_lines = stdout
        .lines()
        .filter(|l| l.starts_with("hit ") && l.contains(" cpu0 __x64_sys_getpid rip=0xffffffff"))
        .count() as u64;
    assert_eq!(hit_lines, hits, "one line per hit");
    assert_has(&stdout, "getpid-loop: calls=2000 pid=", &out);
    // Booted with nokaslr: the slide found from the running guest is zero.
    assert_has(&stdout, "hvprobe: kernel base slide 0x0 ", &out);
    assert_text_restored(&out);
}

pub(super) fn two_vcpus_hitting_one_probe_are_all_counted() {
    // An emulated probe (the entry) and a stepped one (a later instruction) hit from both
    // vCPUs while both run a workload; every hit counted, both vCPUs seen, outputs right.
    let k = KernelText::load();
    let stepped = k.find("__x64_sys_getpid", |i| plan_of(i) == Some("xol"));
    let out = run_probed(
        "2",
        "getpid-loop 3000 & getpid-loop 3000 & open-read-loop 30 /etc/passwd & wait",
        &["__x64_sys_getpid", &stepped],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout.matches("getpid-loop: calls=3000 pid=").count(),
        2,
        "{}",
        explain(&out)
    );
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let want = format!(
        "open-read-loop: path=/etc/passwd opens=30 bytes={} fnv1a={:016x}",
        30 * passwd.len(),
        fnv1a(passwd)
    );
    assert_has(&stdout, &want, &out);
    for (loc, plan_name) in [("__x64_sys_getpid", "emulate"), (stepped.as_str(), "xol")] {
        let (plan, hits, missed, errors) = summary(&out, loc);
        assert_eq!(plan, plan_name, "{loc}");
        assert!(
            (6000..=6000 + OTHER_GETPID_CALLERS).contains(&hits),
            "{loc}: hits {hits}\n{}",
            explain(&out)
        );
        assert_eq!((missed, errors), (0, 0), "{loc}");
        // One line per hit, and both vCPUs took a share of them.
        let per_cpu = |cpu: &str| {
            stdout
                .lines()
                .filter(|l| {
                    l.starts_with("hit ")
                        && l.split_whitespace().nth(2) == Some(cpu)
                        && l.split_whitespace().nth(3) == Some(loc)
                })
                .count() as u64
        };
        let (cpu0, cpu1) = (per_cpu("cpu0"), per_cpu("cpu1"));
        assert_eq!(cpu0 + cpu1, hits, "{loc}: one hit line per hit");
        assert!(
            cpu0 >= 500 && cpu1 >= 500,
            "{loc}: both vCPUs hit it (cpu0 {cpu0}, cpu1 {cpu1})"
        );
    }
    assert_vcpus_share_the_hits(&out, 1000);
    assert_text_restored(&out);
}

/// Asserts the summary's per-vCPU counts add up to the probes' hits (one probe a site) and
/// that each vCPU hit at least `least` sites.
#[track_caller]
fn assert_vcpus_share_the_hits(out: &Run, least: u64) {
    let s = out.summary();
    let hits: u64 = s.probes.iter().map(|p| p.hits).sum();
    let per_vcpu: Vec<u64> = s.vcpus.iter().map(|v| v.site_hits).collect();
    assert_eq!(per_vcpu.iter().sum::<u64>(), hits, "{:?}", s.vcpus);
    assert!(
        per_vcpu.len() == 2 && per_vcpu.iter().all(|&h| h >= least),
        "{:?}\n{}",
        s.vcpus,
        explain(&out.out)
    );
}

pub(super) fn arm64_getpid_probes_count_every_call_with_one_exit_for_two_chained_probes() {
    let k = Arm64Text::load();
    let second = k.find("__arm64_sys_getpid", "emulate");
    let out = run_probed(
        "1",
        "getpid-loop 2000",
        &["__arm64_sys_getpid", &second],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let traps = out.self_test();
    assert!(
        traps.breakpoint.ok
            && traps.single_step.ok
            && traps.hardware.ok
            && traps.hardware_count > 0
            && traps.reinjection.as_ref().is_some_and(|r| r.ok)
            && traps.probes_use == TrapName::Brk,
        "{traps:?}"
    );
    for loc in ["__arm64_sys_getpid", second.as_str()] {
        let p = out.probe(loc);
        assert!(
            (2000..=2000 + OTHER_GETPID_CALLERS).contains(&p.hits),
            "{loc}: {}\n{}",
            p.hits,
            explain(&out)
        );
        assert_eq!((p.plan.name(), p.trap.as_str()), ("emulate", "brk"));
        assert_eq!((p.missed, p.handler_errors), (0, 0));
    }
    let stdout = text(&out.stdout);
    let lines = stdout
        .lines()
        .filter(|l| l.starts_with("hit ") && l.contains(" cpu0 __arm64_sys_getpid pc=0xffff8000"))
        .count() as u64;
    assert_eq!(
        lines,
        out.probe("__arm64_sys_getpid").hits,
        "one line per hit"
    );
    assert_has(&stdout, " x0=0x", &out);
    // The second probe is followed into in the same exit as the first.
    let exits = out.summary().exits.breakpoints;
    assert_eq!(
        exits,
        out.probe("__arm64_sys_getpid").hits,
        "{}",
        explain(&out)
    );
    assert_has(&stdout, "getpid-loop: calls=2000 pid=", &out);
    assert_eq!(out.summary().kaslr_slide, Some(0));
    // The handlers see every register: x0-x30, PSTATE, SP_EL1, SP_EL0, TTBR0/1 and TCR (37
    // reads; the PC came with the exit), once per exit however many probes were followed
    // into; a BRK of the guest's own handed back reads them all too.
    let e = &out.summary().exits;
    let least = 37 * (e.breakpoints + e.reinjected);
    assert!(
        (least..=least + 2 * 37).contains(&e.register_reads),
        "37 per exit: {e:?}"
    );
    out.assert_text_restored();
}

pub(super) fn arm64_two_vcpus_hitting_one_probe_are_all_counted() {
    let out = run_probed(
        "2",
        "getpid-loop 3000 & getpid-loop 3000 & wait",
        &["__arm64_sys_getpid"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let hits = out.probe("__arm64_sys_getpid").hits;
    assert!(
        (6000..=6000 + OTHER_GETPID_CALLERS).contains(&hits),
        "{hits}"
    );
    let stdout = text(&out.stdout);
    let per_cpu = |cpu: &str| {
        stdout
            .lines()
            .filter(|l| l.starts_with("hit ") && l.split_whitespace().nth(2) == Some(cpu))
            .count()
    };
    assert!(
        per_cpu("cpu0") >= 500 && per_cpu("cpu1") >= 500,
        "{}",
        explain(&out)
    );
    assert_vcpus_share_the_hits(&out, 500);
    out.assert_text_restored();
}

pub(super) fn hardware_breakpoints_probe_without_touching_text() {
    let k = KernelText::load();
    // A stepped instruction apart from the entry probe, so each trap is taken on its own
    // (adjacent probes are chained in one exit, which the engine's unit tests cover).
    let entry_len = k.function("__x64_sys_getpid")[0].1.len() as u64;
    let xol = {
        let (off, _) = k
            .function("__x64_sys_getpid")
            .into_iter()
            .find(|(off, i)| *off > entry_len && plan_of(i) == Some("xol"))
            .expect("a stepped instruction in getpid");
        format!("__x64_sys_getpid+{off:#x}")
    };
    // A return probe too: its entry is a hardware breakpoint, its trampoline an int3 in the
    // XOL area (not in text), trapped from the moment it is written.
    let out = run_probed(
        "1",
        "getpid-loop 500; open-read-loop 10 /etc/passwd",
        &["__x64_sys_getpid", &xol, "r:hv/rd ksys_read n=$retval:s64"],
        &["--quiet", "--trap", "hw"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let line = summary_line(&out, "ksys_read");
    assert!(field(line, "returns") >= 20, "{line}");
    assert!(field(line, "returns") + 2 >= field(line, "hits"), "{line}");
    for loc in ["__x64_sys_getpid", xol.as_str()] {
        let (_, hits, _, _) = summary(&out, loc);
        assert!(
            (500..=500 + OTHER_GETPID_CALLERS).contains(&hits),
            "{loc}: {hits}"
        );
    }
    let stdout = text(&out.stdout);
    assert_has(&stdout, "trap hw)", &out);
    // The text hash with the probes in place equals the one before: nothing was written.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("hvprobe: kernel text hash"))
        .unwrap();
    let hash = |k: &str| {
        line.split(&format!("{k}="))
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
    };
    assert_eq!(hash("before"), hash("planted"), "{line}");
    assert_text_restored(&out);
}

pub(super) fn arm64_hardware_breakpoints_probe_without_touching_text() {
    // The second instruction of the patchable entry: the `nop` ftrace leaves alone (the first
    // becomes `mov x9, x30` at boot), which the host emulates without x0-x30.
    let at = "__arm64_sys_getpid+0x4";
    let out = run_probed("1", "getpid-loop 500", &[at], &["--quiet", "--trap", "hw"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let p = out.probe(at);
    assert_eq!((p.trap.as_str(), p.instruction.as_str()), ("hw", "nop"));
    assert!(
        (500..=500 + OTHER_GETPID_CALLERS).contains(&p.hits),
        "{}",
        p.hits
    );
    let t = out.summary().text.as_ref().unwrap();
    assert_eq!(t.before, t.planted, "nothing written into the text");
    // Without handlers (--quiet) an instruction that touches no register the host must read
    // (its site on a page without BTI guarding) costs no register read at all: the PC comes
    // with the exit, the site is found by its address. Then a write of the PC.
    let e = &out.summary().exits;
    let handled = e.hw_breakpoints + e.reinjected;
    eprintln!(
        "register ioctls: {} reads, {} writes for {handled} exits",
        e.register_reads, e.register_writes
    );
    // (A hardware breakpoint exit that races the removal is no hit and reads all 37
    // registers to hand it back: slack of 2.)
    assert!(e.register_reads <= 37 * 2, "no reads per hit: {e:?}");
    assert_eq!(e.register_writes, e.hw_breakpoints, "the PC alone: {e:?}");
    out.assert_text_restored();
}

pub(super) fn a_kaslr_guest_is_probed_like_a_nokaslr_one() {
    // The default command line without `nokaslr`: the slide is found from the running guest.
    // With page-table isolation forced on (AMD CPUs do not need it): user mode runs on a CR3
    // without the kernel's text, so planting reads a vCPU in the kernel.
    let cmdline = "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux i8042.nomux \
                   i8042.dumbkbd quiet loglevel=3 pti=on";
    assert!(!cmdline.contains("nokaslr"));
    let k = KernelText::load();
    let stepped = k.find("__x64_sys_getpid", |i| plan_of(i) == Some("xol"));
    let out = run_probed(
        "1",
        "getpid-loop 500; cat /etc/passwd > /dev/null",
        &[
            "__x64_sys_getpid",
            &stepped,
            "p:hv/open do_sys_openat2 name=+0($arg2):ustring c=$comm at=%ip:symbol",
        ],
        &["--cmdline", cmdline],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    let slide = stdout
        .lines()
        .find_map(|l| l.strip_prefix("hvprobe: kernel base slide 0x"))
        .and_then(|r| u64::from_str_radix(r.split_whitespace().next()?, 16).ok())
        .unwrap_or_else(|| panic!("no slide line\n{}", explain(&out)));
    assert_eq!(
        slide % (2 << 20),
        0,
        "KASLR moves the kernel in 2 MiB steps"
    );
    for loc in ["__x64_sys_getpid", stepped.as_str()] {
        let (_, hits, _, _) = summary(&out, loc);
        assert!(
            (500..=500 + OTHER_GETPID_CALLERS).contains(&hits),
            "{loc}: {hits}"
        );
    }
    assert_has(
        &stdout,
        "hv/open: (do_sys_openat2) name=\"/etc/passwd\" c=\"cat\" at=\"do_sys_openat2\"",
        &out,
    );
    assert_text_restored(&out);
}

pub(super) fn arm64_a_kaslr_guest_on_a_spectre_bhb_cpu_is_probed_like_on_the_default_one() {
    // Neoverse N1 is in Linux's Spectre-BHB list. With KASLR (which makes arm64 turn KPTI
    // on), VBAR_EL1 at EL1 is `vectors`; without it, a slot of __bp_harden_el1_vectors: both
    // give the slide.
    let out = arm64_kaslr_definitions(&["--runner-cpu", "neoverse-n1"]);
    assert!(out.summary().kaslr_anchor.is_some(), "{}", explain(&out));
    let out = run_probed(
        "1",
        "getpid-loop 20",
        &[&sys("getpid")],
        &["--quiet", "--runner-cpu", "neoverse-n1"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let anchor = out.summary().kaslr_anchor.clone().unwrap_or_default();
    assert!(
        anchor.starts_with("__bp_harden_el1_vectors"),
        "{anchor}\n{}",
        explain(&out)
    );
    assert_eq!(out.summary().kaslr_slide, Some(0));
    assert!(out.probe(&sys("getpid")).hits >= 20);
}
