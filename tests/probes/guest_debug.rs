//! The guest's own kprobes, uprobes and watchpoints beside hvprobe's probes.

use super::*;

pub(super) fn the_guest_kprobe_and_an_hvprobe_probe_on_one_function_both_count() {
    let k = KernelText::load();
    // The guest's kprobe on the function entry goes through ftrace (the fentry nop at +0);
    // hvprobe's probe sits on a later instruction of the same function.
    let ours = k.find("__x64_sys_getpid", |i| plan_of(i) == Some("xol"));
    let t = "/sys/kernel/tracing";
    let exec = format!(
        "echo 'p:hvtest __x64_sys_getpid' > {t}/kprobe_events && \
         echo 1 > {t}/events/kprobes/hvtest/enable && getpid-loop 1000 && \
         echo 0 > {t}/events/kprobes/hvtest/enable && cat {t}/kprobe_profile"
    );
    let out = run_probed("1", &exec, &[&ours], &["--quiet"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let guest_hits = kprobe_profile_hits(&out, "hvtest");
    let (_, ours_hits, _, _) = summary(&out, &ours);
    assert!(
        (1000..=1000 + OTHER_GETPID_CALLERS).contains(&guest_hits),
        "guest {guest_hits}"
    );
    assert!(
        (1000..=1000 + OTHER_GETPID_CALLERS).contains(&ours_hits),
        "ours {ours_hits}"
    );
    assert_text_restored(&out);
}

pub(super) fn the_guests_own_int3_kprobe_keeps_working_beside_an_hvprobe_probe_in_the_same_function()
 {
    // A guest kprobe that is a real int3 (set on the command line, not optimized, not on an
    // ftrace site) in vfs_read, and hvprobe's probe on the next instruction. Every guest int3
    // (the kprobe's, and the one after its copied instruction) reaches hvprobe, which hands
    // it back: the guest's kprobe must count every read and the reads must stay right.
    let k = KernelText::load();
    let (kp_off, kp_insn) = k
        .function("vfs_read")
        .into_iter()
        .find(|(off, i)| *off >= 8 && i.text.starts_with("sub rsp,"))
        .expect("sub $N,%rsp in vfs_read");
    let ours = format!("vfs_read+{:#x}", kp_off + kp_insn.len() as u64);
    let cmdline = format!(
        "{} kprobe_event=p:hvt,vfs_read+{kp_off:#x} trace_event=kprobes:hvt sysctl.debug.kprobes-optimization=0",
        hvprobe_vmm::platform::DEFAULT_CMDLINE_X86_64
    );
    let out = run_probed(
        "1",
        "open-read-loop 100 /etc/passwd; cat /sys/kernel/tracing/kprobe_profile",
        &[&ours],
        &["--cmdline", &cmdline, "--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    assert_has(
        &stdout,
        &format!(
            "open-read-loop: path=/etc/passwd opens=100 bytes={} fnv1a={:016x}",
            100 * passwd.len(),
            fnv1a(passwd)
        ),
        &out,
    );
    let guest_hits = kprobe_profile_hits(&out, "hvt");
    let (_, ours_hits, missed, _) = summary(&out, &ours);
    // Two reads per open (the data, then end of file), and the boot's own reads before.
    assert!(guest_hits >= 200, "guest kprobe hits {guest_hits}");
    assert!(ours_hits >= 200 && missed == 0, "hvprobe hits {ours_hits}");
    let exits = &out.summary().exits;
    assert!(exits.reinjected >= 2 * 200, "{exits:?}");
    assert_text_restored(&out);
}

pub(super) fn arm64_the_guests_own_kprobe_and_an_hvprobe_probe_on_one_function_both_count() {
    // The guest's kprobe BRKs (its probe and its own step-out-of-line BRK) reach hvprobe once
    // hvprobe's BRK is in, and go back to the guest by exception-entry emulation.
    let k = Arm64Text::load();
    let ours = k.find("__arm64_sys_getpid", "xol");
    let t = "/sys/kernel/tracing";
    let exec = format!(
        "echo 'p:hvtest __arm64_sys_getpid' > {t}/kprobe_events && \
         echo 1 > {t}/events/kprobes/hvtest/enable && getpid-loop 1000 && \
         echo 0 > {t}/events/kprobes/hvtest/enable && cat {t}/kprobe_profile"
    );
    let out = run_probed("1", &exec, &[&ours], &["--quiet"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let guest_hits = kprobe_profile_hits(&out, "hvtest");
    let ours_hits = out.probe(&ours).hits;
    assert!(
        (1000..=1000 + OTHER_GETPID_CALLERS).contains(&guest_hits),
        "guest {guest_hits}\n{}",
        explain(&out)
    );
    assert!(
        (1000..=1000 + OTHER_GETPID_CALLERS).contains(&ours_hits),
        "ours {ours_hits}"
    );
    assert!(out.summary().exits.reinjected >= 1000, "{}", explain(&out));
    out.assert_text_restored();
}

pub(super) fn entry_block_probes_count_at_least_what_the_guests_own_kprobes_count() {
    // The guest's kprobes on the entries of N functions that open-read-loop calls and
    // hvprobe's probes on a random instruction of each one's entry block, both counting only
    // open-read-loop's calls (the guest through an event filter on its trace buffer, hvprobe
    // through a task filter), so that both windows hold the whole workload. Every call to a
    // function runs its entry block: hvprobe's count is >= the guest's, and equal when no
    // jump lands inside the entry block before the probe.
    let seed = env_u64("HVPROBE_SWEEP_SEED", 0x5eed_0002);
    eprintln!("kprobe sweep: HVPROBE_SWEEP_SEED={seed}");
    let mut rng = SplitMix(seed);
    let picks = match guest_arch() {
        GuestArch::X86_64 => x86_64_entry_block_picks(&mut rng),
        GuestArch::Aarch64 => arm64_entry_block_picks(&mut rng),
    };
    assert!(
        picks.len() >= 20,
        "only {} candidate functions",
        picks.len()
    );
    // Kept short: the command travels on the guest's kernel command line.
    let names: Vec<&str> = picks.iter().map(|(f, _, _)| f.as_str()).collect();
    let exec = format!(
        "cd /sys/kernel/tracing;echo 8192 >buffer_size_kb;set -- {};i=0;for f;do \
         echo \"p:kprobes/s$i $f\">>kprobe_events&&\
         echo 'comm==\"open-read-loop\"'>events/kprobes/s$i/filter||echo kprobe-refused $i;\
         i=$((i+1));done;echo 1 >events/kprobes/enable;\
         open-read-loop 20 /etc/passwd /init /missing;echo 0 >events/kprobes/enable;\
         i=0;for f;do echo guest s$i $(grep -c \" s$i: \" trace) $(grep \" s$i \" kprobe_profile);\
         i=$((i+1));done;echo counted",
        names.join(" ")
    );
    let probes: Vec<String> = picks
        .iter()
        .enumerate()
        .map(|(i, (func, off, _))| {
            format!("p:hv/s{i} {func}+{off:#x} if comm == \"open-read-loop\"")
        })
        .collect();
    let refs: Vec<&str> = probes.iter().map(String::as_str).collect();
    let file = std::env::temp_dir().join(format!("hvprobe-ksweep-{}", std::process::id()));
    let out = run_probed("1", &exec, &refs, &["-o", file.to_str().unwrap()]);
    let trace = std::fs::read_to_string(&file).unwrap_or_default();
    std::fs::remove_file(&file).ok();
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(&stdout, "open-read-loop: path=/init opens=20", &out);
    assert_has(&stdout, "counted", &out);
    let mut report = Vec::new();
    let mut equal = 0;
    let mut compared = 0;
    for (i, (func, off, landing)) in picks.iter().enumerate() {
        if stdout.contains(&format!("kprobe-refused {i}\n")) {
            report.push(format!("  s{i} {func}: the guest refused its kprobe"));
            continue;
        }
        // "guest sI COUNT sI HITS MISSES": the filtered trace lines, then kprobe_profile's
        // line (hits of every task, and the hits its own handlers' recursion made it miss).
        let counts: Vec<u64> = stdout
            .split(&format!("guest s{i} "))
            .nth(1)
            .and_then(|r| r.lines().next())
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let [guest, _, missed] = counts[..] else {
            panic!("no guest counts for s{i}\n{}", explain(&out));
        };
        let ours = trace
            .lines()
            .filter(|l| l.contains(&format!(" hv/s{i}: ")))
            .count() as u64;
        report.push(format!(
            "  s{i} {func}+{off:#x}: guest {guest} (missed {missed}) hvprobe {ours}{}",
            if *landing {
                " (a jump lands in the entry block)"
            } else {
                ""
            }
        ));
        compared += 1;
        equal += u64::from(ours == guest);
        assert!(
            ours >= guest,
            "s{i} {func}+{off:#x}: hvprobe {ours} < guest {guest}\n{}",
            report.join("\n")
        );
        // The same window: equal, but for calls the guest's kprobe missed (its own handlers
        // calling the function).
        if !landing {
            assert!(
                ours <= guest + missed,
                "s{i} {func}+{off:#x}: hvprobe {ours} > guest {guest} + missed {missed}\n{}",
                report.join("\n")
            );
        }
    }
    eprintln!(
        "kprobe sweep: seed {seed}: {compared} functions compared, {equal} equal\n{}",
        report.join("\n")
    );
    assert!(
        report
            .iter()
            .filter(|l| l.contains("guest ") && !l.contains("guest 0 "))
            .count()
            >= 10,
        "too few functions were called\n{}",
        report.join("\n")
    );
    // With -o, the summary lines are in the file; the summary data says the same.
    assert!(trace.contains("(restored byte-for-byte)"), "{trace}");
    out.assert_text_restored();
}

pub(super) fn the_guests_own_uprobes_and_hardware_watchpoints_keep_working_beside_hvprobe_probes() {
    // The guest's uprobe (a breakpoint at EL0, then its own single step of the copy) and a
    // perf_event_open write watchpoint (which the kernel steps over), with an hvprobe probe in
    // the kernel: the traced program computes the same, the uprobe counts every call, the
    // watchpoint every write. On arm64 KVM masks the guest's step while it debugs the guest:
    // hvprobe carries it through (the return watch).
    let t = "/sys/kernel/tracing";
    let exec = format!(
        "off=$(debug-loop offset) && echo \"p:u/tick /bin/debug-loop:$off\" > {t}/uprobe_events && \
         echo 1 > {t}/events/u/tick/enable && debug-loop calls 40 && \
         echo 0 > {t}/events/u/tick/enable && cat {t}/uprobe_profile && \
         debug-loop watch 50 && getpid-loop 10"
    );
    let getpid = sys("getpid");
    let out = run_probed("1", &exec, &[&getpid], &["--quiet"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(
        &stdout,
        &format!("debug-loop: calls=40 sum={}", debug_loop_sum(40)),
        &out,
    );
    let uprobe_hits = stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("tick"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no uprobe_profile line\n{}", explain(&out)));
    assert_eq!(uprobe_hits, 40, "{}", explain(&out));
    assert_has(&stdout, "debug-loop: writes=50 events=50", &out);
    assert!(out.probe(&getpid).hits >= 10, "{}", explain(&out));
    // No text-hash check here: perf and trace events flip the guest's own static keys (perf's
    // are switched off after a delay), so the guest's text legitimately differs at the end.
    assert!(
        out.summary().faults_with_probes.is_empty(),
        "{}",
        explain(&out)
    );
}
