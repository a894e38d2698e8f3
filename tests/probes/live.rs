//! Live sessions: a VM started with `--api-socket` and no probes, probed, listed, cleaned and
//! detached through the API while its workload runs, the workload's phases driven from its
//! console.

use super::*;
use hvprobe_vmm::api::client::{self, Response};
use hvprobe_vmm::api::{AddReply, DetachReply, ErrorReply, ProbeList, RemoveReply, StatsReply};
use hvprobe_vmm::summary::{OutcomeKind, RunSummary};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// A running `hvprobe run --api-socket`: its console read line by line, its stdin written to
/// the guest's console.
struct LiveVm {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
    socket: PathBuf,
    summary: PathBuf,
}

/// How long a step of the guest may take in the emulated runner.
const STEP: Duration = Duration::from_secs(300);

impl LiveVm {
    fn start(vcpus: &str, exec: &str) -> LiveVm {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hvprobe-live-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let summary = dir.join("summary.json");
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&summary);
        let mut child = Command::new(common::HVPROBE)
            .args(["run", "--arch", guest_arch().name(), "--vcpus", vcpus])
            .args(["--exec", exec, "--timeout", "900", "--quiet"])
            .arg("--api-socket")
            .arg(&socket)
            .arg("--summary-json")
            .arg(&summary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hvprobe starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l.replace('\r', "")).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut s);
            s
        });
        LiveVm {
            child,
            stdin,
            lines,
            seen: Vec::new(),
            stderr,
            socket,
            summary,
        }
    }

    /// Waits until the console shows a line containing `needle`.
    #[track_caller]
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    let _ = self.child.kill();
                    panic!(
                        "no console line with {needle:?}; the console:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// Lets the guest's command go on past its next `read`.
    fn go_on(&mut self) {
        self.stdin.write_all(b"go\n").unwrap();
        self.stdin.flush().unwrap();
    }

    fn api(&self, method: &str, target: &str, body: Option<&str>) -> Response {
        client::request(&self.socket, method, target, body).expect("the API answers")
    }

    /// A 200 reply's body, parsed.
    #[track_caller]
    fn ok<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        target: &str,
        body: Option<&str>,
    ) -> T {
        let r = self.api(method, target, body);
        assert_eq!(r.status, 200, "{method} {target}: {}", r.body);
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
    }

    /// An error reply's status and message.
    fn err(&self, method: &str, target: &str, body: Option<&str>) -> (u16, String) {
        let r = self.api(method, target, body);
        let e: ErrorReply = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{method} {target}: {e}: {}", r.body));
        (r.status, e.error)
    }

    /// Waits for the run to end: exit status, stderr, summary.
    fn finish(mut self) -> (Option<i32>, String, RunSummary, Vec<String>) {
        for l in self.lines.iter() {
            self.seen.push(l);
        }
        let status = self.child.wait().unwrap().code();
        let stderr = self.stderr.join().unwrap();
        let summary = std::fs::read_to_string(&self.summary)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| {
                panic!(
                    "no summary\n{stderr}\n--- console ---\n{}",
                    self.seen.join("\n")
                )
            });
        (status, stderr, summary, self.seen)
    }
}

/// A thread that streams `target` from `vm`'s API until it has `n` lines.
fn collect_lines(vm: &LiveVm, target: &str, n: usize) -> std::thread::JoinHandle<Vec<String>> {
    let (socket, target) = (vm.socket.clone(), target.to_string());
    std::thread::spawn(move || {
        let mut got = Vec::new();
        client::stream(&socket, &target, |l| {
            got.push(l.to_string());
            got.len() < n
        })
        .unwrap();
        got
    })
}

fn add_body(probes: &[&str]) -> String {
    serde_json::json!({ "probes": probes }).to_string()
}

pub(super) fn a_live_session_adds_counts_removes_and_detaches_probes_while_the_guest_runs() {
    let getpid = sys("getpid");
    let mut vm = LiveVm::start(
        "1",
        "echo phase-1; read x; getpid-loop 300; read x; getpid-loop 100; read x; \
         getpid-loop 50; read x; echo the-end",
    );
    vm.wait_for("phase-1");
    // No probes yet; bad requests change nothing.
    let list: ProbeList = vm.ok("GET", "/probes", None);
    assert!(list.probes.is_empty(), "{list:?}");
    assert_eq!(vm.err("PUT", "/probes", Some("{\"probes\":")).0, 400);
    assert_eq!(
        vm.err("PUT", "/probes", Some("{\"probes\":[\"x\"],\"more\":1}"))
            .0,
        400
    );
    assert_eq!(vm.err("DELETE", "/probes/99", None).0, 404);
    assert_eq!(vm.err("GET", "/no-such-endpoint", None).0, 404);
    // An offset inside an instruction and an unknown symbol: refused, each with its reason.
    let inside = format!("{getpid}+0x1");
    let refused = vm.api(
        "PUT",
        "/probes",
        Some(&add_body(&[
            &inside,
            "no_such_function_hvprobe",
            "no_such_glob_hvprobe_*",
        ])),
    );
    assert_eq!(refused.status, 422, "{}", refused.body);
    let refused: AddReply = serde_json::from_str(&refused.body).unwrap();
    assert!(refused.planted.is_empty());
    assert_eq!(refused.refused.len(), 3, "{refused:?}");
    let why = |loc: &str| {
        refused
            .refused
            .iter()
            .find(|r| r.location == loc)
            .map(|r| r.reason.clone())
            .unwrap_or_default()
    };
    assert!(
        why(&inside).contains("not on an instruction boundary"),
        "{refused:?}"
    );
    assert!(
        why("no_such_function_hvprobe").contains("unknown symbol"),
        "{refused:?}"
    );
    assert!(
        why("no_such_glob_hvprobe_*").contains("matches no function"),
        "{refused:?}"
    );

    // Phase 2: 300 calls with the probe in.
    let added: AddReply = vm.ok("PUT", "/probes", Some(&add_body(&[&getpid])));
    assert_eq!(added.planted.len(), 1, "{added:?}");
    let id = added.planted[0].id;
    assert_eq!(added.planted[0].event, getpid);
    vm.go_on();
    vm.wait_for("getpid-loop: calls=300");
    let list: ProbeList = vm.ok("GET", "/probes", None);
    assert_eq!(list.probes.len(), 1);
    let hits = list.probes[0].probe.hits;
    assert!(
        (300..=300 + OTHER_GETPID_CALLERS).contains(&hits),
        "{hits} hits for 300 calls: {list:?}"
    );
    let removed: RemoveReply = vm.ok("DELETE", &format!("/probes/{id}"), None);
    assert_eq!(removed.removed, [id]);

    // Phase 3: 100 calls with no probe; then a definition, added by the command-line client.
    vm.go_on();
    vm.wait_for("getpid-loop: calls=100");
    let socket = vm.socket.to_str().unwrap().to_string();
    let def = format!("p:hv/gp {getpid}");
    let cli = Command::new(common::HVPROBE)
        .args(["probe", "add", "--api-socket", &socket, &def])
        .output()
        .unwrap();
    assert_eq!(cli.status.code(), Some(0), "{}", explain(&cli));
    assert_has(&text(&cli.stdout), "hvprobe: planted probe ", &cli);
    vm.go_on();
    vm.wait_for("getpid-loop: calls=50");
    let list: ProbeList = vm.ok("GET", "/probes", None);
    assert_eq!(list.probes.len(), 1);
    assert_eq!(list.probes[0].event, "hv/gp");
    assert!(
        (50..=50 + OTHER_GETPID_CALLERS).contains(&list.probes[0].probe.hits),
        "{list:?}"
    );
    let stats: StatsReply = vm.ok("GET", "/stats", None);
    assert_eq!(stats.probes, 1);
    assert_eq!(stats.vcpus.len(), 1);
    assert!(stats.changes >= 3, "{stats:?}");
    // Detach: every probe out, the text as it was before the first one; the VM runs on.
    let detached: DetachReply = vm.ok("PUT", "/detach", None);
    assert!(detached.restored && detached.removed == 1, "{detached:?}");
    let list: ProbeList = vm.ok("GET", "/probes", None);
    assert!(list.probes.is_empty());
    vm.go_on();
    vm.wait_for("the-end");
    let (status, stderr, summary, console) = vm.finish();
    assert_eq!(
        status,
        Some(0),
        "{stderr}\n--- console ---\n{}",
        console.join("\n")
    );
    assert_eq!(summary.outcome.kind, OutcomeKind::CommandExited);
    assert!(summary.faults_with_probes.is_empty(), "{summary:?}");
}

pub(super) fn two_clients_stream_at_once_and_stop_ends_the_run() {
    let getpid = sys("getpid");
    let mut vm = LiveVm::start(
        "1",
        "echo ready; read x; getpid-loop 200; read x; sleep 600",
    );
    vm.wait_for("ready");
    let added: AddReply = vm.ok(
        "PUT",
        "/probes",
        Some(&add_body(&[&getpid, &format!("p:hv/gp2 {getpid}")])),
    );
    assert_eq!(added.planted.len(), 2, "{added:?}");
    // Two streams: one of one event in JSON, one of everything as text.
    let json = collect_lines(&vm, "/events?format=json&event=hv/gp2", 200);
    let text_stream = collect_lines(&vm, "/events", 400);
    // Give both streams a moment to subscribe before the calls start.
    std::thread::sleep(Duration::from_secs(2));
    vm.go_on();
    vm.wait_for("getpid-loop: calls=200");
    let json = json.join().unwrap();
    let text = text_stream.join().unwrap();
    assert_eq!(json.len(), 200);
    for l in &json {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert_eq!(v["event"], "hv/gp2", "{l}");
    }
    assert_eq!(text.len(), 400);
    assert!(
        text.iter().any(|l| l.contains("hv/gp2:")),
        "{:?}",
        &text[..4]
    );
    assert!(
        text.iter().any(|l| l.starts_with("hit ")),
        "{:?}",
        &text[..4]
    );
    // Stop: the probes come out as at the end of any run; the VM ends.
    let stop = vm.api("PUT", "/stop", None);
    assert_eq!(stop.status, 200, "{}", stop.body);
    let (status, stderr, summary, _) = vm.finish();
    assert_eq!(status, Some(0), "{stderr}");
    assert_eq!(summary.outcome.kind, OutcomeKind::Stopped);
    assert!(
        summary.text.as_ref().is_some_and(|t| t.restored),
        "{summary:?}"
    );
}

/// `func+0xOFF` of every instruction of `func` in the guest's kernel.
fn boundaries_of(func: &str) -> Vec<String> {
    match guest_arch() {
        GuestArch::X86_64 => KernelText::load().boundaries(func),
        GuestArch::Aarch64 => Arm64Text::load().boundaries(func),
    }
}

/// Rounds of the churn test: `$HVPROBE_CHURN_ROUNDS`, else a dozen (CI's; 24 and more run
/// clean too, see the closing note of issue 21).
fn churn_rounds() -> usize {
    std::env::var("HVPROBE_CHURN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

pub(super) fn churn_adds_and_removes_hundreds_of_probes_while_workloads_run_on_two_vcpus() {
    // Sites on the workloads' paths: every instruction boundary of a few functions (many are
    // refused: that is churn too), and return probes on schedule and bprm_execve, which are
    // removed with instances outstanding (tasks asleep in schedule, an exec under way).
    let mut sites: Vec<String> = Vec::new();
    for f in [
        "do_sys_openat2",
        "ksys_read",
        "vfs_read",
        "kernel_clone",
        "bprm_execve",
    ] {
        sites.extend(boundaries_of(f));
    }
    sites.push(sys("getpid"));
    let seed = std::env::var("HVPROBE_CHURN_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        });
    eprintln!("churn: HVPROBE_CHURN_SEED={seed}");
    let mut rng = SplitMix(seed);
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let read_ok = format!(
        "open-read-loop: path=/etc/passwd opens=3 bytes={} fnv1a={:016x}",
        3 * passwd.len(),
        fnv1a(passwd)
    );
    // No echo of the `go` line: the console's echo can land inside a workload's line.
    let mut vm = LiveVm::start(
        "2",
        "stty -echo 2>/dev/null; echo ready; \
         (while [ ! -e /tmp/stop ]; do fork-exec-loop 2; open-read-loop 3 /etc/passwd; done; echo loop-a-done) & \
         (while [ ! -e /tmp/stop ]; do getpid-loop 200 >/dev/null; sleep 0.1; done; echo loop-b-done) & \
         read x; touch /tmp/stop; wait; echo churn-end",
    );
    vm.wait_for("ready");
    let (mut planted, mut refused, mut outstanding_at_removal) = (0usize, 0usize, 0usize);
    for round in 0..churn_rounds() {
        let mut probes: Vec<String> = (0..10)
            .map(|_| sites[rng.below(sites.len())].clone())
            .collect();
        probes.push(format!("r:hv/rs{round} schedule $retval"));
        probes.push(format!("r:hv/rb{round} bprm_execve $retval"));
        let refs: Vec<&str> = probes.iter().map(String::as_str).collect();
        let r = vm.api("PUT", "/probes", Some(&add_body(&refs)));
        assert!(matches!(r.status, 200 | 422), "{}", r.body);
        let added: AddReply = serde_json::from_str(&r.body).unwrap();
        planted += added.planted.len();
        refused += added.refused.len();
        std::thread::sleep(Duration::from_millis(300 + 50 * rng.below(10) as u64));
        let list: ProbeList = vm.ok("GET", "/probes", None);
        outstanding_at_removal += list.probes.iter().map(|p| p.outstanding).sum::<usize>();
        let removed: RemoveReply = vm.ok("DELETE", "/probes", None);
        assert_eq!(removed.removed.len(), added.planted.len(), "round {round}");
    }
    eprintln!(
        "churn: {} rounds, {planted} probes planted and removed, {refused} refused, {outstanding_at_removal} return instances outstanding at removal",
        churn_rounds()
    );
    assert!(planted >= 10 * churn_rounds(), "{planted} planted");
    assert!(
        outstanding_at_removal > 0,
        "return probes removed with instances out"
    );
    let stats: StatsReply = vm.ok("GET", "/stats", None);
    eprintln!(
        "churn: {} changes, longest vCPU pause {} us, {} return instances still out after the last removal",
        stats.changes, stats.longest_pause_us, stats.returns_outstanding
    );
    vm.go_on();
    vm.wait_for("churn-end");
    let (status, stderr, summary, console) = vm.finish();
    let console = console.join("\n");
    assert_eq!(status, Some(0), "{stderr}\n--- console ---\n{console}");
    assert_eq!(
        summary.outcome.kind,
        OutcomeKind::CommandExited,
        "{summary:?}"
    );
    assert!(summary.faults_with_probes.is_empty(), "{summary:?}");
    assert!(
        summary.text.as_ref().is_some_and(|t| t.restored),
        "{summary:?}"
    );
    // Every workload result right.
    let forks: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("fork-exec-loop:"))
        .collect();
    let reads: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("open-read-loop:"))
        .collect();
    assert!(!forks.is_empty() && !reads.is_empty(), "{console}");
    assert!(forks.iter().all(|l| l.contains("runs=2 ok=2")), "{forks:?}");
    assert!(reads.iter().all(|l| *l == read_ok), "{reads:?}");
    assert!(console.contains("loop-a-done") && console.contains("loop-b-done"));
}

pub(super) fn a_stalled_client_loses_events_counted_while_another_gets_every_one() {
    let getpid = sys("getpid");
    // Ten bursts of 2000 hits: more events than every buffer on the way to the stalled client
    // holds (the API's connection window, the sockets), and on the jump plan each burst fits
    // a vCPU's ring, so every hit becomes an event.
    let calls = 2_000;
    let mut vm = LiveVm::start(
        "1",
        &format!(
            "echo ready; read x; for i in 1 2 3 4 5 6 7 8 9 10; do getpid-loop {calls} >/dev/null; sleep 0.1; done; echo bursts-done; sleep 600"
        ),
    );
    vm.wait_for("ready");
    let added: AddReply = vm.ok("PUT", "/probes", Some(&add_body(&[&getpid])));
    assert_eq!(added.planted.len(), 1, "{added:?}");
    let stalled = Arc::new(AtomicBool::new(true));
    // Each client reads until the run ends and its stream with it: one reads one event, then
    // nothing until the workload is over; the other reads as events come.
    let client = |stall: Option<Arc<AtomicBool>>| {
        let socket = vm.socket.clone();
        std::thread::spawn(move || {
            let (mut events, mut lost) = (0u64, 0u64);
            // The stalled one's queue is small, so that a short workload overflows it.
            let target = if stall.is_some() {
                "/events?queue=64"
            } else {
                "/events"
            };
            client::stream(&socket, target, |l| {
                while stall.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                match l.strip_prefix("lost=") {
                    Some(n) => lost += n.parse::<u64>().unwrap(),
                    None => events += 1,
                }
                true
            })
            .unwrap();
            (events, lost)
        })
    };
    let slow = client(Some(stalled.clone()));
    let fast = client(None);
    std::thread::sleep(Duration::from_secs(2));
    let before: StatsReply = vm.ok("GET", "/stats", None);
    vm.go_on();
    vm.wait_for("bursts-done");
    let after: StatsReply = vm.ok("GET", "/stats", None);
    stalled.store(false, Ordering::SeqCst);
    // The stalled client catches up; then the run ends, and each stream with what it had.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(vm.api("PUT", "/stop", None).status, 200);
    let (slow_events, slow_lost) = slow.join().unwrap();
    let (fast_events, fast_lost) = fast.join().unwrap();
    let (status, stderr, summary, _) = vm.finish();
    assert_eq!(status, Some(0), "{stderr}");
    let hits = summary.probes[0].hits;
    eprintln!(
        "streams: {hits} hits; fast client {fast_events} events, {fast_lost} lost; stalled client {slow_events} events, {slow_lost} lost; {:.0} exits/s while it was stalled",
        (after.exits.breakpoints - before.exits.breakpoints) as f64
            / (after.uptime_s - before.uptime_s)
    );
    // Every hit is an event or a counted loss for each client; the stalled one lost some,
    // the one that kept reading lost none.
    assert_eq!(slow_events + slow_lost, hits);
    assert!(slow_lost > 0, "the stalled client lost nothing");
    assert_eq!((fast_events, fast_lost), (hits, 0));
}

/// A function the guest's own kprobes refuse (the page-fault entry: noinstr on x86_64,
/// NOKPROBE_SYMBOL on arm64) that every fork and exec goes through.
fn fault_entry() -> &'static str {
    match guest_arch() {
        GuestArch::X86_64 => "exc_page_fault",
        GuestArch::Aarch64 => "do_mem_abort",
    }
}

pub(super) fn functions_the_guests_kprobes_refuse_are_listed_and_probed_and_globs_expand() {
    let pf = fault_entry();
    // The listing marks it.
    let list = hvprobe(&["list", "--arch", guest_arch().name(), pf]);
    assert_eq!(list.status.code(), Some(0), "{}", explain(&list));
    assert_has(
        &text(&list.stdout),
        &format!("{pf}  [the guest's kprobes refuse it: "),
        &list,
    );
    // A glob over more than --max-probes: refused whole, nothing runs.
    let many = run_probed("1", "true", &["vfs_*"], &["--max-probes", "5"]);
    assert_eq!(many.status.code(), Some(1), "{}", explain(&many));
    assert_has(&text(&many.stderr), "more than --max-probes 5", &many);
    // The guest's kprobes refuse it; hvprobe probes it while fork, exec and page faults run.
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let out = run_probed(
        "1",
        &format!(
            "echo 'p:kprobes/pf {pf}' >> /sys/kernel/tracing/kprobe_events 2>/dev/null \
             && echo guest-accepted || echo guest-refused; \
             fork-exec-loop 3; open-read-loop 3 /etc/passwd"
        ),
        &[pf, "p:hv/vfs vfs_read*"],
        &["--quiet"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let stdout = text(&out.stdout);
    assert_has(&stdout, "guest-refused", &out);
    assert_has(&stdout, "fork-exec-loop: runs=3 ok=3", &out);
    assert_has(
        &stdout,
        &format!(
            "open-read-loop: path=/etc/passwd opens=3 bytes={} fnv1a={:016x}",
            3 * passwd.len(),
            fnv1a(passwd)
        ),
        &out,
    );
    assert!(out.probe(pf).hits > 0, "{}", explain(&out));
    // One probe per function the glob matches, each named by its function.
    let vfs: Vec<&str> = out
        .summary()
        .probes
        .iter()
        .filter(|p| p.location.starts_with("vfs_read"))
        .map(|p| p.location.as_str())
        .collect();
    assert!(vfs.contains(&"vfs_read") && vfs.len() >= 2, "{vfs:?}");
    assert!(out.probe("vfs_read").hits >= 3, "{}", explain(&out));
    assert!(out.summary().faults_with_probes.is_empty());
    out.assert_text_restored();
}

pub(super) fn integrity_on_demand_sees_the_guests_kprobe_and_not_hvprobes_own_probe() {
    use hvprobe_vmm::summary::IntegritySummary;
    let mut vm = LiveVm::start(
        "1",
        "echo phase-1; read x; cd /sys/kernel/tracing && echo 'p:myp vfs_read' > kprobe_events \
         && echo 1 > events/kprobes/myp/enable && echo phase-2; read x; echo the-end",
    );
    vm.wait_for("phase-1");
    // hvprobe's own probe is in the text, and is not a change of the guest's.
    let added: AddReply = vm.ok("PUT", "/probes", Some(&add_body(&[&sys("getpid")])));
    assert_eq!(added.planted.len(), 1, "{added:?}");
    let clean: IntegritySummary = vm.ok("GET", "/integrity", None);
    assert!(clean.clean, "{clean:?}");
    vm.go_on();
    vm.wait_for("phase-2");
    // The guest's kprobe on vfs_read is.
    let changed: IntegritySummary = vm.ok("GET", "/integrity", None);
    assert!(!changed.clean, "{changed:?}");
    assert!(
        changed
            .changed
            .iter()
            .any(|c| c.region == "text" && c.symbol.contains("vfs_read")),
        "{changed:?}"
    );
    assert!(
        !changed
            .changed
            .iter()
            .any(|c| c.symbol.contains(&sys("getpid"))),
        "{changed:?}"
    );
    vm.go_on();
    vm.wait_for("the-end");
    let (status, stderr, summary, _) = vm.finish();
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        summary.integrity.is_none(),
        "no --integrity, no end-of-run report"
    );
}
