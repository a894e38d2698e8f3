//! kprobe_events definitions, JSON, `-o` files, histograms and task filters.

use super::*;

pub(super) fn kprobe_event_definitions_fetch_arguments_from_guest_memory() {
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
    let def = "p:hv/open do_sys_openat2 x=+8(%di";
    let out = run_probed("1", "true", &[def], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    out.assert_refused(
        def,
        hvprobe_vmm::refusal::RefusalStage::Resolution,
        "bad probe definition at column 34: expected ')'",
    );
}

pub(super) fn arm64_definitions_fetch_arguments_and_the_task_on_a_kaslr_guest() {
    arm64_kaslr_definitions(&[]);
}

pub(super) fn output_file_takes_hit_lines_summary_and_retval_histogram() {
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

pub(super) fn json_output_gives_one_object_per_hit() {
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

pub(super) fn a_task_filter_reports_only_the_matching_task() {
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
