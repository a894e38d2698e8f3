//! Return probes: the return address swapped for the trampoline at entry (where it is, the
//! stack or the link register, is the architecture's), the instance found again by its frame
//! key at the return.

use super::*;

impl<A: Arch, M: GuestMemory + Send + Sync> ProbeEngine<A, M> {
    /// Live return-probe instances.
    pub fn live_returns(&self) -> usize {
        self.returns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The real return address behind the trampoline for a frame holding stack address `at`.
    pub(super) fn real_return_above(&self, at: u64) -> Option<u64> {
        self.returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .return_address_above(at)
    }

    /// What a handler's stack walk needs to see through the trampoline.
    pub(super) fn return_recovery<'a>(
        &self,
        lookup: &'a (dyn Fn(u64) -> Option<u64> + Sync),
        own: Option<(u64, u64)>,
    ) -> ReturnRecovery<'a> {
        ReturnRecovery {
            trampoline: self
                .trampoline
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|t| t.va),
            lookup: Some(lookup),
            own,
        }
    }

    /// At the entry of a function with return probes: replaces the return address with the
    /// trampoline and records the instance, within each probe's `max_active`.
    pub(super) fn enter_returns(&self, probes: &[Arc<ProbeEntry<A>>], regs: &mut A::Registers) {
        let wanting: Vec<&Arc<ProbeEntry<A>>> =
            probes.iter().filter(|p| p.on_return.is_some()).collect();
        if wanting.is_empty() {
            return;
        }
        let Some(trampoline) = *self.trampoline.lock().unwrap_or_else(|e| e.into_inner()) else {
            return;
        };
        let space = A::address_space(regs);
        let mut table = self.returns.lock().unwrap_or_else(|e| e.into_inner());
        let mut taking = Vec::new();
        for p in wanting {
            if table.count(|q| q.id == p.id) >= p.max_active {
                p.counters.nmissed.fetch_add(1, Ordering::Relaxed);
            } else {
                taking.push(p.clone());
            }
        }
        let miss_all = |taking: &[Arc<ProbeEntry<A>>]| {
            for p in taking {
                p.counters.nmissed.fetch_add(1, Ordering::Relaxed);
            }
        };
        if taking.is_empty() {
            return;
        }
        let mapped = self.ensure_xol_mapped(space).is_ok();
        let mut stack = VirtualStack::<A, M> {
            mem: &self.mem,
            space,
        };
        let Some(return_address) = mapped
            .then(|| A::return_address(regs, &mut stack).ok())
            .flatten()
        else {
            miss_all(&taking);
            return;
        };
        let entry_regs = regs.clone();
        if return_address == trampoline.va
            || A::set_return_address(regs, &mut stack, trampoline.va).is_err()
        {
            miss_all(&taking);
            return;
        }
        let stale = table.enter(
            A::frame_at_entry(&entry_regs),
            Instance {
                return_address,
                entry_regs,
                probes: taking,
            },
        );
        if let Some(stale) = stale {
            miss_all(&stale.probes);
        }
    }

    /// A return through the trampoline: back to the real return address, return handlers.
    pub(super) fn leave_return(
        &self,
        vcpu: &mut dyn VcpuAccess<A>,
        mut regs: A::Registers,
    ) -> Result<Verdict, VcpuError> {
        self.exits.returns.fetch_add(1, Ordering::Relaxed);
        let (found, retired) = self
            .returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .leave(A::frame_at_return(&regs));
        for probes in retired {
            for p in &probes {
                p.counters.nmissed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let instance = match found {
            Some(Returning::Live(i)) => Some(i),
            // Retired by a return on a neighbouring stack, but alive: its miss is taken back.
            Some(Returning::Retired(i)) => {
                for p in &i.probes {
                    let _ = p.counters.nmissed.fetch_update(
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                        |n| n.checked_sub(1),
                    );
                }
                Some(i)
            }
            None => None,
        };
        let Some(instance) = instance else {
            return Err(VcpuError::LostReturn {
                vcpu: vcpu.id(),
                sp: regs.sp(),
            });
        };
        let trampoline = regs.pc();
        regs.set_pc(instance.return_address);
        A::returned_through_trampoline(&mut regs, trampoline, instance.return_address);
        vcpu.set_registers(&regs)?;
        let lookup = |at: u64| self.real_return_above(at);
        let own = (
            A::frame_at_entry(&instance.entry_regs),
            instance.return_address,
        );
        let returns = self.return_recovery(&lookup, Some(own));
        for p in &instance.probes {
            p.counters.returns.fetch_add(1, Ordering::Relaxed);
            let Some(h) = &p.on_return else { continue };
            let ctx = ProbeContext {
                vcpu: vcpu.id(),
                location: &p.location,
                address: instance.entry_regs.pc(),
                time: self.start.elapsed(),
                regs: &regs,
                entry_regs: Some(&instance.entry_regs),
                mem: &self.mem,
                returns,
                recorded: None,
                watch: None,
            };
            if !matches!(catch_unwind(AssertUnwindSafe(|| h(&ctx))), Ok(Ok(()))) {
                p.counters.handler_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Verdict::Resume)
    }
}
