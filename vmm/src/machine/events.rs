//! The main thread's event sources that are not plain [`Command`](super::Command) sources:
//! stdin relayed to the guest console, and SIGINT/SIGTERM turned into a write to an eventfd.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::serial::SerialPort;

/// Most stdin bytes kept back while the guest does not read its console.
const MAX_PENDING: usize = 64 * 1024;

/// Relays stdin to COM1. Bytes the UART's FIFO cannot take yet are kept and queued when the
/// guest has drained the FIFO (the UART's `drained` eventfd).
pub(super) struct StdinRelay {
    serial: Arc<Mutex<SerialPort>>,
    drained: EventFd,
    pending: Vec<u8>,
    /// Whether stdin is watched: not after its end, nor while `pending` is full.
    stdin: StdinWatch,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StdinWatch {
    Watched,
    Full,
    Ended,
}

impl StdinRelay {
    /// A relay into `serial`, which writes `drained` when the guest empties its input FIFO.
    pub(super) fn new(serial: Arc<Mutex<SerialPort>>, drained: EventFd) -> StdinRelay {
        StdinRelay {
            serial,
            drained,
            pending: Vec::new(),
            stdin: StdinWatch::Watched,
        }
    }

    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let n = self
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_input(&self.pending);
        self.pending.drain(..n);
    }
}

impl MutEventSubscriber for StdinRelay {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            self.flush_pending();
            if self.stdin == StdinWatch::Full && self.pending.len() < MAX_PENDING {
                let _ = ops.add(Events::new(&io::stdin(), EventSet::IN));
                self.stdin = StdinWatch::Watched;
            }
            return;
        }
        let mut buf = [0u8; 256];
        let n = io::stdin().lock().read(&mut buf).unwrap_or(0);
        if n == 0 {
            // EOF or error: stop watching stdin; the guest keeps running.
            let _ = ops.remove(events);
            self.stdin = StdinWatch::Ended;
            return;
        }
        self.pending.extend_from_slice(&buf[..n]);
        self.flush_pending();
        if self.pending.len() >= MAX_PENDING {
            // The guest does not read its console: stop reading stdin until it does.
            let _ = ops.remove(events);
            self.stdin = StdinWatch::Full;
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // epoll refuses regular files and /dev/null; such a stdin is simply not relayed.
        if ops.add(Events::new(&io::stdin(), EventSet::IN)).is_err() {
            self.stdin = StdinWatch::Ended;
        }
        let _ = ops.add(Events::new(&self.drained, EventSet::IN));
    }
}

/// The stop signal's fd, for the SIGINT/SIGTERM handler (-1 while no VM runs).
pub(super) static INTERRUPT_FD: AtomicI32 = AtomicI32::new(-1);

pub(super) extern "C" fn interrupt_handler(
    _: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    let fd = INTERRUPT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd with an 8-byte buffer that lives on this stack frame;
        // async-signal-safe.
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}
