//! Per-probe and per-exit counters, as the VMM reports them.

use super::*;

impl<A: Arch, M: GuestMemory + Send + Sync> ProbeEngine<A, M> {
    /// Per-probe counters, in planting order.
    pub fn stats(&self) -> Vec<ProbeStats> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ProbeStats> = table
            .sites
            .values()
            .flat_map(|site| {
                site.probes.iter().map(move |p| ProbeStats {
                    id: p.id,
                    location: p.location.clone(),
                    address: site.va,
                    plan: site.run.kind(),
                    instruction: site.instruction.clone(),
                    trap: site.trap,
                    hits: p.counters.hits.load(Ordering::Relaxed),
                    missed: p.counters.missed.load(Ordering::Relaxed),
                    handler_errors: p.counters.handler_errors.load(Ordering::Relaxed),
                    return_probe: p.on_return.is_some(),
                    returns: p.counters.returns.load(Ordering::Relaxed),
                    nmissed: p.counters.nmissed.load(Ordering::Relaxed),
                    outstanding: 0,
                    jump_refusal: site.jump_refusal,
                })
            })
            .collect();
        // Watchpoints and protected regions: no instruction of the guest's, a hardware trap.
        let memory_stats = |p: &ProbeEntry<A>, address, plan, instruction| ProbeStats {
            id: p.id,
            location: p.location.clone(),
            address,
            plan,
            instruction,
            trap: TrapKind::Hardware,
            hits: p.counters.hits.load(Ordering::Relaxed),
            missed: p.counters.missed.load(Ordering::Relaxed),
            handler_errors: p.counters.handler_errors.load(Ordering::Relaxed),
            return_probe: false,
            returns: 0,
            nmissed: 0,
            outstanding: 0,
            jump_refusal: None,
        };
        out.extend(table.watches.values().map(|w| {
            let what = format!("{} bytes, {}", w.spec.len, w.spec.access.as_str());
            memory_stats(&w.probe, w.va, PlanKind::Watch, what)
        }));
        out.extend(table.protects.values().map(|s| {
            let what = format!("{} bytes, {}", s.spec.len, s.spec.action.as_str());
            memory_stats(&s.probe, s.va, PlanKind::Protect, what)
        }));
        drop(table);
        self.add_jump_missed(&mut out);
        // The return table is locked on its own (the hit path takes it before the probe
        // table): instances still out, per return probe.
        let returns = self.returns.lock().unwrap_or_else(|e| e.into_inner());
        for s in out.iter_mut().filter(|s| s.return_probe) {
            s.outstanding = returns.count(|q| q.id == s.id);
        }
        drop(returns);
        out.sort_by_key(|s| s.id);
        out
    }

    /// Exit counts, for figures.
    pub fn exit_stats(&self) -> ExitStats {
        let e = &self.exits;
        // Jump-plan hits a trampoline's task filter left out were counted in the guest.
        let filtered = self.jump_filtered_total();
        ExitStats {
            breakpoints: e.breakpoints.load(Ordering::Relaxed),
            hw_breakpoints: e.hw_breakpoints.load(Ordering::Relaxed),
            reinjected: e.reinjected.load(Ordering::Relaxed),
            returns: e.returns.load(Ordering::Relaxed),
            slot_traps: e.slot_traps.load(Ordering::Relaxed),
            reinjected_debug: e.reinjected_debug.load(Ordering::Relaxed),
            abandoned_steps: e.abandoned_steps.load(Ordering::Relaxed),
            emulation_fallbacks: e.emulation_fallbacks.load(Ordering::Relaxed),
            rate_capped: e.rate_capped.load(Ordering::Relaxed),
            slot_exceptions: e.slot_exceptions.load(Ordering::Relaxed),
            watch_steps: e.watch_steps.load(Ordering::Relaxed),
            protected_writes: e.protected_writes.load(Ordering::Relaxed),
            neighbour_writes: e.neighbour_writes.load(Ordering::Relaxed),
            emulated_stores: e.emulated_stores.load(Ordering::Relaxed),
            exempted_writes: e.exempted_writes.load(Ordering::Relaxed),
            hits_by_plan: PlanKind::ALL
                .iter()
                .zip(&e.by_plan)
                .map(|(k, c)| {
                    let extra = if *k == PlanKind::Jump { filtered } else { 0 };
                    (*k, c.load(Ordering::Relaxed) + extra)
                })
                .collect(),
        }
    }
}
