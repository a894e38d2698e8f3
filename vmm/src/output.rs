//! Where a run's trace output goes: hit lines and the end-of-run summary, on stdout next to
//! the guest console or in a file (`-o FILE`).
//!
//! On stdout the two streams must not cut into each other. The guest writes its console a
//! byte at a time, and a hit line printed between two bytes of a guest line splits it. So
//! while the console has a line open, hit lines are held back and go out right after the
//! guest ends its line; a line left open longer than [`HOLD_LIMIT`] (a shell prompt, progress
//! dots) stops holding them: they then start on a fresh line.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// How long hit lines wait for the guest to finish a console line.
pub const HOLD_LIMIT: Duration = Duration::from_secs(2);
/// How long console bytes of an unfinished line (a prompt) wait in stdout's line buffer
/// before they are flushed: the guest writes a byte per exit, so flushing at each would cost
/// a system call per byte.
pub const FLUSH_DELAY: Duration = Duration::from_millis(10);

/// The trace output of a run, shared by the vCPU threads (hit lines), the serial port (the
/// console, when it goes to the same terminal) and the end-of-run report.
pub struct TraceOutput {
    state: Mutex<OutputState>,
}

struct OutputState {
    /// Where trace lines go.
    target: Target,
    /// When the console's current line was opened, if it is open.
    console_line_opened: Option<Instant>,
    /// Trace lines waiting for the console line to end.
    held: Vec<u8>,
    /// Since when console bytes of an open line wait in stdout's buffer, if any do.
    unflushed_since: Option<Instant>,
    /// Written when the output starts needing a [`TraceOutput::tick`] (bytes to flush, lines
    /// held), so that the run loop, which sleeps until its next deadline, sets one.
    wake: Option<EventFd>,
}

enum Target {
    /// Stdout, shared with the console.
    Stdout,
    /// A file (or a device such as a serial port) of its own.
    File(BufWriter<File>),
}

impl TraceOutput {
    /// Trace output on stdout, next to the console.
    pub fn stdout() -> Arc<TraceOutput> {
        Self::with_target(Target::Stdout)
    }

    /// Trace output in `path`, created or truncated. A terminal or serial device is put in
    /// raw mode, so the bytes arrive as written.
    pub fn file(path: &Path) -> io::Result<Arc<TraceOutput>> {
        let file = File::create(path)?;
        make_raw_if_tty(file.as_raw_fd());
        Ok(Self::with_target(Target::File(BufWriter::new(file))))
    }

    fn with_target(target: Target) -> Arc<TraceOutput> {
        Arc::new(TraceOutput {
            state: Mutex::new(OutputState {
                target,
                console_line_opened: None,
                held: Vec::new(),
                unflushed_since: None,
                wake: None,
            }),
        })
    }

    /// Has `evt` written each time the output starts needing a [`TraceOutput::tick`] at
    /// [`TraceOutput::next_due`].
    pub fn set_wake(&self, evt: EventFd) {
        self.lock().wake = Some(evt);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutputState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one trace line (`line` ends with a newline), or holds it while the console has a
    /// line open on the same terminal.
    pub fn line(&self, line: &str) {
        let mut st = self.lock();
        match &mut st.target {
            Target::File(f) => {
                // A failing output file must not stop the guest; the report says nothing more.
                let _ = f.write_all(line.as_bytes());
            }
            Target::Stdout => {
                if st
                    .console_line_opened
                    .is_some_and(|t| t.elapsed() < HOLD_LIMIT)
                {
                    if st.held.is_empty() {
                        st.wake();
                    }
                    st.held.extend_from_slice(line.as_bytes());
                    return;
                }
                // The guest left its line open too long, if at all: start on a fresh line.
                let mut out = io::stdout().lock();
                st.release_held(&mut out);
                if st.console_line_opened.take().is_some() {
                    let _ = out.write_all(b"\n");
                }
                let _ = out.write_all(line.as_bytes());
                let _ = out.flush();
            }
        }
    }

    /// Writes guest console bytes to stdout (always stdout, whatever the trace target);
    /// releases held trace lines when the console line ends.
    pub fn console(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut st = self.lock();
        let mut out = io::stdout().lock();
        // The user's output going away (a closed pipe) must not stop the guest.
        let _ = out.write_all(bytes);
        if bytes.ends_with(b"\n") {
            st.console_line_opened = None;
            st.release_held(&mut out);
            let _ = out.flush();
            st.unflushed_since = None;
        } else {
            if st.console_line_opened.is_none() || bytes.contains(&b'\n') {
                st.console_line_opened = Some(Instant::now());
            }
            if st.unflushed_since.is_none() {
                st.unflushed_since = Some(Instant::now());
                st.wake();
            }
        }
    }

    /// When [`TraceOutput::tick`] has work next: flushing an unfinished console line (a
    /// prompt) or releasing trace lines held past [`HOLD_LIMIT`]; `None` when nothing waits.
    pub fn next_due(&self) -> Option<Instant> {
        let st = self.lock();
        let flush = st.unflushed_since.map(|t| t + FLUSH_DELAY);
        let release = st
            .console_line_opened
            .filter(|_| !st.held.is_empty())
            .map(|t| t + HOLD_LIMIT);
        flush.into_iter().chain(release).min()
    }

    /// Called by the run loop at [`TraceOutput::next_due`]: an unfinished console line (a
    /// prompt) is shown, and trace lines held past [`HOLD_LIMIT`] go out.
    pub fn tick(&self) {
        let mut st = self.lock();
        let mut out = io::stdout().lock();
        if st
            .unflushed_since
            .is_some_and(|t| t.elapsed() >= FLUSH_DELAY)
        {
            st.unflushed_since = None;
            let _ = out.flush();
        }
        if st
            .console_line_opened
            .is_some_and(|t| t.elapsed() >= HOLD_LIMIT)
        {
            st.release_held(&mut out);
            let _ = out.flush();
        }
    }

    /// Writes out everything held or buffered; call at the end of a run.
    pub fn flush(&self) {
        let mut st = self.lock();
        let mut out = io::stdout().lock();
        st.release_held(&mut out);
        st.console_line_opened = None;
        st.unflushed_since = None;
        let _ = out.flush();
        if let Target::File(f) = &mut st.target {
            let _ = f.flush();
        }
    }
}

impl OutputState {
    /// Tells the run loop that [`TraceOutput::next_due`] changed.
    fn wake(&self) {
        if let Some(evt) = &self.wake {
            let _ = evt.write(1);
        }
    }

    /// Writes the held trace lines to `out`, on a fresh line if the console's line is still
    /// open; nothing when none are held (an open line with nothing waiting stays open).
    fn release_held(&mut self, out: &mut impl Write) {
        if self.held.is_empty() {
            return;
        }
        if self.console_line_opened.take().is_some() {
            let _ = out.write_all(b"\n");
        }
        let _ = out.write_all(&std::mem::take(&mut self.held));
    }
}

/// Puts `fd` in raw mode if it is a terminal (a serial port), so bytes pass unchanged (no
/// `\r` added to `\n`, no echo); anything else is left alone.
pub fn make_raw_if_tty(fd: RawFd) {
    // SAFETY: termios is plain data; tcgetattr fills it for a valid tty fd (and fails for
    // anything else, leaving it unused), cfmakeraw only edits the struct, tcsetattr reads it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
}

/// The console's side of a [`TraceOutput`]: a `Write` for the serial port.
pub struct ConsoleSink(pub Arc<TraceOutput>);

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.console(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_in_a_file_come_out_in_order() {
        let dir = std::env::temp_dir().join(format!("hvprobe-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trace");
        let out = TraceOutput::file(&path).unwrap();
        out.line("one\n");
        // Console bytes never go to the trace file.
        out.console(b"guest says");
        out.line("two\n");
        out.flush();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn held_lines_wait_for_the_console_line_to_end() {
        let out = TraceOutput::stdout();
        out.console(b"half a li");
        out.line("hit 1\n");
        assert_eq!(out.lock().held, b"hit 1\n");
        out.console(b"ne\r\n");
        assert!(out.lock().held.is_empty());
        assert!(out.lock().console_line_opened.is_none());
        // A console write that ends a line and opens another keeps the new one open.
        out.console(b"end\nnext");
        assert!(out.lock().console_line_opened.is_some());
        out.line("hit 2\n");
        out.flush();
        assert!(out.lock().held.is_empty());
        assert!(out.lock().console_line_opened.is_none());
    }

    #[test]
    fn a_line_left_open_too_long_stops_holding() {
        let out = TraceOutput::stdout();
        out.console(b"prompt # ");
        out.line("hit 1\n");
        let opened = Instant::now() - HOLD_LIMIT;
        out.lock().console_line_opened = Some(opened);
        assert_eq!(out.next_due(), Some(opened + HOLD_LIMIT));
        out.tick();
        let st = out.lock();
        assert!(st.held.is_empty() && st.console_line_opened.is_none());
    }

    #[test]
    fn the_run_loop_is_woken_when_output_starts_waiting() {
        let out = TraceOutput::stdout();
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        out.set_wake(wake.try_clone().unwrap());
        assert_eq!(out.next_due(), None);
        // A prompt: its bytes wait to be flushed.
        out.console(b"~ # ");
        assert_eq!(wake.read().unwrap(), 1);
        let due = out.next_due().unwrap();
        assert!(due <= Instant::now() + FLUSH_DELAY);
        out.console(b"more");
        assert!(wake.read().is_err(), "no second wake while a flush is due");
        // Once flushed, a held trace line is what is due, at the hold limit.
        out.lock().unflushed_since = Some(Instant::now() - FLUSH_DELAY);
        out.tick();
        assert_eq!(out.next_due(), None);
        out.line("hit\n");
        assert_eq!(wake.read().unwrap(), 1);
        let opened = out.lock().console_line_opened.unwrap();
        assert_eq!(out.next_due(), Some(opened + HOLD_LIMIT));
        // The line ends: nothing is due.
        out.console(b"\n");
        assert_eq!(out.next_due(), None);
    }
}
