//! Every step plan on the running kernel: the values the guest computes stay right.

use super::*;
use hvprobe_vmm::refusal::RefusalStage;

pub(super) fn every_step_plan_keeps_the_kernel_computing_right_results() {
    let k = KernelText::load();
    let plain_xol = k.find("__x64_sys_getpid", |i| plan_of(i) == Some("xol"));
    let call = k.find("__x64_sys_getpid", |i| i.text.starts_with("call 0x"));
    let jcc = k.find("__task_pid_nr_ns", |i| {
        i.text.starts_with('j') && !i.text.starts_with("jmp") && plan_of(i) == Some("emulate")
    });
    let rip_relative = k.find("copy_page_to_iter", |i| {
        matches!(i.kind, InstructionKind::OutOfLine { .. })
            && i.rip_disp.is_some()
            && !i.text.contains("gs:")
    });
    // Per-CPU operands (`gs:[rip+X]` reaches a small per-CPU offset, 2 GiB from every slot):
    // a read-modify-write of the preempt count on every open, and a load of it on every close.
    let percpu_rmw = k.find("fd_install", |i| {
        i.text.starts_with("inc dword ptr gs:[rip")
    });
    let percpu_add = k.find("fput", |i| i.text.starts_with("mov eax, dword ptr gs:[rip"));
    // strlen's loop: the instruction a backward jump goes to, stepped once per character.
    let loop_body = {
        let f = k.function("strlen");
        let start = k.map.lookup("strlen").unwrap().addr;
        let target = f
            .iter()
            .find_map(|(off, i)| {
                let t = u64::from_str_radix(i.text.split("0x").nth(1)?, 16).ok()?;
                (i.text.starts_with('j') && t < start + off && t >= start).then_some(t - start)
            })
            .expect("strlen has a loop");
        format!("strlen+{target:#x}")
    };
    let probes = [
        "__x64_sys_getpid".to_string(),
        plain_xol.clone(),
        call.clone(),
        jcc.clone(),
        rip_relative.clone(),
        loop_body.clone(),
        percpu_rmw.clone(),
        percpu_add.clone(),
    ];
    let refs: Vec<&str> = probes.iter().map(String::as_str).collect();
    let out = run_probed(
        "1",
        "getpid-loop 300 & p=$!; wait; echo bg=$p; open-read-loop 20 /etc/passwd; fork-exec-loop 4",
        &refs,
        &["--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    // getpid returned the right pid through the stepped and emulated instructions.
    let pid = stdout
        .split("getpid-loop: calls=300 pid=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next());
    let bg = stdout.split("bg=").nth(1).and_then(|r| r.lines().next());
    assert!(
        pid.is_some() && pid == bg,
        "pid {pid:?} vs $! {bg:?}\n{}",
        explain(&out)
    );
    // Reading a file through the RIP-relative probe gives the right bytes.
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let want = format!(
        "open-read-loop: path=/etc/passwd opens=20 bytes={} fnv1a={:016x}",
        20 * passwd.len(),
        fnv1a(passwd)
    );
    assert_has(&stdout, &want, &out);
    assert_has(&stdout, "fork-exec-loop: runs=4 ok=4", &out);
    for (loc, want_plan, min_hits) in [
        (probes[0].as_str(), "emulate", 300),
        (&plain_xol, "xol", 300),
        (&call, "emulate", 300),
        (&jcc, "emulate", 300),
        (&rip_relative, "xol-riprel", 20),
        (&loop_body, "xol", 2),
        (&percpu_rmw, "xol-riprel", 20),
        (&percpu_add, "xol-riprel", 20),
    ] {
        let (plan, hits, missed, errors) = summary(&out, loc);
        assert_eq!(plan, want_plan, "{loc}");
        assert!(hits >= min_hits, "{loc}: {hits} hits\n{}", explain(&out));
        assert_eq!((missed, errors), (0, 0), "{loc}");
    }
    assert_text_restored(&out);
}

pub(super) fn ring0_flag_instructions_are_emulated_in_the_running_kernel() {
    // pushf, cli and sti only run in ring 0 as the kernel uses them, so the user-space corpus
    // cannot check them: here they are probed where the running kernel executes them most.
    // Paravirt call sites in vmlinux (`call *pv_ops.irq.save_fl/irq_disable/irq_enable`) are
    // patched at boot into `pushf; pop %rax`, `cli` and `sti`; native_safe_halt is `sti; hlt`,
    // where the sti's one-instruction interrupt shadow keeps the wake-up from being lost.
    let k = KernelText::load();
    let pv_ops = k.map.lookup("pv_ops").unwrap().addr;
    let pv_call = |func: &str, slot: u64| -> String {
        let (off, _) = k
            .function(func)
            .into_iter()
            .find(|(_, i)| {
                i.text.starts_with("call qword ptr [rip") && {
                    let target = i.rip_disp.map(|d| {
                        let at = usize::from(d.offset);
                        let disp = i32::from_le_bytes(i.bytes[at..at + 4].try_into().unwrap());
                        i.va + i.len() as u64 + disp as i64 as u64
                    });
                    target == Some(pv_ops + slot)
                }
            })
            .unwrap_or_else(|| panic!("no pv_ops+{slot:#x} call in {func}"));
        format!("{func}+{off:#x}")
    };
    let pushf = pv_call("_raw_spin_lock_irqsave", 0xf0);
    let cli = pv_call("_raw_spin_lock_irqsave", 0xf8);
    let sti = pv_call("_raw_spin_unlock_irq", 0x100);
    let (halt_off, _) = k
        .function("native_safe_halt")
        .into_iter()
        .find(|(_, i)| i.text == "sti")
        .expect("sti in native_safe_halt");
    let safe_halt_sti = format!("native_safe_halt+{halt_off:#x}");
    let out = run_probed(
        "1",
        "sleep 0.5; getpid-loop 200; sleep 0.5; fork-exec-loop 5; echo ring0-done",
        &[&pushf, &cli, &sti, &safe_halt_sti],
        &["--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(&stdout, "fork-exec-loop: runs=5 ok=5", &out);
    assert_has(&stdout, "ring0-done", &out);
    for (loc, insn, min_hits) in [
        (&pushf, "pushfq", 100),
        (&cli, "cli", 100),
        (&sti, "sti", 10),
        (&safe_halt_sti, "sti", 2),
    ] {
        let line = summary_line(&out, loc);
        assert_eq!(
            (line.instruction.as_str(), line.plan.name()),
            (insn, "emulate"),
            "{line:?}"
        );
        let (_, hits, missed, errors) = summary(&out, loc);
        assert!(hits >= min_hits, "{line}");
        assert_eq!((missed, errors), (0, 0), "{line}");
    }
    assert_text_restored(&out);
}

pub(super) fn boundaries_are_walked_past_instructions_capstone_lacks_and_stop_at_a_guest_breakpoint()
 {
    let k = KernelText::load();
    // finish_task_switch.isra.0 has a `serialize` (0f 01 e8, unknown to capstone 5) before
    // the iret-to-self sequence of sync_core: the walk used to stop there, so its `pushf`
    // was refused as "past the decodable code".
    let func = "finish_task_switch.isra.0";
    let sym = k.map.lookup(func).unwrap();
    let size = k.map.size_of(sym).unwrap() as usize;
    let code = k.bytes(sym.addr, size);
    let serialize = code
        .windows(3)
        .position(|w| w == [0x0f, 0x01, 0xe8])
        .expect("a serialize in finish_task_switch");
    let iret_frame = [0x8c, 0xd0, 0x50, 0x54, 0x48, 0x83, 0x04, 0x24, 0x08, 0x9c];
    let pushf = code
        .windows(iret_frame.len())
        .position(|w| w == iret_frame)
        .expect("the iret frame of sync_core")
        + iret_frame.len()
        - 1;
    assert!(pushf > serialize);
    let pushf = format!("{func}+{pushf:#x}");
    let out = run_probed(
        "1",
        "getpid-loop 20",
        &[&pushf, "__x64_sys_getpid"],
        &["--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let (plan, _, _, _) = summary(&out, &pushf);
    assert_eq!(plan, "emulate", "{}", explain(&out));
    assert_text_restored(&out);

    // A guest kprobe (set from the kernel command line, so it is in before hvprobe plants,
    // and not optimized into a jump) writes int3 over the first byte of an instruction of a
    // function the workload does not call. Decoding through the int3 would take the rest of
    // that instruction for the next one; hvprobe reads the guest's kprobe table and decodes
    // the original bytes instead: inside the instruction is refused, the kprobe's own address
    // is refused, the next instruction is planted.
    let func = "vfs_fallocate";
    let (kp_off, kp_insn) = k
        .function(func)
        .into_iter()
        .find(|(off, i)| *off >= 8 && i.len() >= 3 && plan_of(i).is_some())
        .expect("a multi-byte instruction in vfs_fallocate");
    let cmdline = format!(
        "{} kprobe_event=p:hvt,{func}+{kp_off:#x} trace_event=kprobes:hvt sysctl.debug.kprobes-optimization=0",
        hvprobe_vmm::platform::DEFAULT_CMDLINE_X86_64
    );
    let inside = format!("{func}+{:#x}", kp_off + 1);
    let at = format!("{func}+{kp_off:#x}");
    let after = format!("{func}+{:#x}", kp_off + kp_insn.len() as u64);
    let out = run_probed(
        "1",
        "cat /sys/kernel/tracing/kprobe_events",
        &[&inside, &at, &after],
        &["--cmdline", &cmdline, "--skip-refused", "--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    // The guest's kprobe is really there.
    assert_has(
        &text(&out.stdout),
        &format!("p:kprobes/hvt {func}+{}", kp_off),
        &out,
    );
    out.assert_refused(
        &inside,
        RefusalStage::Planting,
        &format!("offset {:#x} is not on an instruction boundary", kp_off + 1),
    );
    out.assert_refused(
        &at,
        RefusalStage::Planting,
        "is at the guest's own kprobe at",
    );
    assert_eq!(out.probe(&after).location, after);
    assert_text_restored(&out);
}

pub(super) fn arm64_stepped_instructions_and_return_probes_keep_the_workloads_right() {
    let k = Arm64Text::load();
    let stepped = k.find("__arm64_sys_getpid", "xol");
    let out = run_probed(
        "2",
        "getpid-loop 1500 & open-read-loop 20 /etc/passwd & fork-exec-loop 10 & wait; \
         cat /etc/passwd > /dev/null",
        &[
            &stepped,
            "r:hv/g __arm64_sys_getpid",
            "r:hv/open do_sys_openat2 fd=$retval:s32 c=$comm",
            "r:hv/exec bprm_execve",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(&stdout, "getpid-loop: calls=1500 pid=", &out);
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let want = format!(
        "open-read-loop: path=/etc/passwd opens=20 bytes={} fnv1a={:016x}",
        20 * passwd.len(),
        fnv1a(passwd)
    );
    assert_has(&stdout, &want, &out);
    assert_has(&stdout, "fork-exec-loop: runs=10 ok=10", &out);
    let p = out.probe(&stepped);
    assert_eq!(p.plan.name(), "xol");
    assert!(
        (1500..=1500 + OTHER_GETPID_CALLERS).contains(&p.hits),
        "{}",
        p.hits
    );
    // A boosted step: the copy branches back from the XOL code's alias, no slot BRK.
    assert_eq!(out.summary().exits.slot_traps, 0, "{}", explain(&out));
    assert!(out.summary().exits.breakpoints >= p.hits);
    for loc in ["__arm64_sys_getpid", "do_sys_openat2", "bprm_execve"] {
        let r = out.probe(loc);
        assert!(r.return_probe && r.hits > 0, "{loc}: {r:?}");
        assert_eq!((r.returns, r.nmissed), (r.hits, 0), "{loc}: {r:?}");
    }
    assert!(out.probe("bprm_execve").hits >= 10);
    // The open of /etc/passwd by cat returned a descriptor.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("hv/open: (") && l.contains("c=\"cat\"") && l.contains("fd=3")),
        "{}",
        explain(&out)
    );
    out.assert_text_restored();
}

pub(super) fn arm64_mrs_daif_reads_the_interrupt_mask_the_guest_had_in_process_and_interrupt_context()
 {
    // A slot runs with D, A, I and F masked: a copied `mrs daif` read 0x3c0 in every context, and
    // the `local_irq_restore` that followed left the CPU with everything masked. Emulated, it
    // reads the mask of the hit: 0 in process context with interrupts on (queue_work_on from
    // the write of `s` to /proc/sysrq-trigger: emergency_sync's schedule_work, every time;
    // `sync` alone queues work only now and then), I and F (0xc0) in interrupts (the entropy
    // pool's per-IRQ work, hrtimer_interrupt's irqsave lock). The register is fetched at the
    // next instruction, as the guest computed it.
    let k = Arm64Text::load();
    let mut probes = Vec::new();
    for (func, event) in [("queue_work_on", "q"), ("hrtimer_interrupt", "h")] {
        let (off, rt) = *mrs_daif_sites(&k, func)
            .first()
            .unwrap_or_else(|| panic!("no mrs daif in {func}"));
        probes.push(format!("{func}+{off:#x}"));
        probes.push(format!("p:hv/{event} {func}+{:#x} flags=%x{rt}", off + 4));
    }
    let refs: Vec<&str> = probes.iter().map(String::as_str).collect();
    let out = run_probed(
        "1",
        "sync; echo s > /proc/sysrq-trigger; sleep 2; getpid-loop 200; sync; echo done",
        &refs,
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_has(&text(&out.stdout), "getpid-loop: calls=200", &out);
    for at in [&probes[0], &probes[2]] {
        assert_eq!(out.probe(at).plan.name(), "emulate", "{}", explain(&out));
    }
    let flags = |event: &str| -> Vec<u64> {
        text(&out.stdout)
            .lines()
            .filter(|l| l.contains(&format!("hv/{event}: (")))
            .map(|l| {
                let v = l.rsplit("flags=0x").next().unwrap_or_default();
                u64::from_str_radix(v.trim(), 16).unwrap_or_else(|_| panic!("flags in {l}"))
            })
            .collect()
    };
    let (q, h) = (flags("q"), flags("h"));
    // queue_work_on runs with interrupts on (from the sysrq write) and off (from interrupts);
    // hrtimer_interrupt's site, on a path only some ticks take, always off.
    assert!(q.contains(&0), "interrupts on: {q:?}\n{}", explain(&out));
    assert!(q.iter().all(|f| [0, 0xc0].contains(f)), "{q:?}");
    assert!(h.iter().all(|&f| f == 0xc0), "{h:?}\n{}", explain(&out));
    assert!(
        q.iter().chain(&h).any(|&f| f == 0xc0),
        "no hit with interrupts off: {q:?} {h:?}\n{}",
        explain(&out)
    );
    out.assert_text_restored();
}

pub(super) fn bad_user_pointers_through_probed_user_copy_paths_fail_with_efault_and_the_guest_is_fine()
 {
    // Every instruction of the user-copy paths that bad pointers go through. On x86_64 the
    // faulting ones (with __ex_table fix-ups) are refused by name, the rest planted; the
    // faults then happen in the guest's own text and the fix-ups return EFAULT as without
    // probes. On arm64 the user accesses are probed too: each runs in a trapped slot, and its
    // fault is rewound to the probed instruction (the slot-exception watch), where the
    // guest's fix-up applies. Without the rewind every bad pointer would oops the guest.
    let probes: Vec<String> = match guest_arch() {
        GuestArch::X86_64 => {
            let k = KernelText::load();
            [
                "_copy_to_user",
                "_copy_from_user",
                "strncpy_from_user",
                "copy_user_enhanced_fast_string",
                "copy_user_generic_string",
                "copy_user_generic_unrolled",
                "getname_flags",
                "cp_new_stat",
            ]
            .iter()
            .flat_map(|f| k.boundaries(f))
            .collect()
        }
        // (arm64's `_copy_to_user`/`_copy_from_user` are local copies in several files; the
        // copies themselves are the `__arch_` routines, every user access an ldtr/sttr with
        // an __ex_table entry.)
        GuestArch::Aarch64 => {
            let k = Arm64Text::load();
            [
                "__arch_copy_from_user",
                "__arch_copy_to_user",
                "strncpy_from_user",
                "getname_flags",
                "cp_new_stat",
            ]
            .iter()
            .flat_map(|f| k.boundaries(f))
            .collect()
        }
    };
    let refs: Vec<&str> = probes.iter().map(String::as_str).collect();
    let out = run_probed(
        "1",
        "bad-pointer-loop 30; open-read-loop 5 /etc/passwd",
        &refs,
        &["--skip-refused", "--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(
        &stdout,
        "bad-pointer-loop: runs=30 efault=240 good=30 wrong=0",
        &out,
    );
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    assert_has(
        &stdout,
        &format!(
            "open-read-loop: path=/etc/passwd opens=5 bytes={} fnv1a={:016x}",
            5 * passwd.len(),
            fnv1a(passwd)
        ),
        &out,
    );
    let refused = &out.summary().refused;
    let skipped = refused.len();
    let for_extable = refused
        .iter()
        .filter(|r| r.reason.contains("exception table (__ex_table)"))
        .count();
    let slot_exceptions = out.summary().exits.slot_exceptions;
    match guest_arch() {
        GuestArch::X86_64 => assert!(for_extable > 0, "{}", explain(&out)),
        // 30 runs, each with at least four bad pointers faulting in a probed user access
        // (read into and write from an unmapped page, the NULL names, stat and getcwd into
        // an unmapped page), every fault rewound.
        GuestArch::Aarch64 => {
            assert_eq!(for_extable, 0, "{}", explain(&out));
            assert!(slot_exceptions >= 4 * 30, "{}", explain(&out));
        }
    }
    let mut planted = 0;
    let mut hits = 0;
    for p in &probes {
        if let Some(planted_probe) = out.summary().probes.iter().find(|s| s.location == *p) {
            planted += 1;
            hits += planted_probe.hits;
        }
    }
    assert_eq!(planted + skipped, probes.len(), "{}", explain(&out));
    assert!(hits > 1000, "{hits} hits on the user-copy paths");
    eprintln!(
        "user-copy probes: {} instructions, {planted} planted, {skipped} refused, {hits} hits, {slot_exceptions} faults in slots rewound",
        probes.len()
    );
    for r in refused {
        eprintln!("user-copy: refused {r}");
    }
    assert_text_restored(&out);
}
