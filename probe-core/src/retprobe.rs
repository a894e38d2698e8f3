//! Live return-probe instances: one per probed function frame whose return address the engine
//! replaced with the trampoline, keyed by the stack slot that held the return address (the
//! entry stack pointer), which is unique among live frames without any knowledge of the
//! guest's tasks.
//!
//! Frames that never return through their caller (exit paths, longjmp-like unwinds) would
//! leak; two rules bound that: a new frame at the same stack slot replaces the stale instance,
//! and a return on a kernel stack drops every instance deeper on that same stack (those
//! frames are gone).

use std::collections::HashMap;

use crate::arch::x86_64::Registers;

/// Size and alignment of an x86_64 Linux kernel stack (THREAD_SIZE with KASAN off).
pub const KERNEL_STACK_SIZE: u64 = 16 << 10;

/// One live frame.
#[derive(Debug, Clone)]
pub struct Instance<P> {
    /// The return address the trampoline replaced.
    pub return_address: u64,
    /// Registers at function entry.
    pub entry_regs: Registers,
    /// The return probes on the function.
    pub probes: Vec<P>,
}

/// The live instances.
#[derive(Debug)]
pub struct InstanceTable<P> {
    live: HashMap<u64, Instance<P>>,
}

impl<P> Default for InstanceTable<P> {
    fn default() -> Self {
        InstanceTable {
            live: HashMap::new(),
        }
    }
}

fn same_stack(a: u64, b: u64) -> bool {
    a & !(KERNEL_STACK_SIZE - 1) == b & !(KERNEL_STACK_SIZE - 1)
}

impl<P> InstanceTable<P> {
    /// Records a frame whose return address sits at `slot`; returns a stale instance that held
    /// the same slot (its function never returned through it).
    pub fn enter(&mut self, slot: u64, instance: Instance<P>) -> Option<Instance<P>> {
        self.live.insert(slot, instance)
    }

    /// Takes the instance of a return that left the stack pointer at `sp_after` (the `ret`
    /// popped the slot at `sp_after - 8`), and drops the instances of deeper frames on the same
    /// stack, which can no longer return. Returns the instance and the dropped ones.
    pub fn leave(&mut self, sp_after: u64) -> (Option<Instance<P>>, Vec<Instance<P>>) {
        let slot = sp_after.wrapping_sub(8);
        let found = self.live.remove(&slot);
        let dead: Vec<u64> = self
            .live
            .keys()
            .copied()
            .filter(|k| *k < slot && same_stack(*k, slot))
            .collect();
        let dropped = dead.iter().filter_map(|k| self.live.remove(k)).collect();
        (found, dropped)
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

    fn inst(ret: u64) -> Instance<u32> {
        Instance {
            return_address: ret,
            entry_regs: Registers::default(),
            probes: vec![1],
        }
    }

    #[test]
    fn a_return_takes_its_frame_and_drops_dead_deeper_ones() {
        let mut t = InstanceTable::default();
        let stack = 0xffff_c900_0040_0000u64;
        // Outer frame, then two nested ones that never return (an unwind past them).
        assert!(t.enter(stack + 0x3f00, inst(1)).is_none());
        t.enter(stack + 0x3e00, inst(2));
        t.enter(stack + 0x3d00, inst(3));
        // A frame on another task's stack stays.
        t.enter(stack + 0x8000 + 0x3d00, inst(4));
        assert_eq!(t.count(|p| *p == 1), 4);
        let (found, dropped) = t.leave(stack + 0x3f08);
        assert_eq!(found.unwrap().return_address, 1);
        assert_eq!(dropped.len(), 2);
        assert_eq!(t.len(), 1);
        // A reused slot replaces a stale frame.
        t.enter(stack + 0x8000 + 0x3d00, inst(5));
        let (found, _) = t.leave(stack + 0x8000 + 0x3d08);
        assert_eq!(found.unwrap().return_address, 5);
        assert!(t.is_empty());
        assert!(t.leave(stack).0.is_none());
    }
}
