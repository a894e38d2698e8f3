//! The run loop: the main thread sleeps in epoll until an event source queues a [`Command`]
//! or the next deadline (the run's time limit, housekeeping) comes, then handles the queued
//! commands in order. No poll: with nothing to do and no deadline it sleeps until woken.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber};

use super::commands::{Command, CommandQueue};
use super::session::ProbeSession;
use crate::devices::console::ConsoleWatch;
use crate::devices::serial::SerialPort;
use crate::output::TraceOutput;
use crate::vcpu::{StopReason, StopSignal, VcpuHandle};

/// The event loop of a run.
pub(super) type Events = EventManager<Box<dyn MutEventSubscriber>>;

/// A deadline of the loop, and the command it becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// The run's time limit.
    TimeLimit,
    /// [`Command::Housekeeping`] is due.
    Housekeeping,
}

impl Timer {
    fn command(self) -> Command {
        match self {
            Timer::TimeLimit => Command::Stop(StopReason::Timeout),
            Timer::Housekeeping => Command::Housekeeping,
        }
    }
}

/// What the loop acts on and with.
pub(super) struct RunLoop {
    pub(super) queue: CommandQueue,
    pub(super) stop: Arc<StopSignal>,
    pub(super) session: Option<ProbeSession>,
    pub(super) handles: Vec<VcpuHandle>,
    pub(super) output: Arc<TraceOutput>,
    /// When the run's time limit passes.
    pub(super) time_limit: Option<Instant>,
    pub(super) started: Instant,
    pub(super) serial: Arc<Mutex<SerialPort>>,
    pub(super) console: ConsoleWatch,
    /// Why the probes were refused, when they were: the command never ran.
    pub(super) probe_refused: Option<String>,
}

/// Milliseconds from now until `at`, rounded up so that the loop never wakes early and spins.
fn epoll_timeout(at: Instant) -> i32 {
    let wait = at.saturating_duration_since(Instant::now());
    i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
}

impl RunLoop {
    /// Runs until a stop reason is recorded.
    pub(super) fn run(&mut self, events: &mut Events) {
        while self.stop.reason().is_none() {
            let timer = self.next_timer();
            let timeout = timer.map_or(-1, |(at, _)| epoll_timeout(at));
            if let Err(e) = events.run_with_timeout(timeout) {
                self.queue.push(Command::Stop(StopReason::VcpuError(format!(
                    "event loop: {e}"
                ))));
            }
            if let Some((at, timer)) = timer
                && Instant::now() >= at
            {
                self.queue.push(timer.command());
            }
            while self.stop.reason().is_none()
                && let Some(cmd) = self.queue.next()
            {
                self.handle(cmd);
            }
        }
    }

    /// The earliest deadline: the time limit, the output's next flush or release, the probe
    /// session's next re-arm or rate check.
    fn next_timer(&self) -> Option<(Instant, Timer)> {
        let housekeeping = self
            .output
            .next_due()
            .into_iter()
            .chain(self.session.as_ref().and_then(ProbeSession::next_due))
            .min()
            .map(|at| (at, Timer::Housekeeping));
        let limit = self.time_limit.map(|at| (at, Timer::TimeLimit));
        limit
            .into_iter()
            .chain(housekeeping)
            .min_by_key(|(at, _)| *at)
    }

    /// Does what `cmd` asks.
    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::InitReady => self.plant(),
            Command::Housekeeping => {
                self.output.tick();
                if let Some(s) = &mut self.session {
                    s.tick(&self.handles);
                }
            }
            Command::Reschedule => {}
            Command::Stop(reason) => self.stop.stop(reason),
            Command::Api { request, reply } => {
                let answer = self.answer(request);
                let _ = reply.send(answer);
            }
        }
    }

    /// Plants the probes once the guest's `/init` is up, then lets its command start; a
    /// refusal stops the run before the command runs.
    fn plant(&mut self) {
        let Some(s) = &mut self.session else {
            return;
        };
        if s.planted {
            return;
        }
        match s.plant(&self.handles, self.started, &self.console) {
            // The default guest's /init waits for a line on its console before it runs the
            // command, so that no probed call happens before the probes are in.
            Ok(()) => {
                self.serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .enqueue_input(b"\n");
            }
            Err(e) => {
                let e = e.to_string();
                s.report.error = Some(e.clone());
                self.probe_refused = Some(e);
                self.stop.stop(StopReason::Interrupted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_wait_is_rounded_up_to_whole_milliseconds() {
        let now = Instant::now();
        assert_eq!(epoll_timeout(now - Duration::from_secs(1)), 0);
        let t = epoll_timeout(now + Duration::from_micros(1500));
        assert!((1..=2).contains(&t), "{t}");
        assert_eq!(epoll_timeout(now + Duration::from_secs(1 << 40)), i32::MAX);
    }
}
