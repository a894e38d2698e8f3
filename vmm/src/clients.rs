//! The command-line clients of a live session: `hvprobe probe add|list|remove`, `hvprobe
//! trace`, `hvprobe stats`, `hvprobe detach`, `hvprobe stop`, each talking to the hvprobe at
//! `--api-socket PATH` (docs/api.md). Their output reads like `hvprobe run`'s.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use crate::api::client::{self, Response};
use crate::api::{
    AddReply, DetachReply, FunctionList, ProbeInfo, ProbeList, RemoveReply, StatsReply,
};
use probe_core::catalog::FunctionInfo;

/// Exit status of a client whose request was refused (every probe refused, nothing to
/// remove, a text hash that differs after detach).
pub const EXIT_REFUSED: i32 = 2;

/// `hvprobe probe ...`.
#[derive(Debug, Subcommand)]
pub enum ProbeAction {
    /// Plant probes in the running guest (any form `-p` takes); each is listed planted or
    /// refused with its reason.
    Add {
        /// The running hvprobe's API socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// The probes.
        #[arg(required = true)]
        probes: Vec<String>,
    },
    /// List the probes in, with their counters.
    List {
        /// The running hvprobe's API socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// The reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove probes: by id, every probe of an event, or all.
    Remove {
        /// The running hvprobe's API socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// Probe ids (from `probe list`).
        ids: Vec<u64>,
        /// Every probe of this event (`group/event`, or a bare probe's location).
        #[arg(long, conflicts_with = "ids")]
        event: Option<String>,
        /// Every probe.
        #[arg(long, conflicts_with_all = ["ids", "event"])]
        all: bool,
    },
}

fn check(resp: &Response) -> Result<()> {
    if resp.status != 200 {
        bail!("{} (HTTP {})", resp.error_message(), resp.status);
    }
    Ok(())
}

fn parse<T: serde::de::DeserializeOwned>(resp: &Response) -> Result<T> {
    serde_json::from_str(&resp.body).with_context(|| format!("reading the reply {}", resp.body))
}

/// One probe as `probe list` prints it: its id and spec, then the run summary's probe line
/// (return probes add the instances outstanding).
pub fn probe_line(p: &ProbeInfo) -> String {
    let mut line = format!("probe {} {}: {}", p.id, p.spec, p.probe);
    if p.probe.return_probe {
        line.push_str(&format!(" outstanding={}", p.outstanding));
    }
    line
}

/// Runs `hvprobe probe ACTION`.
pub fn probe(action: ProbeAction) -> Result<i32> {
    match action {
        ProbeAction::Add { api_socket, probes } => {
            let body = serde_json::json!({ "probes": probes }).to_string();
            let resp = client::request(&api_socket, "PUT", "/probes", Some(&body))?;
            if !matches!(resp.status, 200 | 422) {
                check(&resp)?;
            }
            let reply: AddReply = parse(&resp)?;
            for p in &reply.planted {
                println!("hvprobe: planted {}", probe_line(p));
            }
            for r in &reply.refused {
                eprintln!("hvprobe: refused {r}");
            }
            Ok(if reply.planted.is_empty() {
                EXIT_REFUSED
            } else {
                0
            })
        }
        ProbeAction::List { api_socket, json } => {
            let resp = client::request(&api_socket, "GET", "/probes", None)?;
            check(&resp)?;
            if json {
                print!("{}", resp.body);
                return Ok(0);
            }
            let list: ProbeList = parse(&resp)?;
            for p in &list.probes {
                println!("{}", probe_line(p));
            }
            Ok(0)
        }
        ProbeAction::Remove {
            api_socket,
            ids,
            event,
            all,
        } => {
            let targets: Vec<String> = match (event, all) {
                (Some(e), _) => vec![format!("/probes?event={}", percent_encode(&e))],
                (None, true) => vec!["/probes".into()],
                (None, false) if ids.is_empty() => bail!("name probe ids, --event or --all"),
                (None, false) => ids.iter().map(|id| format!("/probes/{id}")).collect(),
            };
            let mut code = 0;
            for t in targets {
                let resp = client::request(&api_socket, "DELETE", &t, None)?;
                if resp.status != 200 {
                    eprintln!("hvprobe: {}", resp.error_message());
                    code = EXIT_REFUSED;
                    continue;
                }
                let reply: RemoveReply = parse(&resp)?;
                for id in reply.removed {
                    println!("hvprobe: removed probe {id}");
                }
            }
            Ok(code)
        }
    }
}

/// `%`-escapes what a query value cannot hold as it is.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs `hvprobe trace`: the events of the running guest from now on, as `hvprobe run`
/// prints them (or its `--json` objects), until interrupted or the VM stops.
pub fn trace(api_socket: &Path, json: bool, events: &[String]) -> Result<i32> {
    let mut target = format!("/events?format={}", if json { "json" } else { "text" });
    if !events.is_empty() {
        let list: Vec<String> = events.iter().map(|e| percent_encode(e)).collect();
        target.push_str(&format!("&event={}", list.join(",")));
    }
    let mut out = std::io::stdout().lock();
    let status = client::stream(api_socket, &target, |line| {
        writeln!(out, "{line}").is_ok() && out.flush().is_ok()
    })?;
    Ok(if status == 200 { 0 } else { 1 })
}

/// Runs `hvprobe stats`.
pub fn stats(api_socket: &Path, json: bool) -> Result<i32> {
    let resp = client::request(api_socket, "GET", "/stats", None)?;
    check(&resp)?;
    if json {
        print!("{}", resp.body);
        return Ok(0);
    }
    let s: StatsReply = parse(&resp)?;
    println!(
        "hvprobe: up {:.1} s, {} probes; exits: {}",
        s.uptime_s,
        s.probes,
        s.exits.counts()
    );
    for (i, v) in s.vcpus.iter().enumerate() {
        println!(
            "hvprobe: vCPU {i}: exits={} hits={} handed_back={}",
            v.debug_exits, v.site_hits, v.handed_back
        );
    }
    println!(
        "hvprobe: changes={} longest vCPU pause {} us, last {} us; return instances outstanding {}",
        s.changes, s.longest_pause_us, s.last_pause_us, s.returns_outstanding
    );
    Ok(0)
}

/// Runs `hvprobe integrity`: the report's lines (or its JSON); 0 when nothing changed.
pub fn integrity(api_socket: &Path, json: bool) -> Result<i32> {
    let resp = client::request(api_socket, "GET", "/integrity", None)?;
    check(&resp)?;
    let s: crate::summary::IntegritySummary = parse(&resp)?;
    if json {
        print!("{}", resp.body);
    } else {
        for l in s.text_lines() {
            println!("{l}");
        }
    }
    Ok(if s.clean { 0 } else { 1 })
}

/// Runs `hvprobe detach`.
pub fn detach(api_socket: &Path) -> Result<i32> {
    let resp = client::request(api_socket, "PUT", "/detach", None)?;
    check(&resp)?;
    let d: DetachReply = parse(&resp)?;
    let hash = |h: Option<u64>| h.map_or("-".into(), |h| format!("{h:#018x}"));
    println!(
        "hvprobe: detached: {} probes removed; kernel text hash before={} after={} ({})",
        d.removed,
        hash(d.text_before),
        hash(d.text_after),
        if d.restored {
            "restored byte-for-byte"
        } else {
            "DIFFERS"
        }
    );
    Ok(if d.restored { 0 } else { EXIT_REFUSED })
}

/// Runs `hvprobe stop`.
pub fn stop(api_socket: &Path) -> Result<i32> {
    let resp = client::request(api_socket, "PUT", "/stop", None)?;
    check(&resp)?;
    println!("hvprobe: stopping the VM");
    Ok(0)
}

/// The running VM's functions matching `pattern` (`GET /functions`).
pub fn functions(api_socket: &Path, pattern: &str) -> Result<Vec<FunctionInfo>> {
    let target = format!("/functions?pattern={}", percent_encode(pattern));
    let resp = client::request(api_socket, "GET", &target, None)?;
    check(&resp)?;
    Ok(parse::<FunctionList>(&resp)?.functions)
}

/// Prints `functions` (`hvprobe list`), one a line: address, name, and what a probe on it
/// meets; a count on stderr. Exit status 1 when nothing matches.
pub fn print_functions(functions: &[FunctionInfo], pattern: &str, json: bool) -> i32 {
    let mut out = std::io::stdout().lock();
    for f in functions {
        let line = if json {
            serde_json::to_string(f).unwrap_or_default()
        } else {
            let note = match (&f.hvprobe_refuses, &f.guest_kprobes_refuse) {
                (Some(why), _) => format!("  [refused: {why}]"),
                (None, Some(why)) => {
                    format!("  [the guest's kprobes refuse it: {why}; hvprobe probes it]")
                }
                (None, None) => String::new(),
            };
            format!("{:#018x} {}{note}", f.address, f.name)
        };
        if writeln!(out, "{line}").is_err() {
            return 0;
        }
    }
    let guest = functions
        .iter()
        .filter(|f| f.guest_kprobes_refuse.is_some() && f.hvprobe_refuses.is_none())
        .count();
    let refused = functions
        .iter()
        .filter(|f| f.hvprobe_refuses.is_some())
        .count();
    eprintln!(
        "hvprobe: {} functions match {pattern}: {guest} the guest's kprobes refuse and hvprobe probes, {refused} hvprobe refuses",
        functions.len()
    );
    i32::from(functions.is_empty())
}
