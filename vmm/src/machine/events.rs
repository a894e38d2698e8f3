//! The main thread's event sources besides the vCPUs: stdin relayed to the guest console, the
//! stop signal and the i8042 reset line, and SIGINT/SIGTERM turned into a stop.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::devices::serial::SerialPort;
use crate::vcpu::{StopReason, StopSignal};

/// Relays stdin to COM1. Bytes the UART's FIFO cannot take yet are kept and retried.
pub(super) struct StdinRelay {
    pub(super) serial: Arc<Mutex<SerialPort>>,
    pub(super) pending: Vec<u8>,
}

impl StdinRelay {
    pub(super) fn flush_pending(&mut self) {
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
        let mut buf = [0u8; 256];
        let n = if events.event_set().contains(EventSet::IN) && self.pending.len() < 64 * 1024 {
            io::stdin().lock().read(&mut buf).unwrap_or(0)
        } else {
            usize::from(self.pending.len() >= 64 * 1024)
        };
        if n == 0 {
            // EOF or error: stop watching stdin; the guest keeps running.
            let _ = ops.remove(events);
            return;
        }
        if self.pending.len() < 64 * 1024 {
            self.pending.extend_from_slice(&buf[..n]);
        }
        self.flush_pending();
    }

    fn init(&mut self, ops: &mut EventOps) {
        // epoll refuses regular files and /dev/null; such a stdin is simply not relayed.
        let _ = ops.add(Events::new(&io::stdin(), EventSet::IN));
    }
}

/// Watches the stop signal and the i8042 reset line.
pub(super) struct StopWatcher {
    pub(super) stop: Arc<StopSignal>,
    pub(super) reset_evt: vmm_sys_util::eventfd::EventFd,
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.stop.stop(StopReason::GuestReset);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.stop.evt, EventSet::IN));
        let _ = ops.add(Events::new(&self.reset_evt, EventSet::IN));
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
