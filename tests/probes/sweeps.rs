//! Seeded random sweeps over instruction boundaries, and rate-capped hot paths.

use super::*;

/// Functions on [`SWEEP_WORKLOAD`]'s paths, where half of an x86_64 sweep's probes go.
pub(super) const X86_SWEEP_HOT_PREFIXES: &[&str] = &[
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

pub(super) fn a_random_sweep_of_instruction_boundaries_leaves_the_guest_working() {
    // N random instruction boundaries anywhere in the kernel's text (decoded from vmlinux,
    // so alternatives may have changed a few: those are refused or planted at the running
    // instruction), planted at once with --skip-refused. Replay a failure with the printed
    // HVPROBE_SWEEP_SEED (and HVPROBE_SWEEP_N).
    let k = KernelText::load();
    random_sweep(
        &k.map,
        0x5eed_0001,
        300,
        X86_SWEEP_HOT_PREFIXES,
        &[],
        |start, end| x86_boundaries(&k, start, end, 1),
    );
}

/// The instruction boundaries of `[start, end)` in the x86_64 kernel's text whose instruction
/// is at least `min_len` bytes long, with its text.
pub(super) fn x86_boundaries(
    k: &KernelText,
    start: u64,
    end: u64,
    min_len: usize,
) -> Vec<(u64, String)> {
    let d = Decoder::new().unwrap();
    let code = k.bytes(start, (end - start) as usize);
    let mut at = 0usize;
    let mut boundaries = Vec::new();
    while at < code.len() {
        let Ok(insn) = d.decode(&code[at..], start + at as u64) else {
            break;
        };
        if insn.len() >= min_len {
            boundaries.push((start + at as u64, insn.text.clone()));
        }
        at += insn.len();
    }
    boundaries
}

pub(super) fn arm64_a_random_sweep_of_instruction_boundaries_leaves_the_guest_working() {
    // N random instructions anywhere in the arm64 kernel's text (every 4 bytes is a boundary),
    // half of them in functions on the workload's paths, planted at once with
    // --skip-refused. Replay with HVPROBE_SWEEP_SEED and HVPROBE_SWEEP_N.
    let k = Arm64Text::load();
    arm64_sweep(&k, ARM64_SWEEP_HOT_PREFIXES, 0x5eed_a064, 250, &[]);
}

pub(super) fn arm64_a_random_sweep_on_a_spectre_bhb_cpu_leaves_the_guest_working() {
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

pub(super) fn a_rate_capped_dense_probe_set_on_the_tick_and_scheduler_paths_lets_the_workload_finish()
 {
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
