//! Live-session figures (a whole-system run, not a timed test): a 2-vCPU default guest
//! started with `--api-socket` and a getpid workload; 1000 probes added to it in one request
//! and removed in one, with the wall time and the vCPUs' pause of each change; then the events
//! a client receives per second from one hot probe. `cargo bench -p hvprobe-vmm --bench live`
//! (`HVPROBE_BENCH_PROBES=N` for another count; `--arch` through `HVPROBE_TEST_ARCH`).

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvprobe_vmm::api::client;
use hvprobe_vmm::api::{AddReply, FunctionList, RemoveReply, StatsReply};

fn main() {
    let arch = std::env::var("HVPROBE_TEST_ARCH").unwrap_or_else(|_| "x86_64".into());
    let count: usize = std::env::var("HVPROBE_BENCH_PROBES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = std::env::temp_dir().join(format!("hvprobe-bench-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hvprobe"))
        .args([
            "run",
            "--arch",
            &arch,
            "--vcpus",
            "2",
            "--quiet",
            "--timeout",
            "3600",
        ])
        .args([
            "--exec",
            "echo bench-ready; while true; do getpid-loop 5000 >/dev/null; done",
        ])
        .arg("--api-socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("hvprobe starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    for l in lines.by_ref() {
        if l.unwrap().contains("bench-ready") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let call = |method: &str, target: &str, body: Option<&str>| {
        let r = client::request(&socket, method, target, body).expect("the API answers");
        assert!(
            matches!(r.status, 200 | 422),
            "{method} {target}: {}",
            r.body
        );
        r.body
    };
    // Functions called rarely (sysfs `*_show` handlers), so that the figures are the
    // changes' and not the hits'.
    let functions: FunctionList =
        serde_json::from_str(&call("GET", "/functions?pattern=*_show", None)).unwrap();
    let mut names: Vec<String> = functions.functions.into_iter().map(|f| f.name).collect();
    names.sort();
    names.dedup();
    names.truncate(count);
    let body = serde_json::json!({ "probes": names }).to_string();
    let t = Instant::now();
    let added: AddReply = serde_json::from_str(&call("PUT", "/probes", Some(&body))).unwrap();
    let add_wall = t.elapsed();
    let after_add: StatsReply = serde_json::from_str(&call("GET", "/stats", None)).unwrap();
    let t = Instant::now();
    let removed: RemoveReply = serde_json::from_str(&call("DELETE", "/probes", None)).unwrap();
    let remove_wall = t.elapsed();
    let after_remove: StatsReply = serde_json::from_str(&call("GET", "/stats", None)).unwrap();
    println!(
        "live: add {} probes ({} planted, {} refused): {:.1} ms wall, vCPUs paused {:.1} ms",
        names.len(),
        added.planted.len(),
        added.refused.len(),
        add_wall.as_secs_f64() * 1e3,
        after_add.last_pause_us as f64 / 1e3
    );
    println!(
        "live: remove {} probes: {:.1} ms wall, vCPUs paused {:.1} ms",
        removed.removed.len(),
        remove_wall.as_secs_f64() * 1e3,
        after_remove.last_pause_us as f64 / 1e3
    );
    // Events a client receives from one hot probe.
    let getpid = match arch.as_str() {
        "aarch64" => "__arm64_sys_getpid",
        _ => "__x64_sys_getpid",
    };
    let body = serde_json::json!({ "probes": [getpid] }).to_string();
    call("PUT", "/probes", Some(&body));
    let window = Duration::from_secs(10);
    let start = Instant::now();
    let mut events = 0u64;
    let mut lost = 0u64;
    client::stream(&socket, "/events", |l| {
        match l.strip_prefix("lost=") {
            Some(n) => lost += n.parse::<u64>().unwrap_or(0),
            None => events += 1,
        }
        start.elapsed() < window
    })
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "live: one client streaming one getpid probe: {:.0} events/s ({events} events, {lost} lost in {secs:.1} s)",
        events as f64 / secs
    );
    // The guest's exits per second with no client, then with one that reads nothing: a
    // stalled client must not slow the guest.
    let exits_per_s = |what: &str| {
        let a: StatsReply = serde_json::from_str(&call("GET", "/stats", None)).unwrap();
        std::thread::sleep(window);
        let b: StatsReply = serde_json::from_str(&call("GET", "/stats", None)).unwrap();
        let rate = (b.exits.breakpoints - a.exits.breakpoints) as f64 / (b.uptime_s - a.uptime_s);
        println!("live: {rate:.0} probe exits/s {what}");
    };
    exits_per_s("with no client streaming");
    let mut stalled = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    std::io::Write::write_all(
        &mut stalled,
        b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .unwrap();
    exits_per_s("with a client streaming that reads nothing");
    drop(stalled);
    exits_per_s("after that client went away");
    call("PUT", "/stop", None);
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
