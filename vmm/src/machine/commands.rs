//! What the run loop acts on. Every event source of a run (a vCPU stopping the VM, the
//! guest's `/init` announcing itself, a signal, a deadline, and from the live-session API a
//! user's request) becomes one [`Command`] in one queue; the loop sleeps in epoll until an
//! event or its next deadline and handles the queued commands in order. A new kind of request
//! is a new variant and a new arm of `RunLoop::handle`, not a change to the loop.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::StopReason;

/// One thing for the run loop to do.
#[derive(Debug)]
pub enum Command {
    /// The default guest's `/init` announced itself: plant the probes, then let its command
    /// start.
    InitReady,
    /// Periodic work is due: re-arm sites whose rate-cap window is over, report hot probes,
    /// show an unfinished console line, release held trace lines.
    Housekeeping,
    /// A deadline may have moved (the output started waiting for a flush): nothing to do but
    /// compute the next one.
    Reschedule,
    /// End the run for this reason (the first reason recorded wins).
    Stop(StopReason),
    /// A live-session API request; the answer goes to `reply`.
    Api {
        /// What the client asks.
        request: crate::api::ApiRequest,
        /// Where the answer goes.
        reply: Sender<crate::api::ApiReply>,
    },
}

/// Sends commands to the run loop from any thread and wakes it.
#[derive(Clone)]
pub struct CommandSender {
    tx: Sender<Command>,
    wake: Arc<EventFd>,
}

impl CommandSender {
    /// Queues `cmd` and wakes the loop; false once the loop is gone.
    pub fn send(&self, cmd: Command) -> bool {
        let sent = self.tx.send(cmd).is_ok();
        let _ = self.wake.write(1);
        sent
    }
}

/// The loop's end of the queue: commands in the order they were sent.
pub(super) struct CommandQueue {
    rx: Receiver<Command>,
    tx: Sender<Command>,
    wake: Arc<EventFd>,
}

impl CommandQueue {
    /// An empty queue.
    pub(super) fn new() -> std::io::Result<CommandQueue> {
        let (tx, rx) = mpsc::channel();
        Ok(CommandQueue {
            rx,
            tx,
            wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// A sender for other threads (the live-session API).
    pub(super) fn sender(&self) -> CommandSender {
        CommandSender {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }

    /// The next queued command, if any.
    pub(super) fn next(&self) -> Option<Command> {
        self.rx.try_recv().ok()
    }

    /// Queues `cmd` from the loop's own thread (no wake needed: the loop drains the queue
    /// after every wait).
    pub(super) fn push(&self, cmd: Command) {
        let _ = self.tx.send(cmd);
    }

    /// The subscriber that reads the queue's wake eventfd, so that it does not stay
    /// readable.
    pub(super) fn waker(&self) -> std::io::Result<CommandSource> {
        Ok(CommandSource::new(self.wake.try_clone()?, self, || None))
    }
}

/// An eventfd that, when written, queues a command (or only wakes the loop).
pub(super) struct CommandSource {
    evt: EventFd,
    tx: Sender<Command>,
    make: Box<dyn Fn() -> Option<Command> + Send>,
}

impl CommandSource {
    /// Queues `make()` each time `evt` is written.
    pub(super) fn new(
        evt: EventFd,
        queue: &CommandQueue,
        make: impl Fn() -> Option<Command> + Send + 'static,
    ) -> CommandSource {
        CommandSource {
            evt,
            tx: queue.tx.clone(),
            make: Box::new(make),
        }
    }
}

impl MutEventSubscriber for CommandSource {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        if let Some(cmd) = (self.make)() {
            let _ = self.tx.send(cmd);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};

    #[test]
    fn commands_from_other_threads_and_eventfds_arrive_in_order() {
        let queue = CommandQueue::new().unwrap();
        let mut em: EventManager<Box<dyn MutEventSubscriber>> = EventManager::new().unwrap();
        em.add_subscriber(Box::new(queue.waker().unwrap()));
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        em.add_subscriber(Box::new(CommandSource::new(
            ready.try_clone().unwrap(),
            &queue,
            || Some(Command::InitReady),
        )));
        // Nothing written: the wait times out with nothing queued.
        assert_eq!(em.run_with_timeout(10).unwrap(), 0);
        assert!(queue.next().is_none());
        let sender = queue.sender();
        std::thread::spawn(move || sender.send(Command::Stop(StopReason::Interrupted)))
            .join()
            .unwrap();
        ready.write(1).unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            assert!(em.run_with_timeout(1000).unwrap() > 0, "woken");
            while let Some(cmd) = queue.next() {
                seen.push(format!("{cmd:?}"));
            }
        }
        assert_eq!(seen, ["Stop(Interrupted)", "InitReady"]);
        // Both eventfds were read: the next wait sleeps.
        assert_eq!(em.run_with_timeout(10).unwrap(), 0);
    }
}
