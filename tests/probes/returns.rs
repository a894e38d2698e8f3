//! Return probes: every return seen once, across vCPUs, exec and interrupt stacks.

use super::*;

pub(super) fn return_probes_report_every_return_with_its_value() {
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

pub(super) fn return_probes_on_two_vcpus_see_every_return_once() {
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

pub(super) fn a_return_probe_on_exec_returns_through_the_new_address_space() {
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

pub(super) fn return_probes_on_schedule_and_the_timer_tick_see_kworkers_and_irq_stacks_return() {
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

pub(super) fn max_active_exhausted_counts_misses_and_the_guest_is_unharmed() {
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
