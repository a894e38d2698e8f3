//! Probes on the real default guest (Debian cloud kernel), through the emulated KVM runner
//! where the host's KVM cannot do the job: counts, every step plan, the guest's own kprobes
//! alongside, removal restoring the text, hardware breakpoints, and bad input.
//!
//! Probe offsets are not hard-coded: they are found by decoding the guest kernel's own
//! vmlinux (from the Debian -dbg package) with probe-core's decoder, so a different kernel
//! build picks its own instructions.

#[path = "../common/mod.rs"]
mod common;
mod counts;
mod disk;
mod guest_debug;
mod integrity;
mod jump;
mod live;
mod output;
mod plans;
mod protect;
mod refusals;
mod returns;
mod rootfs;
mod stacks;
mod sweeps;
mod watch;

use common::{Guests, Run, assert_has, explain, fnv1a, guest_arch, hvprobe, text};
use counts::*;
use disk::*;
use guest_debug::*;
use hvprobe_guest::GuestArch;
use hvprobe_vmm::summary::ProbeSummary;
use integrity::*;
use jump::*;
use live::*;
use output::*;
use plans::*;
use probe_core::arch::x86_64::{Decoder, Instruction, InstructionKind, StepPlan};
use probe_core::symbols::SymbolMap;
use protect::*;
use refusals::*;
use returns::*;
use rootfs::*;
use stacks::*;
use sweeps::*;
use watch::*;

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

/// Runs the guest with `probes`. The tests through here are about the exit plans (each hit a
/// trap: step plans, exit counts, the guest's own debug traps beside ours), so they take
/// `--plan exit` unless `extra` names a plan; the jump plan's tests (`jump.rs`) pass
/// `--plan auto`, the default a user gets.
fn run_probed(vcpus: &str, exec: &str, probes: &[&str], extra: &[&str]) -> Run {
    let mut args = vec!["run", "--vcpus", vcpus, "--exec", exec, "--timeout", "400"];
    for p in probes {
        args.extend(["-p", p]);
    }
    args.extend_from_slice(extra);
    if !extra.contains(&"--plan") {
        args.extend(["--plan", "exit"]);
    }
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

/// A fresh work directory of this test process, named after `name`.
fn work_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hvprobe-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The shell and /init call getpid a few times around the workload; allow for them.
const OTHER_GETPID_CALLERS: u64 = 10;

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

fn arm64_sweep(k: &Arm64Text, hot_prefixes: &[&str], seed: u64, n: u64, extra: &[&str]) {
    let (planted, _, hit, _) = random_sweep(&k.map, seed, n, hot_prefixes, extra, |start, end| {
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

/// `n` distinct random instruction boundaries (address, text) drawn with `seed`: half anywhere
/// in the kernel's text, half in functions whose names start with one of `hot_prefixes`, each
/// function's boundaries given by `boundaries(start, end)`.
fn pick_sites(
    map: &SymbolMap,
    seed: u64,
    n: usize,
    hot_prefixes: &[&str],
    boundaries: impl Fn(u64, u64) -> Vec<(u64, String)>,
) -> Vec<(u64, String)> {
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
    picks
}

/// Plants `HVPROBE_SWEEP_N` (default `n`) random instruction boundaries at once
/// (`--skip-refused`, two vCPUs, [`SWEEP_WORKLOAD`]), half anywhere in the kernel's text and
/// half in functions whose names start with one of `hot_prefixes`, each function's boundaries
/// (address, text) given by `boundaries(start, end)`; checks that the guest ran right, that
/// every probe was planted or refused by name, that most were planted and that the text came
/// back. Returns (planted, refused, hit) and the run.
fn random_sweep(
    map: &SymbolMap,
    default_seed: u64,
    n: u64,
    hot_prefixes: &[&str],
    extra: &[&str],
    boundaries: impl Fn(u64, u64) -> Vec<(u64, String)>,
) -> (usize, usize, u64, Run) {
    let seed = env_u64("HVPROBE_SWEEP_SEED", default_seed);
    let n = env_u64("HVPROBE_SWEEP_N", n) as usize;
    let picks = pick_sites(map, seed, n, hot_prefixes, boundaries);
    let locations: Vec<String> = picks.iter().map(|(va, _)| format!("{va:#x}")).collect();
    let probes: Vec<&str> = locations.iter().map(String::as_str).collect();
    let mut args = vec!["--skip-refused", "--quiet"];
    args.extend_from_slice(extra);
    let out = run_probed("2", SWEEP_WORKLOAD, &probes, &args);
    let stdout = text(&out.stdout);
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
        } else if out.summary().refused.iter().any(|r| r.location == *loc) {
            refused += 1;
        } else {
            panic!("{loc}: neither planted nor refused\n{}", explain(&out));
        }
    }
    eprintln!("sweep: seed {seed}: {planted} planted ({hit} hit), {refused} refused of {n}");
    for r in &out.summary().refused {
        eprintln!("sweep: refused {r}");
    }
    assert_eq!(planted + refused, n);
    assert!(
        planted * 2 > n,
        "most boundaries are probed: {planted} of {n}"
    );
    assert_text_restored(&out);
    (planted, refused, hit, out)
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

/// `debug-loop calls N`'s sum: what the guest must print if no probe changed what it computes.
fn debug_loop_sum(n: i64) -> i64 {
    (0..n)
        .map(|x| {
            let y = x * 3 + 1;
            if y & 4 != 0 { y ^ 0x55 } else { y }
        })
        .sum()
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

fn main() {
    common::run_suite(
        "probes",
        cases![
            Guests::Any => [
                a_live_session_adds_counts_removes_and_detaches_probes_while_the_guest_runs,
                two_clients_stream_at_once_and_stop_ends_the_run,
                churn_adds_and_removes_hundreds_of_probes_while_workloads_run_on_two_vcpus,
                a_stalled_client_loses_events_counted_while_another_gets_every_one,
                functions_the_guests_kprobes_refuse_are_listed_and_probed_and_globs_expand,
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
                stacks_at_hits_are_the_guests_own_stacks_frame_for_frame,
                the_readmes_flame_graph_command_writes_folded_stacks_of_the_syscall_paths,
                a_jump_probe_costs_no_exit_and_its_lines_equal_the_exit_plans,
                a_full_ring_drops_hits_counted_as_missed_and_the_guest_is_unharmed,
                a_random_sweep_of_jump_sites_counts_what_the_exit_plan_counts,
                a_write_watchpoint_reports_the_sysctl_write_of_modprobe_path_by_sh,
                watchpoints_the_hardware_cannot_take_are_refused_and_nothing_changes,
                integrity_finds_a_guest_kprobe_in_kernel_text_and_nothing_on_an_untouched_guest,
                a_denied_write_to_modprobe_path_is_reported_and_dropped_and_an_allowed_one_made,
                a_guest_kprobe_enabled_under_protected_text_is_the_kernels_patcher_and_still_works,
                a_hostname_copied_into_a_protected_page_by_memcpy_reads_back_exactly,
                random_strings_written_to_protected_sysctls_read_back_and_every_byte_is_reported,
                protected_regions_that_cannot_be_had_are_refused_before_any_vm_starts,
                integrity_on_demand_sees_the_guests_kprobe_and_not_hvprobes_own_probe,
                a_file_on_the_disk_reads_back_counted_by_vfs_read_and_a_synced_write_reaches_the_image,
                a_read_only_disk_fails_the_guests_writes_and_its_image_never_changes,
                a_program_built_on_the_host_runs_from_a_share_beside_a_second_disk,
                a_run_killed_mid_write_leaves_an_image_e2fsck_repairs_with_every_synced_file,
                disks_that_cannot_be_used_are_refused_by_name_before_any_vm_starts,
                the_debian_rootfs_boots_systemd_and_its_units_are_probed_from_boot_to_the_command,
                a_given_root_image_keeps_the_guests_synced_writes_and_bad_roots_are_refused,
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
