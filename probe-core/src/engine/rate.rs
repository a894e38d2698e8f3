//! Hot sites: an optional cap on each site's hits per second. A probe on a path that runs
//! thousands of times a second (the timer tick, the scheduler, a spinlock) costs an exit per
//! hit, and a dense set of them can cost the guest more than its time. Past the cap, a hit
//! counts as missed and the site is paused (the guest's bytes back, a hardware breakpoint
//! released) until the VMM re-arms it, with every vCPU out of the guest, once its one-second
//! window is over.

use super::*;

/// One site's hits in its current one-second window, and whether it is paused.
#[derive(Debug)]
pub(super) struct SiteRate {
    /// Start of the window (ms since the engine started).
    window_start_ms: AtomicU64,
    /// Hits in the window.
    window_hits: AtomicU64,
    /// When the site was paused (ms), or `NOT_PAUSED`.
    paused_at_ms: AtomicU64,
}

const NOT_PAUSED: u64 = u64::MAX;
/// The window a cap counts hits in.
const WINDOW_MS: u64 = 1000;

impl Default for SiteRate {
    fn default() -> SiteRate {
        SiteRate {
            window_start_ms: AtomicU64::new(0),
            window_hits: AtomicU64::new(0),
            paused_at_ms: AtomicU64::new(NOT_PAUSED),
        }
    }
}

impl SiteRate {
    /// Whether the site is paused by its cap (its trap taken out).
    pub(super) fn paused(&self) -> bool {
        self.paused_at_ms.load(Ordering::SeqCst) != NOT_PAUSED
    }

    /// No longer paused; a new window.
    pub(super) fn resume(&self) {
        self.window_hits.store(0, Ordering::Relaxed);
        self.paused_at_ms.store(NOT_PAUSED, Ordering::SeqCst);
    }

    /// Counts a hit at `now_ms`; whether it is past `cap` hits in the window.
    fn over(&self, now_ms: u64, cap: u64) -> bool {
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(start) >= WINDOW_MS {
            self.window_start_ms.store(now_ms, Ordering::Relaxed);
            self.window_hits.store(0, Ordering::Relaxed);
        }
        self.window_hits.fetch_add(1, Ordering::Relaxed) >= cap
    }
}

impl<A: Arch, M: GuestMemory + Send + Sync> ProbeEngine<A, M> {
    /// Caps every site at `per_second` hits a second (`None`: no cap).
    pub fn set_rate_cap(&self, per_second: Option<u64>) {
        self.rate_cap
            .store(per_second.unwrap_or(0), Ordering::SeqCst);
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// At a hit of the site at `gpa`: whether it must not run because its cap is reached (or
    /// it is paused already: a vCPU that took the trap as it went). Then the hit is counted as
    /// missed, the site paused, and the vCPU resumes on the guest's own instruction.
    pub(super) fn rate_capped(
        &self,
        gpa: u64,
        rate: &SiteRate,
        probes: &[Arc<ProbeEntry<A>>],
    ) -> bool {
        let cap = self.rate_cap.load(Ordering::Relaxed);
        if !rate.paused() && (cap == 0 || !rate.over(self.now_ms(), cap)) {
            return false;
        }
        for p in probes {
            p.counters.missed.fetch_add(1, Ordering::Relaxed);
        }
        self.exits.rate_capped.fetch_add(1, Ordering::Relaxed);
        if rate
            .paused_at_ms
            .compare_exchange(
                NOT_PAUSED,
                self.now_ms(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
        {
            self.take_trap_out(gpa);
        }
        true
    }

    /// How many sites their cap has paused.
    pub fn paused_sites(&self) -> usize {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.sites.values().filter(|s| s.rate.paused()).count()
    }

    /// How long until the first paused site's window is over and
    /// [`ProbeEngine::resume_paused_sites`] puts its trap back; `None` when none is paused.
    pub fn next_paused_site_due(&self) -> Option<std::time::Duration> {
        let now = self.now_ms();
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table
            .sites
            .values()
            .map(|s| s.rate.paused_at_ms.load(Ordering::SeqCst))
            .filter(|&at| at != NOT_PAUSED)
            .map(|at| (at + WINDOW_MS).saturating_sub(now))
            .min()
            .map(std::time::Duration::from_millis)
    }

    /// Puts back the trap of every site paused in an earlier window; returns how many. Call
    /// with every vCPU out of `KVM_RUN` (the breakpoint is written into text the guest runs).
    pub fn resume_paused_sites(&self) -> usize {
        let now = self.now_ms();
        let due: Vec<u64> = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            table
                .sites
                .iter()
                .filter(|(_, s)| {
                    let at = s.rate.paused_at_ms.load(Ordering::SeqCst);
                    at != NOT_PAUSED && now.saturating_sub(at) >= WINDOW_MS
                })
                .map(|(gpa, _)| *gpa)
                .collect()
        };
        due.into_iter()
            .filter(|&gpa| self.put_trap_back(gpa))
            .count()
    }
}
