//! The guest console as the VMM sees it: bytes from the serial port go to the user's output
//! unchanged, and complete lines are watched for the default guest's marker lines, for a
//! kernel panic, and for the first line of every oops, BUG, WARN or lockup report the guest
//! kernel prints, so the VMM can report what happened.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hvprobe_guest::rootfs::AUTORUN_MARKER;
use hvprobe_guest::{EXIT_STATUS_MARKER, INIT_READY_MARKER};
use vmm_sys_util::eventfd::EventFd;

/// How many console lines are kept for error reports.
const TAIL_LINES: usize = 40;

/// How many kernel fault reports are kept (the first ones tell the story).
const MAX_FAULTS: usize = 16;

/// Prefixes of the first line of a guest kernel report that something went wrong
/// (`WARN()`, `BUG()`, bad page faults, lockup and stall detectors, x86 and arm64 wording).
const FAULT_PREFIXES: &[&str] = &[
    "BUG: ",
    "kernel BUG at ",
    "WARNING: CPU: ",
    "Oops: ",
    "Oops - ",
    "general protection fault",
    "Unable to handle kernel ",
    "Internal error: ",
    "watchdog: BUG: ",
    "rcu: INFO: rcu_",
    "INFO: task ",
    "Kernel panic - not syncing",
];

/// The console line without the kernel's `[    1.234567] ` time stamp.
fn without_timestamp(line: &str) -> &str {
    let t = line.trim_start();
    if let Some(rest) = t.strip_prefix('[')
        && let Some((stamp, after)) = rest.split_once(']')
        && stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        return after.trim_start();
    }
    t
}

/// Whether `line` (time stamp removed) has the shape of x86's `die()` header:
/// `<what>: <4 hex digits> [#<n>]`, as in `int3: 0000 [#1] PREEMPT SMP NOPTI`.
fn is_die_header(line: &str) -> bool {
    let Some((what, rest)) = line.split_once(": ") else {
        return false;
    };
    let code = rest.get(..4).unwrap_or("");
    !what.is_empty()
        && what
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == ' ')
        && code.len() == 4
        && code.chars().all(|c| c.is_ascii_hexdigit())
        && rest[4..].starts_with(" [#")
}

/// The report line if `line` opens a guest kernel fault report (oops, BUG, WARN, lockup,
/// panic), without its time stamp.
pub fn kernel_fault(line: &str) -> Option<&str> {
    let text = without_timestamp(line);
    (FAULT_PREFIXES.iter().any(|p| text.starts_with(p)) || is_die_header(text)).then_some(text)
}

/// What the console has shown so far.
#[derive(Debug, Default)]
pub struct ConsoleState {
    /// When the default guest's `/init` announced itself.
    pub init_ready_at: Option<Instant>,
    /// When the root file system's autorun unit announced itself (`--rootfs`).
    pub autorun_at: Option<Instant>,
    /// The exit status the guest command reported.
    pub exit_status: Option<i32>,
    /// The first line of a kernel panic, if one was printed.
    pub panic: Option<String>,
    /// The last lines printed.
    pub tail: VecDeque<String>,
    /// Set by the VMM while probes are planted: fault reports seen then are kept in
    /// `faults_with_probes`.
    pub probes_in: bool,
    /// The first line of each guest kernel fault report printed while probes were in.
    pub faults_with_probes: Vec<String>,
    /// Written when `/init` announces itself, to wake the run loop.
    pub init_ready_evt: Option<EventFd>,
    partial: Vec<u8>,
}

impl ConsoleState {
    fn line(&mut self, line: &str) {
        if line.contains(INIT_READY_MARKER) && self.init_ready_at.is_none() {
            self.init_ready_at = Some(Instant::now());
            if let Some(evt) = &self.init_ready_evt {
                let _ = evt.write(1);
            }
        }
        if line.contains(AUTORUN_MARKER) && self.autorun_at.is_none() {
            self.autorun_at = Some(Instant::now());
        }
        if let Some(rest) = line.split(EXIT_STATUS_MARKER).nth(1)
            && let Ok(status) = rest.trim().parse()
        {
            self.exit_status = Some(status);
        }
        if self.panic.is_none() && line.contains("Kernel panic - not syncing") {
            self.panic = Some(line.trim().to_string());
        }
        if self.probes_in
            && self.faults_with_probes.len() < MAX_FAULTS
            && let Some(fault) = kernel_fault(line)
        {
            self.faults_with_probes.push(fault.to_string());
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
    }

    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial.clear();
                self.line(&line);
            } else if self.partial.len() < 4096 {
                self.partial.push(b);
            }
        }
    }
}

/// Shared handle on the console state.
pub type ConsoleWatch = Arc<Mutex<ConsoleState>>;

/// The serial port's output: forwards to `out`, watches lines.
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    watch: ConsoleWatch,
}

impl ConsoleOut {
    /// Forwards to `out` and records what it sees in `watch`.
    pub fn new(out: Box<dyn Write + Send>, watch: ConsoleWatch) -> Self {
        ConsoleOut { out, watch }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .feed(buf);
        // The user's output going away (a closed pipe) must not stop the guest.
        let _ = self.out.write_all(buf);
        if buf.contains(&b'\n') {
            let _ = self.out.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_panics_are_seen_across_split_writes() {
        let watch = ConsoleWatch::default();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        watch.lock().unwrap().init_ready_evt = Some(ready.try_clone().unwrap());
        let mut out = ConsoleOut::new(Box::new(io::sink()), watch.clone());
        out.write_all(b"hello\r\nHVPROBE-INIT-RE").unwrap();
        assert!(ready.read().is_err(), "half a marker wakes nobody");
        out.write_all(b"ADY\r\n[  1.0] Kernel panic - not syncing: VFS\r\n")
            .unwrap();
        assert_eq!(ready.read().unwrap(), 1);
        out.write_all(b"HVPROBE-EXIT-STATUS=7\r\n").unwrap();
        let st = watch.lock().unwrap();
        assert!(st.init_ready_at.is_some());
        assert_eq!(st.exit_status, Some(7));
        assert_eq!(
            st.panic.as_deref(),
            Some("[  1.0] Kernel panic - not syncing: VFS")
        );
        assert_eq!(st.tail.front().unwrap(), "hello");
    }

    #[test]
    fn kernel_fault_reports_are_told_from_ordinary_lines() {
        for (line, report) in [
            (
                "[   12.345678] BUG: kernel NULL pointer dereference, address: 0000000000000000",
                "BUG: kernel NULL pointer dereference, address: 0000000000000000",
            ),
            (
                "[    3.1] WARNING: CPU: 0 PID: 1 at kernel/fork.c:123 copy_process+0x5/0x10",
                "WARNING: CPU: 0 PID: 1 at kernel/fork.c:123 copy_process+0x5/0x10",
            ),
            (
                "[    5.000000] int3: 0000 [#1] PREEMPT SMP NOPTI",
                "int3: 0000 [#1] PREEMPT SMP NOPTI",
            ),
            (
                "general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP",
                "general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP",
            ),
            (
                "[ 9.9] invalid opcode: 0000 [#2] SMP NOPTI",
                "invalid opcode: 0000 [#2] SMP NOPTI",
            ),
            (
                "[ 1.0] kernel BUG at mm/slub.c:400!",
                "kernel BUG at mm/slub.c:400!",
            ),
            (
                "[ 22.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:1]",
                "watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:1]",
            ),
            (
                "[ 1.0] Unable to handle kernel paging request at virtual address 0000000000000008",
                "Unable to handle kernel paging request at virtual address 0000000000000008",
            ),
        ] {
            assert_eq!(kernel_fault(line), Some(report), "{line}");
        }
        for line in [
            "[    0.285562] Speculative Return Stack Overflow: WARNING: See https://kernel.org/doc/html/latest/admin-guide/hw-vuln/srso.html for mitigation options.",
            "[    0.428755] PCI: Fatal: No config space access function found",
            "hello BUG: not at the start",
            "HVPROBE-EXIT-STATUS=0",
            "[    1.844320] reboot: Restarting system",
            "ls: /x: No such file or directory",
            "abc: 12345 [#1]",
        ] {
            assert_eq!(kernel_fault(line), None, "{line}");
        }
    }

    #[test]
    fn faults_are_kept_only_while_probes_are_in() {
        let watch = ConsoleWatch::default();
        let mut out = ConsoleOut::new(Box::new(io::sink()), watch.clone());
        out.write_all(b"[ 0.1] WARNING: CPU: 0 PID: 0 at boot.c:1 x+0x0/0x1\n")
            .unwrap();
        watch.lock().unwrap().probes_in = true;
        out.write_all(b"[ 2.0] BUG: unable to handle page fault for address: ffff\n")
            .unwrap();
        watch.lock().unwrap().probes_in = false;
        out.write_all(b"[ 3.0] Oops: 0002 [#1] SMP\n").unwrap();
        assert_eq!(
            watch.lock().unwrap().faults_with_probes,
            vec!["BUG: unable to handle page fault for address: ffff".to_string()]
        );
    }
}
