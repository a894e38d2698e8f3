//! The jump plan (no exit per hit): the default `--plan auto` against `--plan exit` on the same
//! workloads and sites, a full ring, a seeded sweep of jump-eligible sites.

use super::sweeps::x86_boundaries;
use super::*;
use probe_core::arch::PlanKind;

/// Functions every `open-read-loop` iteration calls (open, read, close), in the default
/// kernels (the syscall entries by their names on the guest's architecture: `sys`).
const OPEN_READ_PATH: &[&str] = &[
    "openat",
    "do_sys_openat2",
    "getname_flags",
    "do_filp_open",
    "path_openat",
    "link_path_walk",
    "walk_component",
    "lookup_fast",
    "complete_walk",
    "may_open",
    "vfs_open",
    "do_dentry_open",
    "alloc_fd",
    "fd_install",
    "read",
    "ksys_read",
    "vfs_read",
    "rw_verify_area",
    "close",
    "close_fd",
    "filp_close",
    "fput",
    "__fput",
    "dput",
];

/// The event lines of `event` in the run's output.
fn event_lines<'a>(out: &'a str, event: &str) -> Vec<&'a str> {
    out.lines()
        .filter(|l| l.contains(&format!(" {event}: (")))
        .collect()
}

/// An event line's `name=value` fields.
fn fields(line: &str) -> std::collections::HashMap<&str, &str> {
    line.split_once(") ")
        .map_or("", |(_, f)| f)
        .split(' ')
        .filter_map(|f| f.split_once('='))
        .collect()
}

/// [`OPEN_READ_PATH`] with the guest's syscall entry names.
fn open_read_path() -> Vec<String> {
    OPEN_READ_PATH
        .iter()
        .map(|f| {
            if matches!(*f, "openat" | "read" | "close") {
                sys(f)
            } else {
                f.to_string()
            }
        })
        .collect()
}

fn hex(v: &str) -> u64 {
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("{v}"))
}

pub(super) fn a_jump_probe_costs_no_exit_and_its_lines_equal_the_exit_plans() {
    // The same definition on the same workload under both plans: registers, $argN, $stackN,
    // $stack, $comm and a comm filter, all recorded in the guest by the jump plan's
    // trampoline. The values that depend on where the task's stack is (the argument is a
    // pt_regs pointer on it) are compared relative to the stack pointer.
    // The return address: at the top of the stack on x86_64, in x30 on arm64 (whose PSTATE a
    // trampoline does not read whole: not compared there).
    let getpid = sys("getpid");
    let def = match guest_arch() {
        GuestArch::X86_64 => format!(
            "p:hv/gp {getpid} a=$arg1 c=$comm ret=$stack0:symbol sp=$stack ip=%ip:symbol \
             flags=%flags:x64 if comm == \"getpid-loop\""
        ),
        GuestArch::Aarch64 => format!(
            "p:hv/gp {getpid} a=$arg1 c=$comm ret=%x30:symbol sp=$stack ip=%pc:symbol \
             if comm == \"getpid-loop\""
        ),
    };
    let calls = 300;
    let exec = format!("getpid-loop {calls}");
    let [jump, exit] =
        ["auto", "exit"].map(|plan| run_probed("1", &exec, &[&def], &["--plan", plan]));
    let mut lines = Vec::new();
    for (out, plan) in [(&jump, PlanKind::Jump), (&exit, PlanKind::Emulate)] {
        assert_eq!(out.status.code(), Some(0), "{}", explain(out));
        let p = out.probe(&getpid);
        assert_eq!(p.plan, plan, "{}", explain(out));
        assert!(
            (calls..=calls + OTHER_GETPID_CALLERS).contains(&p.hits),
            "hits {}\n{}",
            p.hits,
            explain(out)
        );
        assert_eq!((p.missed, p.handler_errors), (0, 0), "{}", explain(out));
        assert_text_restored(out);
        let stdout = text(&out.stdout);
        let events: Vec<String> = event_lines(&stdout, "hv/gp")
            .into_iter()
            .map(|l| {
                assert!(l.starts_with("getpid-loop-"), "the filter let in {l}");
                let f = fields(l);
                let v = |k: &str| *f.get(k).unwrap_or_else(|| panic!("no {k}= in {l}"));
                // The stack pointer moves with the kernel's per-syscall stack offset
                // (RANDOMIZE_KSTACK_OFFSET); the pt_regs argument is at a fixed place on the
                // task's stack.
                let (a, sp) = (hex(v("a")), hex(v("sp")));
                assert!(sp < a && a - sp < 0x4000, "{l}");
                format!(
                    "c={} ret={} ip={} flags={} a&0x3fff={:#x}",
                    v("c"),
                    v("ret"),
                    v("ip"),
                    f.get("flags").unwrap_or(&"-"),
                    a & 0x3fff
                )
            })
            .collect();
        assert_eq!(events.len() as u64, calls, "{}", explain(out));
        lines.push(events);
    }
    assert_eq!(
        lines[0], lines[1],
        "the jump plan's lines are the exit plan's"
    );
    let caller = match guest_arch() {
        GuestArch::X86_64 => "do_syscall_64+",
        GuestArch::Aarch64 => "invoke_syscall",
    };
    // The entry address by the name the kernel's own traces give it (x86_64:
    // `__do_sys_getpid`, the first of its aliases, as ftrace prints it; arm64: the entry's
    // own name).
    let guest = hvprobe_guest::default_guest_for(guest_arch()).unwrap();
    let map =
        SymbolMap::parse(&std::fs::read_to_string(guest.kernel.system_map()).unwrap()).unwrap();
    let named = map.describe(map.lookup(&getpid).unwrap().addr);
    assert!(
        lines[0][0].starts_with(&format!("c=\"getpid-loop\" ret=\"{caller}"))
            && lines[0][0].contains(&format!(" ip=\"{named}\"")),
        "{}",
        lines[0][0]
    );
    // No exit at all for the jump plan's hits; one each for the exit plan's.
    let (j, e) = (&jump.summary().exits, &exit.summary().exits);
    assert_eq!(j.breakpoints + j.slot_traps + j.hw_breakpoints, 0, "{j:?}");
    assert_eq!(jump.probe(&getpid).exits_per_hit, 0);
    assert!(e.breakpoints >= calls, "{e:?}");
    assert!(
        j.hits_by_plan
            .contains(&(PlanKind::Jump, jump.probe(&getpid).hits)),
        "{j:?}"
    );
}

pub(super) fn a_full_ring_drops_hits_counted_as_missed_and_the_guest_is_unharmed() {
    // Rings of two records and a probe hit as fast as the guest can call getpid: the
    // trampoline finds its ring full, drops the hit and counts it; the guest never waits.
    let calls = 20000;
    let getpid = sys("getpid");
    let out = run_probed(
        "1",
        &format!("getpid-loop {calls}"),
        &[&getpid],
        &["--plan", "auto", "--ring-records", "2", "--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    assert_has(
        &text(&out.stdout),
        &format!("getpid-loop: calls={calls} pid="),
        &out,
    );
    let p = out.probe(&getpid);
    assert_eq!(p.plan, PlanKind::Jump);
    assert!(p.missed > 0, "a ring of 2 never filled\n{}", explain(&out));
    assert!(p.hits > 0, "nothing was recorded\n{}", explain(&out));
    assert!(
        (calls..=calls + OTHER_GETPID_CALLERS).contains(&(p.hits + p.missed)),
        "hits {} + missed {}",
        p.hits,
        p.missed
    );
    let dropped = out.summary().jump_dropped.expect("the jump plan's drops");
    assert_eq!((dropped.full_or_nested, dropped.no_ring), (p.missed, 0));
    assert_has(&text(&out.stdout), "in a full ring or nested", &out);
    assert_text_restored(&out);
}

pub(super) fn a_random_sweep_of_jump_sites_counts_what_the_exit_plan_counts() {
    // The same seeded random instructions of 5 bytes or more (every fentry site is one), half
    // the first instruction of a function on the workload's paths, under both plans, each a definition that reports
    // only the hits of `open-read-loop` (its 20 opens and reads are the same in both boots;
    // the probe counters also count the rest of the guest, whose background work differs
    // between two boots). The guest must run right and the text come back both times; most
    // sites take the jump; each site reports as many hits of the workload as the exit plan.
    let seed = env_u64("HVPROBE_SWEEP_SEED", 0x5eed_0023);
    let n = env_u64("HVPROBE_SWEEP_N", 60) as usize;
    let path = open_read_path();
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    // In the functions on the workload's paths, their first instruction (the fentry site,
    // run at every call); anywhere else, any instruction of 5 bytes or more on x86_64, any
    // instruction on arm64.
    let on_path = |name: String, s: u64, mut sites: Vec<(u64, String)>| {
        if path.iter().any(|p| name.starts_with(p)) {
            sites.retain(|(va, _)| *va == s);
        }
        sites
    };
    let picks = match guest_arch() {
        GuestArch::X86_64 => {
            let k = KernelText::load();
            pick_sites(&k.map, seed, n, &path, |s, e| {
                on_path(k.map.describe(s), s, x86_boundaries(&k, s, e, 5))
            })
        }
        GuestArch::Aarch64 => {
            let k = Arm64Text::load();
            pick_sites(&k.map, seed, n, &path, |s, e| {
                let all = (s..e).step_by(4).map(|va| (va, String::new())).collect();
                on_path(k.map.describe(s), s, all)
            })
        }
    };
    let defs: Vec<String> = picks
        .iter()
        .enumerate()
        .map(|(i, (va, _))| format!("p:hv/s{i} {va:#x} if comm == \"open-read-loop\""))
        .collect();
    let probes: Vec<&str> = defs.iter().map(String::as_str).collect();
    let [jump, exit] = ["auto", "exit"].map(|plan| {
        run_probed(
            "2",
            SWEEP_WORKLOAD,
            &probes,
            &["--skip-refused", "--plan", plan],
        )
    });
    let describe = |i: usize| format!("{:#x} {}", picks[i].0, picks[i].1);
    for out in [&jump, &exit] {
        assert_eq!(out.status.code(), Some(0), "seed {seed}\n{}", explain(out));
        assert_has(&text(&out.stdout), "sweep-result bytes=6 entries=", out);
        assert_text_restored(out);
    }
    let jumps = jump
        .summary()
        .probes
        .iter()
        .filter(|p| p.plan == PlanKind::Jump)
        .count();
    for p in jump.summary().probes.iter().filter(|p| p.no_jump.is_some()) {
        eprintln!("jump sweep: {} takes exits: {:?}", p.location, p.no_jump);
    }
    assert!(
        jumps * 2 > n,
        "{jumps} of {n} sites took the jump\n{}",
        explain(&jump)
    );
    let (jstdout, estdout) = (text(&jump.stdout), text(&exit.stdout));
    let (mut reported, mut differ) = (0, Vec::new());
    for i in 0..n {
        let event = format!("hv/s{i}");
        let (a, b) = (
            event_lines(&jstdout, &event).len(),
            event_lines(&estdout, &event).len(),
        );
        reported += usize::from(a > 0);
        eprintln!("jump sweep: {}: {a} / {b}", describe(i));
        if a != b {
            differ.push(format!("{}: jump plan {a}, exit plan {b}", describe(i)));
        }
    }
    eprintln!(
        "jump sweep: seed {seed:#x}: {jumps} of {n} sites on the jump plan, {reported} reported hits of the workload, {} differ",
        differ.len()
    );
    // A page fault or an interrupt inside the workload's time can add a hit in one boot:
    // allow one site in ten to differ.
    for d in &differ {
        eprintln!("jump sweep: {d}");
    }
    assert!(differ.len() * 10 <= n, "{differ:#?}");
    assert!(
        reported >= 5,
        "only {reported} sites reported hits of the workload"
    );
}
