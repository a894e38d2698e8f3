//! Event streams for API clients: every hit line of every probe, offered to each client that
//! asked for its events, in the client's format. A vCPU never waits for a client: each client
//! has a bounded queue, and an event that finds it full is counted as lost for that client
//! (the stream then says `lost=N`), as the guest's own ftrace ring buffer does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

/// How a stream spells its events: the lines `hvprobe run` prints, or its `--json` objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFormat {
    /// Text lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Events a client's queue holds before further ones are lost for it (`queue=N` of
/// `GET /events` sets another, up to [`MAX_QUEUE_EVENTS`]).
pub const QUEUE_EVENTS: usize = 4096;
/// The largest queue a client may ask for.
pub const MAX_QUEUE_EVENTS: usize = 1 << 20;

/// One client's stream.
pub struct Subscriber {
    format: StreamFormat,
    /// The events it wants (`group/event` or a bare probe's location); empty: all.
    events: Vec<String>,
    queue: Mutex<VecDeque<String>>,
    ready: Condvar,
    lost: AtomicU64,
    capacity: usize,
    closed: std::sync::atomic::AtomicBool,
}

/// What a client's stream has next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// An event line (with its newline).
    Event(String),
    /// This many events were lost since the last report.
    Lost(u64),
    /// Nothing came within the wait.
    Idle,
    /// The run ended: no more events will come.
    Closed,
}

impl Subscriber {
    /// The stream's format.
    pub fn format(&self) -> StreamFormat {
        self.format
    }

    /// Whether it wants `event`.
    fn wants(&self, event: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == event)
    }

    /// Counts a lost event if the queue is full (then nothing needs rendering for it).
    fn lost_if_full(&self) -> bool {
        let full = self.queue.lock().unwrap_or_else(|e| e.into_inner()).len() >= self.capacity;
        if full {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        full
    }

    /// Queued events, without waiting, up to about `max_bytes`: a stream writes them in one
    /// piece instead of one write per event.
    pub fn drain(&self, max_bytes: usize) -> String {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        while out.len() < max_bytes
            && let Some(line) = q.pop_front()
        {
            out.push_str(&line);
        }
        out
    }

    fn offer(&self, line: String) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.capacity {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(line);
        drop(q);
        self.ready.notify_one();
    }

    /// The next thing to send, waiting up to `wait` for one: lost events are reported before
    /// the events that came after them; once the run has ended and the queue is drained,
    /// [`Next::Closed`].
    pub fn next(&self, wait: Duration) -> Next {
        let lost = self.lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            return Next::Lost(lost);
        }
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let (mut q, _) = self
            .ready
            .wait_timeout_while(q, wait, |q| q.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        match q.pop_front() {
            Some(line) => Next::Event(line),
            None if self.closed.load(Ordering::SeqCst) => Next::Closed,
            None => Next::Idle,
        }
    }
}

/// Every client's stream; the vCPU threads publish into it.
#[derive(Default)]
pub struct EventHub {
    subscribers: RwLock<Vec<Arc<Subscriber>>>,
    /// Set when the run has ended.
    closed: std::sync::atomic::AtomicBool,
    /// How many subscribers there are, read without the lock on every hit.
    count: AtomicUsize,
}

impl EventHub {
    /// A new stream in `format` of the `events` named (empty: all).
    pub fn subscribe(&self, format: StreamFormat, events: Vec<String>) -> Arc<Subscriber> {
        self.subscribe_with_capacity(format, events, QUEUE_EVENTS)
    }

    /// [`EventHub::subscribe`] with a queue of `capacity` events.
    pub fn subscribe_with_capacity(
        &self,
        format: StreamFormat,
        events: Vec<String>,
        capacity: usize,
    ) -> Arc<Subscriber> {
        let s = Arc::new(Subscriber {
            format,
            events,
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            lost: AtomicU64::new(0),
            capacity,
            closed: std::sync::atomic::AtomicBool::new(self.closed.load(Ordering::SeqCst)),
        });
        let mut subs = self.subscribers.write().unwrap_or_else(|e| e.into_inner());
        subs.push(s.clone());
        self.count.store(subs.len(), Ordering::SeqCst);
        s
    }

    /// Ends the stream `s` (its client went away).
    pub fn unsubscribe(&self, s: &Arc<Subscriber>) {
        let mut subs = self.subscribers.write().unwrap_or_else(|e| e.into_inner());
        subs.retain(|x| !Arc::ptr_eq(x, s));
        self.count.store(subs.len(), Ordering::SeqCst);
    }

    /// Ends every stream: the run is over. Each client gets what is queued, then the end.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for s in self
            .subscribers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            s.closed.store(true, Ordering::SeqCst);
            s.ready.notify_all();
        }
    }

    /// Whether any client streams: when none does, a hit renders nothing for the hub.
    pub fn active(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Offers `event` to every client that wants it, rendered by `render` in the client's
    /// format (each format at most once). Never blocks on a client.
    pub fn publish(&self, event: &str, render: &dyn Fn(StreamFormat) -> String) {
        if !self.active() {
            return;
        }
        let subs = self.subscribers.read().unwrap_or_else(|e| e.into_inner());
        let (mut text, mut json) = (None, None);
        for s in subs.iter().filter(|s| s.wants(event)) {
            if s.lost_if_full() {
                continue;
            }
            let slot = match s.format {
                StreamFormat::Text => &mut text,
                StreamFormat::Json => &mut json,
            };
            let line = slot.get_or_insert_with(|| render(s.format)).clone();
            s.offer(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_loses_events_for_that_client_only_and_says_how_many() {
        let hub = EventHub::default();
        assert!(!hub.active());
        let slow = hub.subscribe_with_capacity(StreamFormat::Text, vec![], 2);
        let fast = hub.subscribe(StreamFormat::Json, vec!["hv/a".into()]);
        let rendered = AtomicUsize::new(0);
        let render = |f: StreamFormat| {
            rendered.fetch_add(1, Ordering::SeqCst);
            format!("{f:?}\n")
        };
        for _ in 0..5 {
            hub.publish("hv/a", &render);
        }
        hub.publish("hv/b", &render);
        // Each format rendered once per event, only for a client that wants it and has room:
        // text for the slow client's first two, JSON for each of the fast one's five.
        assert_eq!(rendered.load(Ordering::SeqCst), 2 + 5);
        let wait = Duration::from_millis(1);
        assert_eq!(slow.next(wait), Next::Lost(4));
        assert_eq!(slow.next(wait), Next::Event("Text\n".into()));
        assert_eq!(slow.next(wait), Next::Event("Text\n".into()));
        assert_eq!(slow.next(wait), Next::Idle);
        for _ in 0..5 {
            assert_eq!(fast.next(wait), Next::Event("Json\n".into()));
        }
        assert_eq!(fast.next(wait), Next::Idle, "hv/b is not asked for");
        hub.unsubscribe(&slow);
        assert!(hub.active());
        hub.publish("hv/a", &render);
        hub.close();
        assert_eq!(fast.next(wait), Next::Event("Json\n".into()));
        assert_eq!(fast.next(wait), Next::Closed);
        hub.unsubscribe(&fast);
        assert!(!hub.active());
    }
}
