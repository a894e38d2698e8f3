//! Kernel stack traces at hits, unwound from the host, against the guest's own: ftrace's
//! `stacktrace` trigger on a guest kprobe in the same function, same calls.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// The functions compared: syscall paths of `open-read-loop` and `fork-exec-loop`, the timer
/// tick (interrupt context, on the IRQ stack) and a kworker's (a kernel thread's).
const STACK_FUNCTIONS: &[&str] = &[
    "vfs_read",
    "kernel_clone",
    "update_process_times",
    "process_one_work",
];

/// Whether the arm64 instruction `w` may branch (B, BL, B.cond, CBZ/CBNZ, TBZ/TBNZ, BR/BLR/
/// RET): a site after one might not run on every call.
fn arm64_branches(w: u32) -> bool {
    w & 0x7c00_0000 == 0x1400_0000
        || w & 0xff00_0010 == 0x5400_0000
        || w & 0x7e00_0000 == 0x3400_0000
        || w & 0x7e00_0000 == 0x3600_0000
        || w & 0xfe00_0000 == 0xd600_0000
}

/// Where the guest's kprobe and hvprobe's probe go in `func`: two instructions that run on
/// every call, hvprobe's after the guest's. On x86_64 the guest's is on the entry (ftrace's
/// fentry site) and ours on the next instruction: ORC unwinds from any of them. On arm64 both
/// come after `mov x29, sp` (or `add x29, sp, #N`), as a hit before a function has stored its frame record does not
/// show its caller (Linux's unwinder and ours alike).
fn stack_sites(func: &str) -> (String, String) {
    match guest_arch() {
        GuestArch::X86_64 => {
            let k = KernelText::load();
            let (next, _) = k.function(func)[1];
            (func.to_string(), format!("{func}+{next:#x}"))
        }
        GuestArch::Aarch64 => {
            // `add x29, sp, #imm` (`mov x29, sp` when imm is 0).
            let sets_fp = |w: u32| w & 0xffc0_03ff == 0x9100_03fd;
            let words = Arm64Text::load().words(func, 32);
            let at = words
                .iter()
                .position(|(_, w)| sets_fp(*w))
                .unwrap_or_else(|| panic!("no add x29, sp, #imm in {func}: {words:x?}"));
            assert!(
                !words[..at + 4].iter().any(|(_, w)| arm64_branches(*w)),
                "{func}: a branch before the sites"
            );
            // One instruction apart: the guest's kprobe steps its instruction out of line
            // and comes back to the next one.
            let (g, o) = (words[at + 1].0, words[at + 3].0);
            (format!("{func}+{g:#x}"), format!("{func}+{o:#x}"))
        }
    }
}

/// The function of a `name+0xoff/0xsize` frame.
fn frame_function(frame: &str) -> &str {
    frame.split('+').next().unwrap_or(frame)
}

/// Distinct call chains per probed function, from the frames after the first one in it.
type Chains = BTreeMap<String, BTreeSet<Vec<String>>>;

/// The guest's stacks (`GSTACK f1 f2 ...` lines): per probed function, the frames after the
/// first frame in it (the kprobe's own handler frames come before).
fn guest_chains(stdout: &str) -> Chains {
    let mut out = Chains::new();
    for line in stdout.lines().filter_map(|l| l.strip_prefix("GSTACK ")) {
        let frames: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = frames
            .iter()
            .position(|f| STACK_FUNCTIONS.contains(&frame_function(f)))
        else {
            continue;
        };
        out.entry(frame_function(frames[at]).to_string())
            .or_default()
            .insert(frames[at + 1..].iter().map(|s| s.to_string()).collect());
    }
    out
}

pub(super) fn stacks_at_hits_are_the_guests_own_stacks_frame_for_frame() {
    let sites: Vec<(String, String)> = STACK_FUNCTIONS.iter().map(|f| stack_sites(f)).collect();
    let file = std::env::temp_dir().join(format!("hvprobe-stacks-{}.json", std::process::id()));
    let guest_sites: Vec<&str> = sites.iter().map(|(g, _)| g.as_str()).collect();
    // Kept short: the command travels on the guest's kernel command line. Triggers alone
    // (`stacktrace:N`, the event itself left off) record only N stacks per function: reading
    // symbolized stacks back is slow in the emulated runner's nested guest. Triggers alone do
    // not grow the ring buffer from its boot size (a page per CPU, where stacks overwrite one
    // another): buffer_size_kb does.
    let counts = [40, 20, 30, 10];
    let list: Vec<String> = guest_sites
        .iter()
        .zip(counts)
        .map(|(s, n)| format!("{s}:{n}"))
        .collect();
    let exec = format!(
        "cd /sys/kernel/tracing;echo 1 >options/sym-offset;echo 2048 >buffer_size_kb;i=0;for s in {};do \
         echo \"p:kprobes/g$i ${{s%:*}}\">>kprobe_events&&\
         echo stacktrace:${{s#*:}} >events/kprobes/g$i/trigger||echo kprobe-refused $s;i=$((i+1));\
         done;open-read-loop 20 /etc/passwd;fork-exec-loop 10;sleep 1;\
         for t in events/kprobes/g*/trigger;do echo '!stacktrace' >$t;done;\
         awk '/<stack trace>/{{if(s)print s;s=\"GSTACK\"}}/^ => /{{s=s\" \"$2}}END{{if(s)print s}}' trace|sort -u;\
         cat kprobe_profile",
        list.join(" ")
    );
    let defs: Vec<String> = sites
        .iter()
        .enumerate()
        .map(|(i, (_, ours))| format!("p:hv/s{i} {ours} stacktrace"))
        .collect();
    let probes: Vec<&str> = defs.iter().map(String::as_str).collect();
    let out = run_probed(
        "1",
        &exec,
        &probes,
        &["--json", "-o", file.to_str().unwrap()],
    );
    let trace = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("kprobe-refused"), "{}", explain(&out));
    // Ours: per event, the frames after the hit's own.
    let mut ours = Chains::new();
    let mut unreliable = Vec::new();
    for line in trace.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON event");
        let frames: Vec<String> = v["stack"]
            .as_array()
            .unwrap_or_else(|| panic!("no stack in {line}"))
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        if v["stack_end"] == "unreliable" {
            unreliable.push(line.to_string());
        }
        ours.entry(frame_function(&frames[0]).to_string())
            .or_default()
            .insert(frames[1..].to_vec());
    }
    let guest = guest_chains(&stdout);
    let mut compared = 0;
    for func in STACK_FUNCTIONS {
        let theirs = guest.get(*func).cloned().unwrap_or_default();
        let mine = ours.get(*func).cloned().unwrap_or_default();
        eprintln!(
            "{func}: the guest reported {} distinct stacks, hvprobe {}",
            theirs.len(),
            mine.len()
        );
        // Every function reports: the kworker's too (vmstat's work runs every second).
        assert!(!theirs.is_empty(), "no guest stacks of {func}\n{stdout}");
        for chain in &theirs {
            assert!(
                mine.contains(chain),
                "the guest's stack of {func} is not one of hvprobe's:\n  {}\nhvprobe's:\n{}",
                chain.join("\n  "),
                mine.iter()
                    .map(|c| format!("  {}", c.join(" ")))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            compared += 1;
        }
    }
    // The tick came from interrupt context, the kworker from a kernel thread.
    let tick = &guest["update_process_times"];
    assert!(
        guest["process_one_work"]
            .iter()
            .all(|c| c.last().is_some_and(|f| f.starts_with("ret_from_fork"))),
        "{:?}",
        guest["process_one_work"]
    );
    assert!(
        tick.iter().any(|c| c
            .iter()
            .any(|f| f.contains("interrupt") || f.contains("_irq"))),
        "{tick:?}"
    );
    eprintln!(
        "compared {compared} distinct guest stacks; {} of ours unreliable",
        unreliable.len()
    );
    assert!(unreliable.is_empty(), "{}", unreliable.join("\n"));
    assert_text_restored(&out);
}

pub(super) fn the_readmes_flame_graph_command_writes_folded_stacks_of_the_syscall_paths() {
    let dir = std::env::temp_dir().join(format!("hvprobe-flame-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (folded, svg) = (dir.join("vfs_read.folded"), dir.join("vfs_read.svg"));
    let out = run_probed(
        "1",
        "getpid-loop 100; fork-exec-loop 20",
        // A return probe beside it: its stacks are those of its entries.
        &["p:hv/a vfs_read stacktrace", "r:hv/r ksys_read stacktrace"],
        &[
            "--quiet",
            "--stacks",
            folded.to_str().unwrap(),
            "--flamegraph",
            svg.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let text = std::fs::read_to_string(&folded).unwrap_or_default();
    let picture = std::fs::read_to_string(&svg).unwrap_or_default();
    // A raw BTF section cannot give stacks: refused before any VM starts.
    let raw = dir.join("raw.btf");
    let vmlinux = match guest_arch() {
        GuestArch::X86_64 => KernelText::load().elf,
        GuestArch::Aarch64 => Arm64Text::load().elf,
    };
    std::fs::write(&raw, probe_core::elf::section(&vmlinux, ".BTF").unwrap()).unwrap();
    let refused = hvprobe(&[
        "run",
        "--btf",
        raw.to_str().unwrap(),
        "--stack",
        "-p",
        "vfs_read",
        "--exec",
        "true",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    let hits = out.probe("vfs_read").hits;
    let returns = out.probe("ksys_read").returns;
    let (mut total, mut total_r) = (0, 0);
    for line in text.lines() {
        let (stack, count) = line.rsplit_once(' ').expect("STACK COUNT");
        let count = count.parse::<u64>().expect("a count");
        if stack.starts_with("hv/r;") {
            // The entry's stack: the function itself innermost, its callers outwards.
            assert!(stack.ends_with(";ksys_read"), "{line}");
            total_r += count;
        } else {
            assert!(
                stack.starts_with("hv/a;") && stack.ends_with(";vfs_read"),
                "{line}"
            );
            total += count;
        }
    }
    assert_eq!(total, hits, "every hit's stack is counted once\n{text}");
    assert_eq!(
        total_r, returns,
        "every return's entry stack is counted once\n{text}"
    );
    let path = match guest_arch() {
        GuestArch::X86_64 => "hv/a;entry_SYSCALL_64_after_hwframe;do_syscall_64;ksys_read;vfs_read",
        GuestArch::Aarch64 => {
            "hv/a;el0t_64_sync;el0t_64_sync_handler;el0_svc;do_el0_svc;el0_svc_common.constprop.0;invoke_syscall;__arm64_sys_read;vfs_read"
        }
    };
    assert!(
        text.lines().any(|l| l.starts_with(&format!("{path} "))),
        "{text}"
    );
    assert_eq!(
        out.summary().stacks.iter().map(|s| s.count).sum::<u64>(),
        hits + returns
    );
    assert!(
        picture.contains("<svg") && picture.contains("ksys_read")
            || picture.contains("__arm64_sys_read"),
        "the flame graph"
    );
    assert_eq!(refused.status.code(), Some(1), "{}", explain(&refused));
    assert_has(&text_of(&refused.stderr), "is not an ELF file", &refused);
    assert!(!text_of(&refused.stderr).contains("HVPROBE-INIT-READY"));
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
