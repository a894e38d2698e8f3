//! The hit path: a debug exit -> the site -> handlers -> the step plan -> resume, and the
//! trapped slots' breakpoints, all on the vCPU thread that took the exit.

use super::*;

impl<A: Arch, M: GuestMemory + Send + Sync> ProbeEngine<A, M> {
    /// Runs the pre (or, with `post`, post) handlers of `probes` for a hit at `site_va`; for a
    /// hit that happened earlier than now (a jump-plan record), `recorded` gives its time and
    /// the only memory its handlers may read.
    /// Runs the pre (or `post`) handlers of `probes` for a hit at `site_va`; a drained jump
    /// record gives its time and memory (`recorded`), a watchpoint what it saw (`watch`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_handlers(
        &self,
        vcpu: u32,
        site_va: u64,
        probes: &[Arc<ProbeEntry<A>>],
        regs: &A::Registers,
        post: bool,
        recorded: Option<(std::time::Duration, &crate::jump::RecordedMemory)>,
        watch: Option<crate::probe::WatchRecord>,
    ) {
        let lookup = |at: u64| self.real_return_above(at);
        let returns = self.return_recovery(&lookup, None);
        for p in probes {
            let handler = if post { &p.post } else { &p.pre };
            if !post {
                p.counters.hits.fetch_add(1, Ordering::Relaxed);
            }
            let Some(h) = handler else { continue };
            let ctx = ProbeContext {
                vcpu,
                location: &p.location,
                address: site_va,
                time: recorded.map_or_else(|| self.start.elapsed(), |(t, _)| t),
                regs,
                entry_regs: None,
                mem: &self.mem,
                returns,
                recorded: recorded.map(|(_, m)| m),
                watch: watch.clone(),
            };
            match catch_unwind(AssertUnwindSafe(|| h(&ctx))) {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    p.counters.handler_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Handles one debug exit of `vcpu`. On `Resume` the registers are set for the next
    /// `KVM_RUN`; on a reinjection nothing was changed.
    pub fn handle_debug(
        &self,
        vcpu: &mut dyn VcpuAccess<A>,
        state: &mut VcpuProbeState,
        event: DebugEvent,
    ) -> Result<Verdict, VcpuError> {
        match event {
            // The engine never single-steps: a #DB that is not one of its hardware breakpoints
            // is the guest's own (its TF, its debug registers) and goes back to it.
            DebugEvent::SingleStep { .. } => {
                self.exits.reinjected_debug.fetch_add(1, Ordering::Relaxed);
                Ok(Verdict::ReinjectDebug)
            }
            DebugEvent::Watchpoint { pc, slots, writer } => self.watch_hit(vcpu, pc, slots, writer),
            DebugEvent::Breakpoint { pc } | DebugEvent::HardwareBreakpoint { pc } => {
                let hw = matches!(event, DebugEvent::HardwareBreakpoint { .. });
                self.hit(vcpu, state, pc, hw)
            }
        }
    }

    pub(super) fn hit(
        &self,
        vcpu: &mut dyn VcpuAccess<A>,
        state: &mut VcpuProbeState,
        pc: u64,
        hw: bool,
    ) -> Result<Verdict, VcpuError> {
        // What the exit gives first (the PC): a hit whose handlers and plan touch no other
        // register costs no more (arm64 reads each register with its own ioctl).
        let mut regs = vcpu.exit_registers()?;
        let mut complete = false;
        if !hw {
            let trampoline = *self.trampoline.lock().unwrap_or_else(|e| e.into_inner());
            if trampoline.is_some_and(|t| t.va == pc) {
                vcpu.complete_registers(&mut regs)?;
                return self.leave_return(vcpu, regs);
            }
            let slot_trap = self
                .table
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .slot_traps
                .get(&pc)
                .copied();
            if let Some(trap) = slot_trap {
                vcpu.complete_registers_in(&mut regs, A::TRAP_REGISTERS)?;
                return self.finish_trapped_step(vcpu, state, regs, pc, trap);
            }
        }
        self.drop_abandoned(state);
        let mut pc = pc;
        // An emulated instruction whose successor is probed too is followed into that probe in
        // the same exit, instead of re-entering the guest only to trap again at once.
        for chained in 0..=MAX_CHAINED_HITS {
            let indexed = self
                .table
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .site_vas
                .get(&pc)
                .copied();
            let gpa = match indexed {
                Some(Some(gpa)) => Some(gpa),
                // Sites on several pages at this address: the walk tells which one trapped.
                Some(None) => {
                    vcpu.complete_registers_in(&mut regs, A::KERNEL_SPACE_REGISTERS)?;
                    A::translate(&self.mem, A::address_space(&regs), pc)
                        .ok()
                        .map(|t| t.gpa)
                }
                None => None,
            };
            let site = gpa.and_then(|gpa| {
                let table = self.table.read().unwrap_or_else(|e| e.into_inner());
                table
                    .sites
                    .get(&gpa)
                    // A jump site never traps: its hits are recorded in the guest.
                    .filter(|s| {
                        s.va == pc
                            && s.disarmed.get().is_none()
                            && !matches!(*s.run, SiteRun::Jump { .. })
                    })
                    .map(|s| {
                        let trap = if s.guarded { A::TRAP_REGISTERS } else { 0 };
                        (gpa, s.probes.clone(), s.run.clone(), s.rate.clone(), trap)
                    })
            });
            let Some((gpa, probes, run, rate, trap_registers)) = site else {
                if chained > 0 {
                    break;
                }
                // Not one of ours here: the guest's own breakpoint, or one of ours reached
                // through another mapping; finding out takes the page tables.
                vcpu.complete_registers(&mut regs)?;
                return self.not_probed(pc, A::address_space(&regs), hw);
            };
            // Past its rate cap (or paused by it): the guest's own instruction runs.
            if self.rate_capped(gpa, &rate, &probes) {
                vcpu.set_registers(&regs)?;
                return Ok(Verdict::Resume);
            }
            if !complete {
                if probes.iter().any(|p| p.sees_registers()) {
                    vcpu.complete_registers(&mut regs)?;
                    complete = true;
                } else {
                    // What the instruction writes whole is never read.
                    let used =
                        (run.registers_used() | trap_registers) & !run.registers_overwritten();
                    if used != 0 {
                        vcpu.complete_registers_in(&mut regs, used)?;
                    }
                }
            }
            if chained == 0 {
                let counter = if hw {
                    &self.exits.hw_breakpoints
                } else {
                    &self.exits.breakpoints
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            state.site_hits += 1;
            // (On x86 the trap clears RF below anyway: nothing the guest resumes with changes.)
            A::at_hit(&mut regs);
            self.run_handlers(vcpu.id(), pc, &probes, &regs, false, None, None);
            self.enter_returns(&probes, &mut regs);
            let has_post = probes.iter().any(|p| p.post.is_some());
            self.exits.by_plan[run.kind() as usize].fetch_add(1, Ordering::Relaxed);
            A::after_trap(&mut regs);

            match &*run {
                SiteRun::Emulate {
                    emulation: emu,
                    fallback,
                } => {
                    if self.emulate(emu, &mut regs).is_err() {
                        // The stack is not accessible from here: the real instruction runs in
                        // its boosted slot, where the guest takes its own fault.
                        if let Some(slot) = fallback {
                            self.exits
                                .emulation_fallbacks
                                .fetch_add(1, Ordering::Relaxed);
                            regs.set_pc(slot.va);
                            vcpu.set_registers(&regs)?;
                            return Ok(Verdict::Resume);
                        }
                        // No copy to run instead (none could be made, or the architecture
                        // has no slots): the guest's own instruction goes back under the trap
                        // and runs, taking its own fault; resuming on the trap would loop.
                        for p in probes.iter() {
                            p.counters.missed.fetch_add(1, Ordering::Relaxed);
                        }
                        self.disarm(
                            gpa,
                            "its emulation could not reach the memory it accesses, and there is no copy to run instead",
                        );
                        vcpu.set_registers(&regs)?;
                        return Ok(Verdict::Resume);
                    }
                    vcpu.overwrote(emu.registers_overwritten());
                    if has_post {
                        self.run_handlers(vcpu.id(), pc, &probes, &regs, true, None, None);
                    }
                    if emu.opens_interrupt_shadow() {
                        // `sti` blocks interrupts for one more instruction (`sti; hlt` relies
                        // on it): the VMM sets the shadow, and the chain stops here.
                        vcpu.set_registers(&regs)?;
                        vcpu.block_interrupts_once()?;
                        return Ok(Verdict::Resume);
                    }
                    pc = regs.pc();
                }
                SiteRun::OutOfLine {
                    ool,
                    boosted,
                    trapped,
                    fixed_up,
                } => {
                    return self.start_step(
                        vcpu,
                        state,
                        regs,
                        gpa,
                        ool,
                        *boosted,
                        *trapped,
                        has_post || *fixed_up,
                        &probes,
                    );
                }
                // Filtered out above: a jump site's hits never reach the host as exits.
                SiteRun::Jump { .. } => break,
            }
        }
        vcpu.set_registers(&regs)?;
        Ok(Verdict::Resume)
    }

    /// What to do with a trap at `pc` where no probe is: a hardware breakpoint that was just
    /// removed resumes where it is (the debug registers are reloaded before the next entry);
    /// a breakpoint that is no longer there (ours removed while this exit was on its way, or
    /// the guest's own taken out by text patching) is retried as the guest's own handler would;
    /// otherwise the trap is the guest's own breakpoint and goes back to it.
    pub(super) fn not_probed(
        &self,
        pc: u64,
        space: A::AddressSpace,
        hw: bool,
    ) -> Result<Verdict, VcpuError> {
        if hw {
            return Ok(Verdict::Resume);
        }
        if let Ok(t) = A::translate(&self.mem, space, pc) {
            // One of hvprobe's breakpoints reached through another mapping of its page (code
            // copied or run from an alias hvprobe could not tell apart at planting): never the
            // guest's to handle. The site is disarmed and the guest's instruction runs.
            let aliased = {
                let table = self.table.read().unwrap_or_else(|e| e.into_inner());
                table
                    .sites
                    .get(&t.gpa)
                    .filter(|s| s.va != pc && s.disarmed.get().is_none())
                    .map(|s| s.probes.clone())
            };
            if let Some(probes) = aliased {
                for p in probes.iter() {
                    p.counters.missed.fetch_add(1, Ordering::Relaxed);
                }
                self.disarm(
                    t.gpa,
                    "it was reached at another address than the one it was planted at",
                );
                return Ok(Verdict::Resume);
            }
            let mut bytes = [0u8; 16];
            let insn = &mut bytes[..A::BREAKPOINT.len()];
            if self.mem.read_phys(t.gpa, insn) && !A::is_breakpoint(insn) {
                return Ok(Verdict::Resume);
            }
            // One of hvprobe's own encodings where it planted nothing (a copy of probed text
            // made by the guest): the guest would take it for a bug of its own. Never handed
            // to it; the run stops with the reason instead.
            if A::is_own_breakpoint(insn) {
                return Err(VcpuError::StrayBreakpoint { pc });
            }
        }
        self.exits.reinjected.fetch_add(1, Ordering::Relaxed);
        Ok(Verdict::Reinject)
    }

    /// Sends the vCPU to the copy of the instruction: the boosted slot (copy, branch back: no
    /// further exit), or, when post handlers want control after it (or a fault of the copy
    /// must be rewound: `trap`), the trapped slot with interrupts off until its breakpoint (as
    /// Linux kprobes step out of line).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_step(
        &self,
        vcpu: &mut dyn VcpuAccess<A>,
        state: &mut VcpuProbeState,
        mut regs: A::Registers,
        gpa: u64,
        ool: &A::Copy,
        boosted: XolSlot,
        trapped: Option<XolSlot>,
        trap: bool,
        probes: &[Arc<ProbeEntry<A>>],
    ) -> Result<Verdict, VcpuError> {
        let (slot, trapping) = match trapped {
            Some(t) if trap || !self.boosted_slots() => (t, true),
            _ => (boosted, false),
        };
        // A boosted slot run from the XOL code's alias (arm64) lies in kernel page tables the
        // guest never reuses, mapped at planting like the jump plan's trampolines; the XOL
        // area's own entry is one the guest could take, checked at every use.
        let from_alias = !trapping && self.jump_code_va(self.xol_va_base) != self.xol_va_base;
        let mapped = from_alias || {
            vcpu.complete_registers_in(&mut regs, A::KERNEL_SPACE_REGISTERS)?;
            self.ensure_xol_mapped(A::address_space(&regs)).is_ok()
        };
        if trapping {
            vcpu.complete_registers_in(&mut regs, A::TRAP_REGISTERS)?;
        }
        if !mapped {
            // The slot cannot be reached in this address space (the guest took the hole): the
            // instruction cannot run out of line, and leaving the trap in place would trap
            // forever. Disarm the site (the guest's byte goes back), count the miss, and let
            // the vCPU run the original instruction.
            for p in probes {
                p.counters.missed.fetch_add(1, Ordering::Relaxed);
            }
            self.disarm(
                gpa,
                "the out-of-line slots could not be mapped in the guest's address space",
            );
            vcpu.set_registers(&regs)?;
            return Ok(Verdict::Resume);
        };
        if trapping {
            let trap_va = slot.va + ool.copy_len(regs.pc());
            state.pending.push(PendingStep {
                slot_va: slot.va,
                trap_va,
                orig_va: regs.pc(),
                interrupts: A::begin_trapped_step(&mut regs),
                since: Instant::now(),
            });
        }
        regs.set_pc(slot.va);
        vcpu.set_registers(&regs)?;
        Ok(Verdict::Resume)
    }

    /// A trapped slot's breakpoint: back to the original stream after the copied instruction,
    /// the interrupt mask as it was at the hit, post handlers.
    pub(super) fn finish_trapped_step(
        &self,
        vcpu: &mut dyn VcpuAccess<A>,
        state: &mut VcpuProbeState,
        mut regs: A::Registers,
        pc: u64,
        trap: SlotTrap,
    ) -> Result<Verdict, VcpuError> {
        self.exits.slot_traps.fetch_add(1, Ordering::Relaxed);
        let probes = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            table
                .sites
                .get(&trap.site_gpa)
                .map(|s| s.probes.clone())
                .unwrap_or_default()
        };
        let has_post = probes.iter().any(|p| p.post.is_some());
        if has_post {
            vcpu.complete_registers(&mut regs)?;
        }
        regs.set_pc(trap.orig_va + trap.len);
        match state.pending.iter().rposition(|p| p.trap_va == pc) {
            Some(i) => {
                let step = state.pending.remove(i);
                A::finish_trapped_step(&mut regs, step.interrupts);
            }
            // Not started on this vCPU (it cannot move with interrupts off, but a guest can
            // jump anywhere): the flags stay as the guest has them.
            None => {
                self.exits.abandoned_steps.fetch_add(1, Ordering::Relaxed);
            }
        }
        vcpu.set_registers(&regs)?;
        if has_post {
            self.run_handlers(vcpu.id(), trap.orig_va, &probes, &regs, true, None, None);
        }
        Ok(Verdict::Resume)
    }

    /// An exception vCPU's guest took with `return_pc` as its return address (arm64's
    /// ELR_EL1), reported by the VMM before the guest's handler runs: when that is inside the
    /// copy of a trapped step under way on this vCPU, the step is over, and the exception
    /// becomes the probed instruction's, as Linux's `kprobe_fault_handler` makes it: the VMM
    /// sets the return address to [`SlotRewind::resume_at`] and puts back the interrupt mask
    /// the step saved. The guest's handler then finds the instruction's exception-table entry
    /// (a user access fed a bad pointer), or reports its own fault at the right address; a
    /// fault it resolves re-executes the probed instruction, whose probe fires again.
    pub fn rewind_slot_exception(
        &self,
        state: &mut VcpuProbeState,
        return_pc: u64,
    ) -> Option<SlotRewind> {
        let i = state
            .pending
            .iter()
            .rposition(|p| (p.slot_va..p.trap_va).contains(&return_pc))?;
        let step = state.pending.remove(i);
        self.exits.slot_exceptions.fetch_add(1, Ordering::Relaxed);
        Some(SlotRewind {
            resume_at: step.orig_va,
            interrupts: step.interrupts,
        })
    }

    /// Forgets trapped steps that never reached their trap within [`ABANDONED_AFTER`].
    pub(super) fn drop_abandoned(&self, state: &mut VcpuProbeState) {
        let before = state.pending.len();
        state
            .pending
            .retain(|p| p.since.elapsed() < ABANDONED_AFTER);
        let dropped = (before - state.pending.len()) as u64;
        if dropped > 0 {
            self.exits
                .abandoned_steps
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }

    pub(super) fn emulate(
        &self,
        emu: &A::Emulation,
        regs: &mut A::Registers,
    ) -> Result<(), EmulationError> {
        let mut stack = VirtualStack::<A, M> {
            mem: &self.mem,
            space: A::address_space(regs),
        };
        emu.apply(regs, &mut stack)
    }
}
