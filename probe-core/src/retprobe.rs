//! Live return-probe instances: one per probed function frame whose return address the engine
//! replaced with the trampoline, keyed by the stack slot that held the return address (the
//! entry stack pointer), which is unique among live frames without any knowledge of the
//! guest's tasks.
//!
//! Frames that never return through their caller (exit paths, longjmp-like unwinds) would
//! leak; two rules bound that: a new frame at the same stack slot replaces the stale instance,
//! and a return on a kernel stack retires every instance deeper on what looks like that same
//! stack (those frames are gone). "Looks like" is a THREAD_SIZE-aligned region
//! ([`crate::arch::Arch::KERNEL_STACK_SIZE`]): task stacks are
//! aligned so, but IRQ and exception stacks are page-aligned vmap areas, so a live frame on a
//! neighbouring stack can be retired by mistake. A retired instance is therefore kept (a
//! bounded number of them) and a return that reaches one is still sent to its real return
//! address: a wrong guess costs a `nmissed` count for a while, never the guest's return.

use std::collections::{HashMap, VecDeque};

/// One live frame, with the entry registers `R`.
#[derive(Debug, Clone)]
pub struct Instance<R, P> {
    /// The return address the trampoline replaced.
    pub return_address: u64,
    /// Registers at function entry.
    pub entry_regs: R,
    /// The return probes on the function.
    pub probes: Vec<P>,
}

/// How many retired instances are kept for a return that may still come.
pub const RETIRED_KEPT: usize = 16 * 1024;

/// The live instances, and the retired ones a return may still reach.
#[derive(Debug)]
pub struct InstanceTable<R, P> {
    live: HashMap<u64, Instance<R, P>>,
    retired: HashMap<u64, Instance<R, P>>,
    retired_order: VecDeque<u64>,
    stack_size: u64,
}

/// The instance a return through the trampoline belongs to.
#[derive(Debug)]
pub enum Returning<R, P> {
    /// A live instance.
    Live(Instance<R, P>),
    /// An instance retired by a return on what looked like the same stack, whose frame was in
    /// fact alive (it was on a neighbouring IRQ or exception stack): its miss was counted.
    Retired(Instance<R, P>),
}

impl<R, P> InstanceTable<R, P> {
    /// An empty table for a kernel whose task stacks are `stack_size` bytes, aligned so.
    pub fn new(stack_size: u64) -> Self {
        InstanceTable {
            live: HashMap::new(),
            retired: HashMap::new(),
            retired_order: VecDeque::new(),
            stack_size,
        }
    }

    fn same_stack(&self, a: u64, b: u64) -> bool {
        a & !(self.stack_size - 1) == b & !(self.stack_size - 1)
    }

    /// Records a frame whose key (the architecture's [`crate::arch::Arch::frame_at_entry`]:
    /// the return address's stack slot, or the entry stack pointer) is `slot`; returns a stale
    /// instance that held the same key (its function never returned through it).
    pub fn enter(&mut self, slot: u64, instance: Instance<R, P>) -> Option<Instance<R, P>> {
        // A retired instance at this slot is certainly dead now.
        self.retired.remove(&slot);
        self.live.insert(slot, instance)
    }

    /// Takes the instance of the frame with key `slot` that returned to the trampoline
    /// ([`crate::arch::Arch::frame_at_return`]), and retires the instances of deeper frames on
    /// the same stack, which can no longer return. Returns the instance (live or retired) and
    /// the probes of each instance retired now (for their miss counts).
    pub fn leave(&mut self, slot: u64) -> (Option<Returning<R, P>>, Vec<Vec<P>>)
    where
        P: Clone,
    {
        let found = match self.live.remove(&slot) {
            Some(i) => Some(Returning::Live(i)),
            None => self.retired.remove(&slot).map(Returning::Retired),
        };
        let dead: Vec<u64> = self
            .live
            .keys()
            .copied()
            .filter(|k| *k < slot && self.same_stack(*k, slot))
            .collect();
        let mut retired_now = Vec::new();
        for k in dead {
            if let Some(i) = self.live.remove(&k) {
                retired_now.push(i.probes.clone());
                self.retire(k, i);
            }
        }
        (found, retired_now)
    }

    fn retire(&mut self, slot: u64, instance: Instance<R, P>) {
        if self.retired.insert(slot, instance).is_none() {
            self.retired_order.push_back(slot);
        }
        while self.retired.len() > RETIRED_KEPT {
            match self.retired_order.pop_front() {
                Some(old) => {
                    self.retired.remove(&old);
                }
                None => break,
            }
        }
    }

    /// The real return address of the live instance whose frame holds stack address `at`:
    /// the one with the nearest key at or above it on the same stack (x86_64's key is the
    /// return address's own slot; arm64's the entry stack pointer, above the callee's frame
    /// record).
    pub fn return_address_above(&self, at: u64) -> Option<u64> {
        self.live
            .iter()
            .filter(|(k, _)| **k >= at && self.same_stack(**k, at))
            .min_by_key(|(k, _)| **k)
            .map(|(_, i)| i.return_address)
    }

    /// Live instances that include a probe `pred` accepts.
    pub fn count(&self, pred: impl Fn(&P) -> bool) -> usize {
        self.live
            .values()
            .filter(|i| i.probes.iter().any(&pred))
            .count()
    }

    /// Number of live instances.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether none is live.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(ret: u64) -> Instance<(), u32> {
        Instance {
            return_address: ret,
            entry_regs: (),
            probes: vec![1],
        }
    }

    #[test]
    fn a_return_takes_its_frame_and_drops_dead_deeper_ones() {
        let mut t = InstanceTable::new(16 << 10);
        let stack = 0xffff_c900_0040_0000u64;
        // Outer frame, then two nested ones that never return (an unwind past them).
        assert!(t.enter(stack + 0x3f00, inst(1)).is_none());
        t.enter(stack + 0x3e00, inst(2));
        t.enter(stack + 0x3d00, inst(3));
        // A frame on another task's stack stays.
        t.enter(stack + 0x8000 + 0x3d00, inst(4));
        assert_eq!(t.count(|p| *p == 1), 4);
        let (found, dropped) = t.leave(stack + 0x3f00);
        assert!(matches!(found, Some(Returning::Live(i)) if i.return_address == 1));
        assert_eq!(dropped.len(), 2);
        assert_eq!(t.len(), 1);
        // A reused slot replaces a stale frame.
        t.enter(stack + 0x8000 + 0x3d00, inst(5));
        let (found, _) = t.leave(stack + 0x8000 + 0x3d00);
        assert!(matches!(found, Some(Returning::Live(i)) if i.return_address == 5));
        assert!(t.is_empty());
        assert!(t.leave(stack - 8).0.is_none());
        // A retired frame's slot reused by a new frame is forgotten.
        t.enter(stack + 0x3e00, inst(6));
        assert!(matches!(
            t.leave(stack + 0x3e00).0,
            Some(Returning::Live(_))
        ));
    }

    #[test]
    fn a_frame_on_a_neighbouring_page_aligned_stack_still_returns_after_a_wrong_retirement() {
        // Two IRQ stacks, page-aligned vmap areas in one 16 KiB-aligned region: a return on
        // the upper one retires a live frame of the lower one, whose return still arrives.
        let mut t = InstanceTable::new(16 << 10);
        let region = 0xffff_c900_0080_0000u64;
        let (lower, upper) = (region + 0x1000, region + 0x2000);
        t.enter(lower + 0xf00, inst(1));
        t.enter(upper + 0xf00, inst(2));
        let (found, retired) = t.leave(upper + 0xf00);
        assert!(matches!(found, Some(Returning::Live(i)) if i.return_address == 2));
        assert_eq!(retired, vec![vec![1]]);
        assert!(t.is_empty());
        let (found, _) = t.leave(lower + 0xf00);
        assert!(matches!(found, Some(Returning::Retired(i)) if i.return_address == 1));
        assert!(t.leave(lower + 0xf00).0.is_none());
    }
}
