//! Probes on the real default guest (Debian cloud kernel), through the emulated KVM runner
//! where the host's KVM cannot do the job: counts, every step plan, the guest's own kprobes
//! alongside, removal restoring the text, hardware breakpoints, and bad input.
//!
//! Probe offsets are not hard-coded: they are found by decoding the guest kernel's own
//! vmlinux (from the Debian -dbg package) with probe-core's decoder, so a different kernel
//! build picks its own instructions.

mod common;

use common::{Guests, Run, assert_has, explain, fnv1a, guest_arch, hvprobe, text};
use hvprobe_guest::GuestArch;
use hvprobe_vmm::summary::ProbeSummary;
use probe_core::arch::x86_64::{Decoder, Instruction, InstructionKind, StepPlan};
use probe_core::symbols::SymbolMap;

/// The guest's syscall entry point for `name` (`__x64_sys_getpid`, `__arm64_sys_getpid`): the
/// tests that need no instruction set of their own run on both architectures.
fn sys(name: &str) -> String {
    match guest_arch() {
        GuestArch::X86_64 => format!("__x64_sys_{name}"),
        GuestArch::Aarch64 => format!("__arm64_sys_{name}"),
    }
}

/// The register the kernel passes argument `n` (1-based, as `$argN`) in, in kprobe_events
/// syntax.
fn arg_register(n: usize) -> &'static str {
    match guest_arch() {
        GuestArch::X86_64 => ["%di", "%si", "%dx", "%cx", "%r8", "%r9"][n - 1],
        GuestArch::Aarch64 => ["%x0", "%x1", "%x2", "%x3", "%x4", "%x5"][n - 1],
    }
}

/// The default guest's kernel text, read from its vmlinux.
struct KernelText {
    map: SymbolMap,
    elf: Vec<u8>,
}

impl KernelText {
    fn load() -> KernelText {
        let guest = hvprobe_guest::default_guest().expect("default guest");
        let map =
            SymbolMap::parse(&std::fs::read_to_string(guest.kernel.system_map()).unwrap()).unwrap();
        let elf = std::fs::read(guest.kernel.vmlinux()).expect("vmlinux");
        KernelText { map, elf }
    }

    /// The file bytes at virtual address `va`.
    fn bytes(&self, va: u64, len: usize) -> &[u8] {
        probe_core::elf::bytes_at(&self.elf, va, len)
            .unwrap_or_else(|e| panic!("{va:#x} in vmlinux: {e}"))
    }

    /// The instructions of `func` (at least its first 256 bytes, for entry code whose labels
    /// split one routine), with their offsets.
    fn function(&self, func: &str) -> Vec<(u64, Instruction)> {
        let sym = self.map.lookup(func).unwrap_or_else(|e| panic!("{e}"));
        let size = self.map.size_of(sym).unwrap_or(256).max(256) as usize;
        let code = self.bytes(sym.addr, size);
        let d = Decoder::new().unwrap();
        let mut out = Vec::new();
        let mut at = 0usize;
        while at < size {
            let Ok(i) = d.decode(&code[at..], sym.addr + at as u64) else {
                break;
            };
            let len = i.len();
            out.push((at as u64, i));
            at += len;
        }
        out
    }

    /// Every instruction of `func` (to the next symbol), as `func+0xOFF` locations.
    fn boundaries(&self, func: &str) -> Vec<String> {
        let sym = self.map.lookup(func).unwrap_or_else(|e| panic!("{e}"));
        let size = self.map.size_of(sym).expect("a symbol after it");
        self.function(func)
            .into_iter()
            .take_while(|(off, _)| *off < size)
            .map(|(off, _)| format!("{func}+{off:#x}"))
            .collect()
    }

    /// `func+0xOFF` of the first instruction after the first that `pick` accepts.
    fn find(&self, func: &str, pick: impl Fn(&Instruction) -> bool) -> String {
        let (off, _) = self
            .function(func)
            .into_iter()
            .skip(1)
            .find(|(_, i)| pick(i))
            .unwrap_or_else(|| panic!("no such instruction in {func}"));
        format!("{func}+{off:#x}")
    }
}

fn plan_of(i: &Instruction) -> Option<&'static str> {
    Decoder::new()
        .unwrap()
        .plan(i)
        .ok()
        .map(|p: StepPlan| p.name())
}

/// The counters of the probe at `location`, from the run's summary.
fn summary_line<'a>(out: &'a Run, location: &str) -> &'a ProbeSummary {
    out.probe(location)
}

/// One counter of a probe, by the name the summary line gives it.
fn field(p: &ProbeSummary, key: &str) -> u64 {
    match key {
        "hits" => p.hits,
        "missed" => p.missed,
        "handler_errors" => p.handler_errors,
        "returns" => p.returns,
        "nmissed" => p.nmissed,
        _ => panic!("no counter {key}"),
    }
}

/// The number after `key=` in a printed line (the `-o` file's summary lines).
fn line_field(line: &str, key: &str) -> u64 {
    line.split(&format!("{key}="))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// The probe at `location` as (plan, hits, missed, errors).
fn summary(out: &Run, location: &str) -> (String, u64, u64, u64) {
    let p = out.probe(location);
    (
        p.plan.name().to_string(),
        p.hits,
        p.missed,
        p.handler_errors,
    )
}

/// Asserts the kernel text hash after removal equals the one before planting.
#[track_caller]
fn assert_text_restored(out: &Run) {
    out.assert_text_restored();
}

fn run_probed(vcpus: &str, exec: &str, probes: &[&str], extra: &[&str]) -> Run {
    let mut args = vec!["run", "--vcpus", vcpus, "--exec", exec, "--timeout", "400"];
    for p in probes {
        args.extend(["-p", p]);
    }
    args.extend_from_slice(extra);
    Run::new(&args)
}

/// The hit count of the guest's kprobe `event` in the `kprobe_profile` the run's command printed.
fn kprobe_profile_hits(out: &Run, event: &str) -> u64 {
    text(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(event))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no kprobe_profile line for {event}\n{}", explain(out)))
}

/// The shell and /init call getpid a few times around the workload; allow for them.
const OTHER_GETPID_CALLERS: u64 = 10;

fn a_getpid_probe_counts_the_workload_calls_and_prints_each_hit() {
    let out = run_probed("1", "getpid-loop 2000", &["__x64_sys_getpid"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    // The runner's emulator must deliver int3 exits: the self-test says so, or this fails.
    assert_has(&text(&out.stderr), "trap self-test: int3 exits yes", &out);
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

fn two_vcpus_hitting_one_probe_are_all_counted() {
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
    assert_text_restored(&out);
}

fn every_step_plan_keeps_the_kernel_computing_right_results() {
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
        .and_then(|r| r.lines().next());
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

fn the_guest_kprobe_and_an_hvprobe_probe_on_one_function_both_count() {
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

fn the_guests_own_int3_kprobe_keeps_working_beside_an_hvprobe_probe_in_the_same_function() {
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

fn ring0_flag_instructions_are_emulated_in_the_running_kernel() {
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

fn hardware_breakpoints_probe_without_touching_text() {
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

fn bad_probes_are_refused_and_leave_the_guest_unchanged() {
    // Unknown symbol: refused before any VM starts.
    let out = run_probed("1", "true", &["no_such_function_hvprobe"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert_has(&text(&out.stderr), "no_such_function_hvprobe", &out);
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
    let stderr = text(&out.stderr);
    assert_has(&stderr, "not on an instruction boundary", &out);
    assert_has(&stderr, &insn.text, &out);
    assert_has(&stderr, "no probe was left in the guest", &out);
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
    assert_has(&text(&out.stderr), "refusing to probe `sysretq`", &out);
    assert_text_restored(&out);
}

fn every_refused_probe_is_named_in_one_pass_and_skip_refused_plants_the_rest() {
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
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let stderr = text(&out.stderr);
    assert_has(&stderr, "no_such_function_hvprobe_a", &out);
    assert_has(&stderr, "no_such_function_hvprobe_b", &out);
    assert_has(&stderr, "%nosuchreg", &out);
    assert!(!text(&out.stdout).contains(hvprobe_guest::INIT_READY_MARKER));

    // Refusals found at planting (instruction checks): all of them, nothing left planted.
    write(&["__x64_sys_getpid", &inside, &sysret]);
    let out = run_probed("1", "echo SHOULD-NOT-RUN", &[], &["-f", f]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    let stderr = text(&out.stderr);
    assert_has(&stderr, "2 probes refused", &out);
    assert_has(&stderr, "not on an instruction boundary", &out);
    assert_has(&stderr, &insn.text, &out);
    assert_has(&stderr, "refusing to probe `sysretq`", &out);
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
    let stderr = text(&out.stderr);
    let skipped: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("hvprobe: skipped refused probe: "))
        .collect();
    assert_eq!(skipped.len(), 3, "{}", explain(&out));
    assert_has(&stderr, "no_such_function_hvprobe_a", &out);
    assert_has(&stderr, "not on an instruction boundary", &out);
    assert_has(&stderr, "refusing to probe `sysretq`", &out);
    let (_, hits, _, _) = summary(&out, "__x64_sys_getpid");
    assert!((50..50 + OTHER_GETPID_CALLERS).contains(&hits), "{hits}");
    assert_text_restored(&out);
}

fn kprobe_event_definitions_fetch_arguments_from_guest_memory() {
    // do_sys_openat2(int dfd, const char __user *filename, struct open_how *how): the
    // filename string from user memory, dfd as a signed register, how->flags dereferenced,
    // and the task's name from its task_struct (offsets from the kernel's BTF).
    let out = run_probed(
        "1",
        "open-read-loop 3 /etc/passwd",
        &[
            "p:hv/open do_sys_openat2 dfd=%di:s32 a1=$arg1:s32 dx=%dx a3=$arg3 name=+0($arg2):ustring flags=+0($arg3):x32 c=$comm",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    let opens: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" hv/open: (do_sys_openat2) "))
        .filter(|l| l.contains("name=\"/etc/passwd\""))
        .collect();
    assert_eq!(opens.len(), 3, "{}", explain(&out));
    // comm-pid [cpu] time: event: (location) args, as the kernel's trace output reads.
    // AT_FDCWD, and O_RDONLY with the O_LARGEFILE the kernel adds on 64-bit.
    for l in &opens {
        assert!(
            l.starts_with("open-read-loop-") && l.contains(" [000] "),
            "{l}"
        );
        assert!(
            l.contains("dfd=-100 a1=-100 ") && l.contains("flags=0x8000"),
            "{l}"
        );
        // $argN is the calling convention's register: $arg3 is %dx.
        let value = |k: &str| {
            l.split(&format!(" {k}="))
                .nth(1)
                .and_then(|r| r.split(' ').next())
        };
        assert!(value("dx").is_some_and(|v| v.starts_with("0xffff")), "{l}");
        assert_eq!(value("dx"), value("a3"), "{l}");
        assert!(l.ends_with("c=\"open-read-loop\""), "{l}");
    }
    assert_text_restored(&out);

    // A probe file: a bad line is named by file and line, nothing runs.
    let file = std::env::temp_dir().join(format!("hvprobe-defs-{}", std::process::id()));
    std::fs::write(
        &file,
        "# comment\n\np:hv/ok vfs_read\np:hv/bad vfs_read x=$nope\n",
    )
    .unwrap();
    let out = hvprobe(&["run", "-f", file.to_str().unwrap(), "--exec", "true"]);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert_has(
        &text(&out.stderr),
        ":4: bad probe definition at column 21: unknown variable $nope",
        &out,
    );

    // A definition that does not parse: the column is shown, nothing runs.
    let out = run_probed("1", "true", &["p:hv/open do_sys_openat2 x=+8(%di"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert_has(
        &text(&out.stderr),
        "bad probe definition at column 34: expected ')'",
        &out,
    );
}

fn a_kaslr_guest_is_probed_like_a_nokaslr_one() {
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

fn return_probes_report_every_return_with_its_value() {
    // ksys_read(fd, buf, count): the value returned, and the entry's fd.
    let out = run_probed(
        "1",
        "open-read-loop 2 /etc/passwd",
        &["r:hv/read ksys_read n=$retval:s64 fd=$arg1:s32"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    let reads: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("open-read-loop-") && l.contains(" hv/read: ("))
        .collect();
    // Each open-read-loop pass reads the 30-byte file, then sees end of file.
    let passwd_len = b"root:x:0:0:root:/root:/bin/sh\n".len();
    assert_eq!(
        reads
            .iter()
            .filter(|l| l.contains(&format!("n={passwd_len} fd=3")))
            .count(),
        2,
        "{}",
        explain(&out)
    );
    assert_eq!(reads.iter().filter(|l| l.contains("n=0 fd=3")).count(), 2);
    assert!(
        reads.iter().all(|l| l.contains(" <- ksys_read) ")),
        "{reads:?}"
    );
    let stats = summary_line(&out, "ksys_read");
    let get = |k: &str| field(stats, k);
    assert_eq!(get("returns"), get("hits"), "{stats}");
    assert_eq!(get("nmissed"), 0);
    assert_text_restored(&out);
}

fn return_probes_on_two_vcpus_see_every_return_once() {
    // Two vCPUs entering the same function at once: every return is seen exactly once.
    let out = run_probed(
        "2",
        "getpid-loop 2000 & getpid-loop 2000 & wait",
        &[&format!("r:hv/gp {} ret=$retval:s32", sys("getpid"))],
        &["--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let line = summary_line(&out, &sys("getpid"));
    let get = |k: &str| field(line, k);
    assert!(
        (4000..=4000 + OTHER_GETPID_CALLERS).contains(&get("hits")),
        "{line}"
    );
    assert_eq!(get("returns"), get("hits"), "{line}");
    assert_eq!(get("nmissed"), 0, "{line}");
    assert_text_restored(&out);
}

fn a_return_probe_on_exec_returns_through_the_new_address_space() {
    // bprm_execve returns under the page tables of the program it loaded (an mm created after
    // planting): the trampoline must be mapped there too, or the guest oopses at its address.
    // With it in PGD 511's shared PUD table, every return comes back.
    let out = run_probed(
        "1",
        "fork-exec-loop 30; ls / | wc -l",
        &["r:hv/ex bprm_execve ret=$retval:s32"],
        &["--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_has(&text(&out.stdout), "fork-exec-loop: runs=30 ok=30", &out);
    let line = summary_line(&out, "bprm_execve");
    let get = |k: &str| field(line, k);
    assert!(get("hits") >= 31, "{line}");
    assert_eq!(get("returns"), get("hits"), "{line}");
    assert_eq!(get("nmissed"), 0, "{line}");
    let console = text(&out.stdout);
    for bad in ["BUG:", "Oops", "WARNING:", "Kernel panic"] {
        assert!(
            !console.contains(bad),
            "{bad} in the guest console\n{}",
            explain(&out)
        );
    }
    assert_text_restored(&out);
}

fn return_probes_on_schedule_and_the_timer_tick_see_kworkers_and_irq_stacks_return() {
    // Kernel threads sleep in schedule() and return from it on whatever page tables the
    // task before them left loaded (they have no mm of their own): every return must still
    // reach the trampoline. Tasks asleep at the end are live instances, not misses.
    let out = run_probed(
        "2",
        "sleep 0.3; fork-exec-loop 10; sync; echo done",
        &["r:hv/sch schedule c=$comm", "r:hv/tick tick_sched_timer"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(&stdout, "fork-exec-loop: runs=10 ok=10", &out);
    assert_has(&stdout, "\ndone", &out);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("kworker/") && l.contains("(worker_thread+0x")),
        "no kworker returned from schedule\n{}",
        explain(&out)
    );
    let line = summary_line(&out, "schedule");
    let get = |k: &str| field(line, k);
    assert!(get("returns") >= 20, "{line}");
    assert!(get("returns") + get("nmissed") <= get("hits"), "{line}");
    assert_eq!(get("handler_errors"), 0, "{line}");
    // The timer tick returns on the IRQ stack (a page-aligned vmap area) while tasks return
    // on theirs: none of its frames is retired for another stack's return.
    let line = summary_line(&out, "tick_sched_timer");
    let get = |k: &str| field(line, k);
    assert!(get("hits") >= 1, "{line}");
    assert!(get("returns") + 2 >= get("hits"), "{line}");
    assert_eq!(get("nmissed"), 0, "{line}");
    assert_text_restored(&out);
}

fn an_instruction_with_an_exception_table_entry_is_refused_by_name() {
    // copy_user_enhanced_fast_string's `rep movsb` faults on bad user pointers and is fixed up
    // through __ex_table; a copy of it in a slot would oops the guest instead.
    let k = KernelText::load();
    let rep = k.find("copy_user_enhanced_fast_string", |i| {
        i.text.starts_with("rep movsb")
    });
    let out = run_probed("1", "echo SHOULD-NOT-RUN", &["__x64_sys_getpid", &rep], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    assert_has(&text(&out.stderr), "exception table (__ex_table)", &out);
    assert!(
        !text(&out.stdout).contains("SHOULD-NOT-RUN\n"),
        "{}",
        explain(&out)
    );
    assert_text_restored(&out);
}

fn a_guest_kernel_fault_report_while_probes_are_in_fails_the_run_and_names_the_probes() {
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
    let stderr = text(&out.stderr);
    assert_has(
        &stderr,
        "the guest kernel reported a fault while probes were in: WARNING: CPU: 0 PID: 1 at hvprobe/fault-test.c:1",
        &out,
    );
    assert_has(&stderr, "probes in at the time:", &out);
    assert_has(&stderr, &format!("  {} at 0x", sys("getpid")), &out);
    assert_text_restored(&out);
}

fn boundaries_are_walked_past_instructions_capstone_lacks_and_stop_at_a_guest_breakpoint() {
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
    let stderr = text(&out.stderr);
    assert_has(
        &stderr,
        &format!(
            "skipped refused probe: {inside}: offset {:#x} is not on an instruction boundary",
            kp_off + 1
        ),
        &out,
    );
    assert_has(&stderr, &format!("skipped refused probe: {at}: "), &out);
    assert_has(&stderr, "is at the guest's own kprobe at", &out);
    assert_eq!(out.probe(&after).location, after);
    assert_text_restored(&out);
}

fn bad_user_pointers_through_probed_user_copy_paths_fail_with_efault_and_the_guest_is_fine() {
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
    let stderr = text(&out.stderr);
    let skipped = stderr
        .lines()
        .filter(|l| l.starts_with("hvprobe: skipped refused probe: "))
        .count();
    let slot_exceptions = out.summary().exits.slot_exceptions;
    match guest_arch() {
        GuestArch::X86_64 => assert!(
            stderr.contains("exception table (__ex_table)"),
            "{}",
            explain(&out)
        ),
        // 30 runs, each with at least four bad pointers faulting in a probed user access
        // (read into and write from an unmapped page, the NULL names, stat and getcwd into
        // an unmapped page), every fault rewound.
        GuestArch::Aarch64 => {
            assert!(
                !stderr.contains("exception table (__ex_table)"),
                "{}",
                explain(&out)
            );
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
    for l in stderr.lines().filter(|l| l.starts_with("hvprobe: skipped")) {
        eprintln!("user-copy: {l}");
    }
    assert_text_restored(&out);
}

fn max_active_exhausted_counts_misses_and_the_guest_is_unharmed() {
    // Two sleeps blocked inside hrtimer_nanosleep at once, one instance allowed.
    let out = run_probed(
        "1",
        "sleep 1 & sleep 1 & wait; echo both-slept",
        &["r1:hv/sleep hrtimer_nanosleep ret=$retval"],
        &["--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(&stdout, "both-slept", &out);
    let line = summary_line(&out, "hrtimer_nanosleep");
    let get = |k: &str| field(line, k);
    // The two concurrent sleeps (and any other nanosleep in the guest, e.g. at shutdown):
    // every entry is either returned through or counted as missed, and at least one missed.
    assert!(get("hits") >= 2, "{line}");
    assert!(get("nmissed") >= 1, "{line}");
    assert_eq!(get("returns") + get("nmissed"), get("hits"), "{line}");
    assert_text_restored(&out);
}

fn output_file_takes_hit_lines_summary_and_retval_histogram() {
    // `-o FILE`: hit lines, the summary and the `--hist` histogram go to the file, the guest
    // console stays on stdout. The histogram of do_sys_openat2's return: 20 opens give fd 3,
    // two opens of missing files give -ENOENT.
    let file = std::env::temp_dir().join(format!("hvprobe-trace-{}", std::process::id()));
    let out = run_probed(
        "1",
        "getpid-loop 3; open-read-loop 20 /etc/passwd; cat /missing-1 /missing-2 2>/dev/null; echo cat=$?",
        &["r:hv/open do_sys_openat2 fd=$retval:s32", &sys("getpid")],
        &["--hist", "-o", file.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(&stdout, "open-read-loop: path=/etc/passwd opens=20", &out);
    assert_has(&stdout, "cat=1", &out);
    assert!(
        !stdout.contains("hv/open") && !stdout.contains("hvprobe: probe "),
        "trace lines stayed off stdout\n{}",
        explain(&out)
    );
    let trace = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(!trace.contains('\r'), "the file has the bytes as written");
    // Every line of the file is a trace line, a summary line or the histogram.
    let opens = trace.lines().filter(|l| l.contains(": hv/open: (")).count() as u64;
    let summary = trace
        .lines()
        .find(|l| l.starts_with("hvprobe: probe do_sys_openat2 at "))
        .unwrap_or_else(|| panic!("no summary in the file\n{trace}"));
    assert_eq!(opens, line_field(summary, "returns"), "{trace}");
    assert!(
        trace.contains("hvprobe: kernel text hash") && trace.contains("(restored byte-for-byte)")
    );
    let (_, hist) = trace
        .split_once("hvprobe: histogram of hv/open fd ($retval of do_sys_openat2), ")
        .unwrap_or_else(|| panic!("no histogram\n{trace}"));
    let total: u64 = hist.split(' ').next().unwrap().parse().unwrap();
    assert_eq!(total, line_field(summary, "returns"), "{trace}");
    let row = |label: &str| -> u64 {
        hist.lines()
            .find(|l| l.starts_with(label))
            .and_then(|l| l[label.len()..].split_whitespace().next())
            .map_or(0, |n| n.parse().unwrap())
    };
    // fd 3 for each open of the loop (and maybe a few other opens of low fds).
    assert!(row("[2, 4) ") >= 20, "{hist}");
    assert!(row("-2 (ENOENT) ") >= 2, "{hist}");
    assert!(
        trace
            .lines()
            .any(|l| l.starts_with("hit ") && l.contains(&format!(" {} ", sys("getpid")))),
        "{trace}"
    );
}

fn json_output_gives_one_object_per_hit() {
    let out = run_probed(
        "1",
        "open-read-loop 1 /etc/passwd",
        &[
            &format!(
                "p:hv/open do_sys_openat2 dfd={}:s32 name=+0($arg2):ustring",
                arg_register(1)
            ),
            "r:hv/rd ksys_read n=$retval:s64",
        ],
        &["--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    let objects: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let open = objects
        .iter()
        .find(|o| o["event"] == "hv/open" && o["args"]["name"] == "/etc/passwd")
        .unwrap_or_else(|| panic!("no open of /etc/passwd\n{}", explain(&out)));
    assert_eq!(open["comm"], "open-read-loop");
    assert_eq!(open["args"]["dfd"], -100);
    assert_eq!(open["return"], false);
    assert!(open["pid"].as_u64().unwrap() > 1 && open["pid"] == open["tgid"]);
    // It read the 30-byte file: a return object from the same process says so.
    let read = objects
        .iter()
        .find(|o| o["event"] == "hv/rd" && o["pid"] == open["pid"] && o["args"]["n"] == 30)
        .unwrap_or_else(|| panic!("no read of 30 bytes\n{}", explain(&out)));
    assert_eq!(read["return"], true);
    assert!(
        read["location"]
            .as_str()
            .unwrap()
            .ends_with(" <- ksys_read")
    );
    assert_text_restored(&out);
}

fn a_task_filter_reports_only_the_matching_task() {
    let out = run_probed(
        "1",
        "cat /etc/passwd > /dev/null; open-read-loop 2 /etc/passwd",
        &["p:hv/o do_sys_openat2 n=+0($arg2):ustring if comm == \"open-read-loop\""],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    let events: Vec<&str> = stdout.lines().filter(|l| l.contains(" hv/o: (")).collect();
    assert_eq!(events.len(), 2, "{}", explain(&out));
    assert!(
        events.iter().all(|l| l.starts_with("open-read-loop-")),
        "{events:?}"
    );
    // cat, the shell and init opened files too: counted, not reported.
    let (_, hits, _, _) = summary(&out, "do_sys_openat2");
    assert!(hits > 2, "hits {hits}");
    assert_text_restored(&out);
}

/// splitmix64: a small seeded generator, so that a sweep can be replayed from its seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A number from the environment, or `default`.
fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The workload of the sweeps: forks, execs, opens, reads, writes, pipes, sleeps, and a
/// line that says every part finished with the right result.
const SWEEP_WORKLOAD: &str = "fork-exec-loop 10; open-read-loop 20 /etc/passwd; \
     echo hello > /tmp/f; n=$(cat /tmp/f | wc -c); sleep 0.2; l=$(ls / | wc -l); \
     getpid-loop 100; echo sweep-result bytes=$n entries=$l";

fn a_random_sweep_of_instruction_boundaries_leaves_the_guest_working() {
    // N random instruction boundaries anywhere in the kernel's text (decoded from vmlinux,
    // so alternatives may have changed a few: those are refused or planted at the running
    // instruction), planted at once with --skip-refused. Replay a failure with the printed
    // HVPROBE_SWEEP_SEED (and HVPROBE_SWEEP_N).
    let k = KernelText::load();
    let hot_prefixes = [
        "do_sys_",
        "vfs_",
        "ksys_",
        "__x64_sys_",
        "path_",
        "link_path_walk",
        "do_filp_open",
        "copy_process",
        "kernel_clone",
        "do_exit",
        "do_wait",
        "wait_consider_task",
        "bprm_",
        "load_elf_binary",
        "begin_new_exec",
        "pipe_",
        "anon_pipe",
        "__schedule",
        "schedule",
        "hrtimer_",
        "do_nanosleep",
        "mmap_region",
        "do_mmap",
        "handle_mm_fault",
        "do_user_addr_fault",
        "filemap_",
        "generic_file_",
        "shmem_",
        "dput",
        "d_alloc",
        "lookup_fast",
        "walk_component",
        "copy_page_range",
        "unmap_page_range",
        "do_wp_page",
        "do_anonymous_page",
        "wake_up_new_task",
        "try_to_wake_up",
        "enqueue_task_fair",
        "dequeue_task_fair",
        "update_curr",
        "tick_",
        "irq_",
        "__handle_irq",
        "exit_mmap",
        "fd_install",
        "alloc_fd",
        "__fput",
        "fput",
        "new_sync_",
        "tty_",
        "n_tty_",
        "serial8250_",
    ];
    let d = Decoder::new().unwrap();
    random_sweep(
        &k.map,
        0x5eed_0001,
        300,
        &hot_prefixes,
        &[],
        |start, end| {
            let code = k.bytes(start, (end - start) as usize);
            let mut at = 0usize;
            let mut boundaries = Vec::new();
            while at < code.len() {
                let Ok(insn) = d.decode(&code[at..], start + at as u64) else {
                    break;
                };
                boundaries.push((start + at as u64, insn.text.clone()));
                at += insn.len();
            }
            boundaries
        },
    );
}

/// Functions open-read-loop calls, for the kprobe reference sweep.
const OPEN_READ_FUNCTIONS: [&str; 37] = [
    "do_sys_openat2",
    "do_filp_open",
    "path_openat",
    "link_path_walk",
    "getname_flags",
    "putname",
    "alloc_empty_file",
    "do_dentry_open",
    "fd_install",
    "alloc_fd",
    "ksys_read",
    "vfs_read",
    "__fdget_pos",
    "__fget_light",
    "fput",
    "close_fd",
    "filp_close",
    "filemap_read",
    "touch_atime",
    "rw_verify_area",
    "security_file_open",
    "lookup_fast",
    "walk_component",
    "step_into",
    "complete_walk",
    "terminate_walk",
    "may_open",
    "vfs_open",
    "generic_permission",
    "inode_permission",
    "dput",
    "kmem_cache_alloc",
    "kmem_cache_free",
    "copy_page_to_iter",
    "_copy_to_user",
    "strncpy_from_user",
    "__fput",
];

/// The functions of [`OPEN_READ_FUNCTIONS`] this kernel has (one symbol of the name, with a
/// known size), with their address and size.
fn open_read_functions(map: &SymbolMap) -> Vec<(&'static str, u64, u64)> {
    OPEN_READ_FUNCTIONS
        .iter()
        .filter_map(|&f| {
            let sym = map.lookup(f).ok()?;
            Some((f, sym.addr, map.size_of(sym)?))
        })
        .collect()
}

/// x86_64 picks for the kprobe reference sweep: (function, offset of a random instruction of
/// its entry block past the first, whether a jump lands in (0, offset]), for functions traced
/// through ftrace (the first instruction calls `__fentry__`, so the guest's kprobe on the entry
/// uses no int3).
fn x86_64_entry_block_picks(rng: &mut SplitMix) -> Vec<(String, u64, bool)> {
    let k = KernelText::load();
    let fentry = k.map.lookup("__fentry__").unwrap().addr;
    let mut picks = Vec::new();
    for (func, addr, size) in open_read_functions(&k.map) {
        let insns: Vec<(u64, Instruction)> = k
            .function(func)
            .into_iter()
            .take_while(|(off, _)| *off < size)
            .collect();
        // Traced through ftrace: the first instruction is the call to __fentry__.
        if insns.first().map(|(_, i)| i.text.clone()) != Some(format!("call {fentry:#x}")) {
            continue;
        }
        let mut entry_block = Vec::new();
        for (off, i) in insns.iter().skip(1) {
            if plan_of(i).is_some() {
                entry_block.push(*off);
            }
            let t = &i.text;
            if t.starts_with('j') || t.starts_with("call") || t.starts_with("ret") {
                break;
            }
        }
        if entry_block.is_empty() {
            continue;
        }
        let off = entry_block[rng.below(entry_block.len())];
        let landing = insns.iter().any(|(_, i)| {
            let target = i
                .text
                .strip_prefix('j')
                .and_then(|r| r.split("0x").nth(1))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok());
            target.is_some_and(|t| t > addr && t <= addr + off)
        });
        picks.push((func.to_string(), off, landing));
    }
    picks
}

/// arm64 picks for the kprobe reference sweep, as [`x86_64_entry_block_picks`]: the entry
/// block runs from the second instruction to the first branch; the guest's own kprobe on the
/// function is a BRK at its first instruction (arm64 6.1 has no kprobes on ftrace), which
/// hvprobe hands back.
fn arm64_entry_block_picks(rng: &mut SplitMix) -> Vec<(String, u64, bool)> {
    use probe_core::arch::aarch64::{Emulation, classify, exclusive_window, out_of_line};
    let k = Arm64Text::load();
    let target = |e: &Option<Emulation>| match e {
        Some(
            Emulation::Branch { target }
            | Emulation::BranchLink { target, .. }
            | Emulation::BranchConditional { target, .. }
            | Emulation::CompareBranch { target, .. }
            | Emulation::TestBranch { target, .. },
        ) => Some(*target),
        _ => None,
    };
    let mut picks = Vec::new();
    for (func, addr, size) in open_read_functions(&k.map) {
        let words = k.words(func, (size / 4) as usize);
        let plans: Vec<Option<Emulation>> = words
            .iter()
            .map(|(off, w)| classify(*w, addr + off))
            .collect();
        let code: Vec<u8> = words.iter().flat_map(|(_, w)| w.to_le_bytes()).collect();
        let mut entry_block = Vec::new();
        for (i, (off, w)) in words.iter().enumerate().skip(1) {
            let plannable = plans[i].is_some() || out_of_line(*w).is_ok();
            if plannable && exclusive_window(&code[..i * 4]).is_none() {
                entry_block.push(*off);
            }
            let branch = target(&plans[i]).is_some()
                || matches!(plans[i], Some(Emulation::BranchRegister { .. }))
                || !plannable;
            if branch {
                break;
            }
        }
        if entry_block.is_empty() {
            continue;
        }
        let off = entry_block[rng.below(entry_block.len())];
        let landing = plans
            .iter()
            .filter_map(&target)
            .any(|t| t > addr && t <= addr + off);
        picks.push((func.to_string(), off, landing));
    }
    picks
}

fn entry_block_probes_count_at_least_what_the_guests_own_kprobes_count() {
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

// ---------------------------------------------------------------------------------------
// arm64 guests (`HVPROBE_TEST_ARCH=aarch64`): the probes the arm64 back end runs today, on
// instructions it emulates on the host, with the rest refused by name.
// ---------------------------------------------------------------------------------------

/// The arm64 default guest's kernel: its symbols and its instruction words.
struct Arm64Text {
    map: SymbolMap,
    elf: Vec<u8>,
}

impl Arm64Text {
    fn load() -> Arm64Text {
        let guest = hvprobe_guest::default_guest_for(GuestArch::Aarch64).expect("arm64 guest");
        let map =
            SymbolMap::parse(&std::fs::read_to_string(guest.kernel.system_map()).unwrap()).unwrap();
        let elf = std::fs::read(guest.kernel.vmlinux()).expect("vmlinux");
        Arm64Text { map, elf }
    }

    /// The instruction words of `func`'s first `n` instructions, with their offsets.
    fn words(&self, func: &str, n: usize) -> Vec<(u64, u32)> {
        let sym = self.map.lookup(func).unwrap_or_else(|e| panic!("{e}"));
        let code = probe_core::elf::bytes_at(&self.elf, sym.addr, n * 4).unwrap();
        code.chunks(4)
            .enumerate()
            .map(|(i, w)| (i as u64 * 4, u32::from_le_bytes(w.try_into().unwrap())))
            .collect()
    }

    /// `func+0xOFF` of every instruction of `func`.
    fn boundaries(&self, func: &str) -> Vec<String> {
        let sym = self.map.lookup(func).unwrap_or_else(|e| panic!("{e}"));
        let size = self.map.size_of(sym).expect("a symbol after it");
        (0..size)
            .step_by(4)
            .map(|off| format!("{func}+{off:#x}"))
            .collect()
    }

    /// `func+0xOFF` of the first instruction after the entry whose plan is `plan`
    /// (`emulate`, `xol`, `refused`).
    fn find(&self, func: &str, plan: &str) -> String {
        use probe_core::arch::aarch64::{classify, out_of_line};
        let sym = self.map.lookup(func).unwrap().addr;
        let (off, _) = self
            .words(func, 256)
            .into_iter()
            .skip(1)
            .find(|(off, w)| {
                let p = match (classify(*w, sym + off), out_of_line(*w)) {
                    (Some(_), _) => "emulate",
                    (None, Ok(())) => "xol",
                    (None, Err(_)) => "refused",
                };
                p == plan
            })
            .unwrap_or_else(|| panic!("no {plan} instruction in {func}"));
        format!("{func}+{off:#x}")
    }
}

fn arm64_getpid_probes_count_every_call_with_one_exit_for_two_chained_probes() {
    let k = Arm64Text::load();
    let second = k.find("__arm64_sys_getpid", "emulate");
    let out = run_probed(
        "1",
        "getpid-loop 2000",
        &["__arm64_sys_getpid", &second],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stderr = text(&out.stderr);
    assert_has(&stderr, "brk exits yes, step yes, hw breakpoints ", &out);
    assert_has(&stderr, "reinjection yes; probes use brk", &out);
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
    // The handlers see every register: the control registers (six reads; the PC came with
    // the exit) and x0-x30 (31), once per exit however many probes were followed into.
    let e = &out.summary().exits;
    let least = 37 * e.breakpoints + 6 * e.reinjected;
    assert!(
        (least..=least + 2 * 37).contains(&e.register_reads),
        "37 per exit: {e:?}"
    );
    out.assert_text_restored();
}

fn arm64_two_vcpus_hitting_one_probe_are_all_counted() {
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
    out.assert_text_restored();
}

fn arm64_definitions_fetch_arguments_and_the_task_on_a_kaslr_guest() {
    arm64_kaslr_definitions(&[]);
}

fn arm64_a_kaslr_guest_on_a_spectre_bhb_cpu_is_probed_like_on_the_default_one() {
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

/// No `nokaslr`: the device tree carries a seed, the kernel moves, the slide is found from
/// VBAR_EL1; a definition with arguments, the task and the symbolized PC.
fn arm64_kaslr_definitions(extra: &[&str]) -> Run {
    let mut args = vec!["--cmdline", "console=ttyS0 panic=-1 quiet loglevel=3"];
    args.extend_from_slice(extra);
    let out = run_probed(
        "1",
        "cat /etc/passwd > /dev/null",
        &["p:hv/open do_sys_openat2 name=+0($arg2):ustring c=$comm dfd=$arg1:s32 at=%pc:symbol"],
        &args,
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_has(
        &text(&out.stdout),
        "hv/open: (do_sys_openat2) name=\"/etc/passwd\" c=\"cat\" dfd=-100 at=\"do_sys_openat2\"",
        &out,
    );
    let slide = out.summary().kaslr_slide.expect("a slide");
    assert_eq!(slide % (64 << 10), 0, "{slide:#x}");
    out.assert_text_restored();
    out
}

fn arm64_hardware_breakpoints_probe_without_touching_text() {
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
    // Without handlers (--quiet) an instruction that touches no general-purpose register
    // costs the six control-register reads per exit (PSTATE, SP_EL0, SP_EL1, TTBR0, TTBR1,
    // TCR; the PC came with the exit), not all thirty-seven, and a write of the PC.
    let e = &out.summary().exits;
    let handled = e.hw_breakpoints + e.reinjected;
    eprintln!(
        "register ioctls: {} reads, {} writes for {handled} exits",
        e.register_reads, e.register_writes
    );
    // (A hardware breakpoint exit that races the removal is no hit: slack of 2.)
    assert!(
        (6 * handled..=6 * (handled + 2)).contains(&e.register_reads),
        "6 per exit: {e:?}"
    );
    assert_eq!(e.register_writes, e.hw_breakpoints, "the PC alone: {e:?}");
    out.assert_text_restored();
}

fn arm64_refusals_name_the_instruction_and_plant_nothing() {
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
    let stderr = text(&out.stderr);
    assert_has(&stderr, "2 probes refused", &out);
    assert_has(&stderr, "refusing to probe `wfi`", &out);
    assert_has(&stderr, "it is a hint that waits", &out);
    assert_has(&stderr, "not on an instruction boundary", &out);
    assert_has(&stderr, "no probe was left in the guest", &out);
    assert!(!text(&out.stdout).contains("SHOULD-NOT-RUN\n"));
    out.assert_text_restored();
}

fn arm64_the_guests_own_kprobe_and_an_hvprobe_probe_on_one_function_both_count() {
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

fn arm64_stepped_instructions_and_return_probes_keep_the_workloads_right() {
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
    assert_eq!(
        out.summary().exits.slot_traps,
        p.hits,
        "one slot BRK per step"
    );
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

/// Prefixes of the functions on the arm64 sweep workload's paths.
const ARM64_SWEEP_HOT_PREFIXES: &[&str] = &[
    "do_sys_",
    "vfs_",
    "ksys_",
    "__arm64_sys_",
    "el0_",
    "el0t_",
    "invoke_syscall",
    "do_el0_svc",
    "path_",
    "link_path_walk",
    "do_filp_open",
    "copy_process",
    "kernel_clone",
    "do_exit",
    "do_wait",
    "bprm_",
    "load_elf_binary",
    "begin_new_exec",
    "pipe_",
    "__schedule",
    "schedule",
    "hrtimer_",
    "do_nanosleep",
    "do_mmap",
    "handle_mm_fault",
    "do_page_fault",
    "filemap_",
    "dput",
    "lookup_fast",
    "walk_component",
    "try_to_wake_up",
    "update_curr",
    "tick_",
    "__fput",
    "alloc_fd",
    "tty_",
    "n_tty_",
    "serial8250_",
];

fn arm64_a_random_sweep_of_instruction_boundaries_leaves_the_guest_working() {
    // N random instructions anywhere in the arm64 kernel's text (every 4 bytes is a boundary),
    // half of them in functions on the workload's paths, planted at once with
    // --skip-refused. Replay with HVPROBE_SWEEP_SEED and HVPROBE_SWEEP_N.
    let k = Arm64Text::load();
    arm64_sweep(&k, ARM64_SWEEP_HOT_PREFIXES, 0x5eed_a064, 250, &[]);
}

fn arm64_a_random_sweep_on_a_spectre_bhb_cpu_leaves_the_guest_working() {
    // The same sweep (its own seed, fewer probes) on QEMU's Neoverse N1, whose kernel takes
    // the Spectre-BHB vectors.
    let k = Arm64Text::load();
    arm64_sweep(
        &k,
        ARM64_SWEEP_HOT_PREFIXES,
        0x5eed_00a1,
        120,
        &["--runner-cpu", "neoverse-n1"],
    );
}

fn arm64_sweep(k: &Arm64Text, hot_prefixes: &[&str], seed: u64, n: u64, extra: &[&str]) {
    let (planted, _, hit) = random_sweep(&k.map, seed, n, hot_prefixes, extra, |start, end| {
        (start..end)
            .step_by(4)
            .map(|va| (va, String::new()))
            .collect()
    });
    // Half land in functions on the workload's paths and some of those get hit: 250 give 10.
    assert!(
        hit >= planted as u64 / 25,
        "{hit} of the {planted} planted probes were hit"
    );
}

/// Plants `HVPROBE_SWEEP_N` (default `n`) random instruction boundaries at once
/// (`--skip-refused`, two vCPUs, [`SWEEP_WORKLOAD`]), half anywhere in the kernel's text and
/// half in functions whose names start with one of `hot_prefixes`, each function's boundaries
/// (address, text) given by `boundaries(start, end)`; checks that the guest ran right, that
/// every probe was planted or refused by name, that most were planted and that the text came
/// back. Returns (planted, refused, hit).
fn random_sweep(
    map: &SymbolMap,
    default_seed: u64,
    n: u64,
    hot_prefixes: &[&str],
    extra: &[&str],
    boundaries: impl Fn(u64, u64) -> Vec<(u64, String)>,
) -> (usize, usize, u64) {
    let seed = env_u64("HVPROBE_SWEEP_SEED", default_seed);
    let n = env_u64("HVPROBE_SWEEP_N", n) as usize;
    eprintln!("sweep: HVPROBE_SWEEP_SEED={seed} HVPROBE_SWEEP_N={n}");
    let guest = hvprobe_guest::default_guest_for(guest_arch()).unwrap();
    let map_text = std::fs::read_to_string(guest.kernel.system_map()).unwrap();
    let addr_of = |name: &str| map.lookup(name).unwrap().addr;
    let (stext, etext) = (addr_of("_stext"), addr_of("_etext"));
    let mut funcs: Vec<(u64, &str)> = map_text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let a = u64::from_str_radix(it.next()?, 16).ok()?;
            let kind = it.next()?;
            let name = it.next()?;
            (matches!(kind, "t" | "T") && (stext..etext).contains(&a)).then_some((a, name))
        })
        .collect();
    funcs.sort_unstable();
    funcs.dedup_by_key(|f| f.0);
    let hot: Vec<usize> = (0..funcs.len() - 1)
        .filter(|&i| hot_prefixes.iter().any(|p| funcs[i].1.starts_with(p)))
        .collect();
    let mut rng = SplitMix(seed);
    let mut picks: Vec<(u64, String)> = Vec::new();
    while picks.len() < n {
        let i = if picks.len().is_multiple_of(2) {
            rng.below(funcs.len() - 1)
        } else {
            hot[rng.below(hot.len())]
        };
        let all = boundaries(funcs[i].0, funcs[i + 1].0.min(etext));
        if all.is_empty() {
            continue;
        }
        let (va, text) = &all[rng.below(all.len())];
        if picks.iter().any(|(a, _)| a == va) {
            continue;
        }
        picks.push((*va, format!("{} ({text})", map.describe(*va))));
    }
    let locations: Vec<String> = picks.iter().map(|(va, _)| format!("{va:#x}")).collect();
    let probes: Vec<&str> = locations.iter().map(String::as_str).collect();
    let mut args = vec!["--skip-refused", "--quiet"];
    args.extend_from_slice(extra);
    let out = run_probed("2", SWEEP_WORKLOAD, &probes, &args);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    let describe = || {
        picks
            .iter()
            .map(|(va, what)| format!("  {va:#x} {what}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "seed {seed}\n{}\nprobes:\n{}",
        explain(&out),
        describe()
    );
    assert_has(&stdout, "fork-exec-loop: runs=10 ok=10", &out);
    assert_has(&stdout, "sweep-result bytes=6 entries=", &out);
    // Every probe is planted (a summary line) or refused with its reason.
    let (mut planted, mut refused, mut hit) = (0, 0, 0u64);
    for loc in &locations {
        if let Some(p) = out.summary().probes.iter().find(|p| p.location == *loc) {
            planted += 1;
            hit += u64::from(p.hits > 0);
        } else if stderr
            .lines()
            .any(|l| l.starts_with("hvprobe: skipped refused probe: ") && l.contains(loc.as_str()))
        {
            refused += 1;
        } else {
            panic!("{loc}: neither planted nor refused\n{}", explain(&out));
        }
    }
    eprintln!("sweep: seed {seed}: {planted} planted ({hit} hit), {refused} refused of {n}");
    for l in stderr.lines().filter(|l| l.starts_with("hvprobe: skipped")) {
        eprintln!("sweep: {l}");
    }
    assert_eq!(planted + refused, n);
    assert!(
        planted * 2 > n,
        "most boundaries are probed: {planted} of {n}"
    );
    assert_text_restored(&out);
    (planted, refused, hit)
}

/// `mrs Xt, daif` sites (the first instruction of every inlined `local_irq_save`) in `func`:
/// offsets and destination registers.
fn mrs_daif_sites(k: &Arm64Text, func: &str) -> Vec<(u64, u32)> {
    use probe_core::arch::aarch64::MRS_DAIF;
    let sym = k.map.lookup(func).unwrap();
    let size = k.map.size_of(sym).unwrap() as usize;
    k.words(func, size / 4)
        .into_iter()
        .filter(|(_, w)| w & 0xffff_ffe0 == MRS_DAIF && w & 0x1f != 31)
        .map(|(off, w)| (off, w & 0x1f))
        .collect()
}

fn arm64_mrs_daif_reads_the_interrupt_mask_the_guest_had_in_process_and_interrupt_context() {
    // A slot runs with D, A, I and F masked: a copied `mrs daif` read 0x3c0 in every context, and
    // the `local_irq_restore` that followed left the CPU with everything masked. Emulated, it
    // reads the mask of the hit: 0 in process context with interrupts on (queue_work_on from
    // `sync`), I and F (0xc0) in the timer interrupt (hrtimer_interrupt's irqsave lock). The
    // register is fetched at the next instruction, as the guest computed it.
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
        "sync; sleep 2; getpid-loop 200; sync; echo done",
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
    // queue_work_on runs with interrupts on (from `sync`) and off (from the idle task and
    // timer callbacks); hrtimer_interrupt's site, on a path only some ticks take, always off.
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

/// `debug-loop calls N`'s sum: what the guest must print if no probe changed what it computes.
fn debug_loop_sum(n: i64) -> i64 {
    (0..n)
        .map(|x| {
            let y = x * 3 + 1;
            if y & 4 != 0 { y ^ 0x55 } else { y }
        })
        .sum()
}

fn the_guests_own_uprobes_and_hardware_watchpoints_keep_working_beside_hvprobe_probes() {
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

fn arm64_text_that_runs_at_another_address_is_refused_by_name_and_cpu1_comes_back() {
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
    let skipped = &out.summary().skipped;
    assert!(
        skipped
            .iter()
            .any(|s| s.contains("secondary_startup") && s.contains(".idmap.text")),
        "{skipped:?}\n{}",
        explain(&out)
    );
    assert!(out.probe(&getpid).hits >= 10, "{}", explain(&out));
    out.assert_text_restored();
}

/// Functions on the timer tick and the scheduler's paths, in both default kernels.
const HOT_PATHS: &[&str] = &[
    "ktime_get",
    "update_curr",
    "scheduler_tick",
    "hrtimer_interrupt",
    "__hrtimer_run_queues",
    "tick_sched_timer",
    "update_process_times",
    "account_process_tick",
    "rcu_sched_clock_irq",
    "irq_exit_rcu",
    "__schedule",
    "pick_next_task_fair",
    "enqueue_task_fair",
    "try_to_wake_up",
];

fn a_rate_capped_dense_probe_set_on_the_tick_and_scheduler_paths_lets_the_workload_finish() {
    // Each site may take 50 hits a second; past that, its hits count as missed and it is
    // paused until its second is over. The workload must come out right, and no probe may
    // have taken more than its cap over the run's seconds.
    let cap = 50u64;
    let cap_arg = cap.to_string();
    let out = run_probed(
        "2",
        "getpid-loop 3000 & fork-exec-loop 10 & sleep 2; wait",
        HOT_PATHS,
        &["--quiet", "--max-rate", &cap_arg],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(&stdout, "getpid-loop: calls=3000", &out);
    assert_has(&stdout, "fork-exec-loop: runs=10 ok=10", &out);
    let summary = out.summary();
    // Windows start at the first hit of each second the run lasted; two vCPUs opening one at
    // once may each count a hit past the cap.
    let windows = summary.run_s.ceil() as u64 + 1;
    for loc in HOT_PATHS {
        let p = out.probe(loc);
        assert!(
            p.hits <= (cap + 2) * windows,
            "{loc}: {p:?} over {windows} s"
        );
    }
    assert!(summary.exits.rate_capped > 0, "{}", explain(&out));
    let missed: u64 = HOT_PATHS.iter().map(|l| out.probe(l).missed).sum();
    assert!(missed >= summary.exits.rate_capped, "{}", explain(&out));
    out.assert_text_restored();
}

fn main() {
    common::run_suite(
        "probes",
        cases![
            Guests::Any => [
                return_probes_report_every_return_with_its_value,
                return_probes_on_two_vcpus_see_every_return_once,
                a_return_probe_on_exec_returns_through_the_new_address_space,
                return_probes_on_schedule_and_the_timer_tick_see_kworkers_and_irq_stacks_return,
                a_guest_kernel_fault_report_while_probes_are_in_fails_the_run_and_names_the_probes,
                bad_user_pointers_through_probed_user_copy_paths_fail_with_efault_and_the_guest_is_fine,
                max_active_exhausted_counts_misses_and_the_guest_is_unharmed,
                output_file_takes_hit_lines_summary_and_retval_histogram,
                json_output_gives_one_object_per_hit,
                a_task_filter_reports_only_the_matching_task,
                entry_block_probes_count_at_least_what_the_guests_own_kprobes_count,
                the_guests_own_uprobes_and_hardware_watchpoints_keep_working_beside_hvprobe_probes,
                a_rate_capped_dense_probe_set_on_the_tick_and_scheduler_paths_lets_the_workload_finish,
            ],
            Guests::Only(GuestArch::X86_64) => [
                a_getpid_probe_counts_the_workload_calls_and_prints_each_hit,
                two_vcpus_hitting_one_probe_are_all_counted,
                every_step_plan_keeps_the_kernel_computing_right_results,
                the_guest_kprobe_and_an_hvprobe_probe_on_one_function_both_count,
                the_guests_own_int3_kprobe_keeps_working_beside_an_hvprobe_probe_in_the_same_function,
                ring0_flag_instructions_are_emulated_in_the_running_kernel,
                hardware_breakpoints_probe_without_touching_text,
                bad_probes_are_refused_and_leave_the_guest_unchanged,
                every_refused_probe_is_named_in_one_pass_and_skip_refused_plants_the_rest,
                kprobe_event_definitions_fetch_arguments_from_guest_memory,
                a_kaslr_guest_is_probed_like_a_nokaslr_one,
                an_instruction_with_an_exception_table_entry_is_refused_by_name,
                boundaries_are_walked_past_instructions_capstone_lacks_and_stop_at_a_guest_breakpoint,
                a_random_sweep_of_instruction_boundaries_leaves_the_guest_working,
            ],
            Guests::Only(GuestArch::Aarch64) => [
                arm64_getpid_probes_count_every_call_with_one_exit_for_two_chained_probes,
                arm64_two_vcpus_hitting_one_probe_are_all_counted,
                arm64_definitions_fetch_arguments_and_the_task_on_a_kaslr_guest,
                arm64_a_kaslr_guest_on_a_spectre_bhb_cpu_is_probed_like_on_the_default_one,
                arm64_hardware_breakpoints_probe_without_touching_text,
                arm64_refusals_name_the_instruction_and_plant_nothing,
                arm64_the_guests_own_kprobe_and_an_hvprobe_probe_on_one_function_both_count,
                arm64_stepped_instructions_and_return_probes_keep_the_workloads_right,
                arm64_a_random_sweep_of_instruction_boundaries_leaves_the_guest_working,
                arm64_a_random_sweep_on_a_spectre_bhb_cpu_leaves_the_guest_working,
                arm64_mrs_daif_reads_the_interrupt_mask_the_guest_had_in_process_and_interrupt_context,
                arm64_text_that_runs_at_another_address_is_refused_by_name_and_cpu1_comes_back,
            ],
        ],
    );
}
