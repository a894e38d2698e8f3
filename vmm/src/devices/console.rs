//! The guest console as the VMM sees it: bytes from the serial port go to the user's output
//! unchanged, and complete lines are watched for the default guest's marker lines and for a
//! kernel panic, so the VMM can report what happened.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hvprobe_guest::{EXIT_STATUS_MARKER, INIT_READY_MARKER};

/// How many console lines are kept for error reports.
const TAIL_LINES: usize = 40;

/// What the console has shown so far.
#[derive(Debug, Default)]
pub struct ConsoleState {
    /// When the default guest's `/init` announced itself.
    pub init_ready_at: Option<Instant>,
    /// The exit status the guest command reported.
    pub exit_status: Option<i32>,
    /// The first line of a kernel panic, if one was printed.
    pub panic: Option<String>,
    /// The last lines printed.
    pub tail: VecDeque<String>,
    partial: Vec<u8>,
}

impl ConsoleState {
    fn line(&mut self, line: &str) {
        if line.contains(INIT_READY_MARKER) && self.init_ready_at.is_none() {
            self.init_ready_at = Some(Instant::now());
        }
        if let Some(rest) = line.split(EXIT_STATUS_MARKER).nth(1)
            && let Ok(status) = rest.trim().parse()
        {
            self.exit_status = Some(status);
        }
        if self.panic.is_none() && line.contains("Kernel panic - not syncing") {
            self.panic = Some(line.trim().to_string());
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
        let mut out = ConsoleOut::new(Box::new(io::sink()), watch.clone());
        out.write_all(b"hello\r\nHVPROBE-INIT-RE").unwrap();
        out.write_all(b"ADY\r\n[  1.0] Kernel panic - not syncing: VFS\r\n")
            .unwrap();
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
}
