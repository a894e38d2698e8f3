//! The probe table: planting (the boundary walk, the plan, the slots, the trap written last),
//! removal, and the XOL slots and trampoline the sites use.

use super::*;
use crate::arch::PlanOf;

impl<A: Arch, M: GuestMemory + Send + Sync> ProbeEngine<A, M> {
    pub(super) fn read_virt_bytes(
        &self,
        location: &str,
        space: A::AddressSpace,
        va: u64,
        len: usize,
    ) -> Result<Vec<u8>, PlantError> {
        let mut buf = vec![0u8; len];
        // Read what is readable: code near the end of a mapping may be shorter than `len`.
        for (i, b) in buf.iter_mut().enumerate() {
            let at = va.wrapping_add(i as u64);
            match A::translate(&self.mem, space, at) {
                Ok(t) if self.mem.read_phys(t.gpa, std::slice::from_mut(b)) => {}
                _ if i > 0 => {
                    return Ok(buf[..i].to_vec());
                }
                Ok(t) => {
                    return Err(PlantError::new(
                        location,
                        PlantErrorKind::Memory { gpa: t.gpa },
                    ));
                }
                Err(source) => {
                    return Err(PlantError::new(
                        location,
                        PlantErrorKind::NotMapped { va: at, source },
                    ));
                }
            }
        }
        Ok(buf)
    }

    /// Plants `probe` at `target`, using the page tables in `regs` (any vCPU's, all map kernel
    /// text alike). A pipeline of named stages: the target is checked, the instruction decoded
    /// and planned, and every refusal made, before [`ProbeEngine::commit_site`], the only stage
    /// that writes (slots, the XOL mapping, the trap, the table): on error nothing in the guest
    /// has changed. A probe at a site already planted joins it ([`ProbeEngine::join_site`]).
    /// Call with every vCPU out of `KVM_RUN`.
    pub fn plant(
        &self,
        probe: Probe<A>,
        target: PlantTarget,
        regs: &A::Registers,
    ) -> Result<ProbeId, PlantError> {
        if let Some(spec) = probe.watch {
            return self.plant_watch(probe, spec, target, regs);
        }
        if let Some(spec) = probe.protect {
            return self.plant_protect(probe, spec, target, regs);
        }
        let space = A::address_space(regs);
        let gpa = self.check_target(&probe, target, space)?;
        // A probe that needs exits may turn a jump site into a trapped one: the hits its
        // trampoline recorded so far go to the handlers first.
        if !probe.in_guest && self.has_jump_sites() {
            self.drain_jump_rings();
        }
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if probe.on_return.is_some() {
            let at_known_entry = target.function_start == Some(target.va);
            if let Some(reason) = A::return_probe_refusal(table.cpu_features, at_known_entry) {
                return Err(PlantError::new(
                    probe.location.clone(),
                    PlantErrorKind::ReturnProbeRefused { reason },
                ));
            }
        }
        if let Some(site) = table.sites.get(&gpa) {
            // The trampoline serves only probes that need no more than it records, with its
            // own task filter.
            if matches!(&*site.run, SiteRun::Jump { filter, .. }
                if !probe.in_guest || *filter != probe.record_filter)
            {
                return self.trap_jump_site(&mut table, gpa, probe, target, space);
            }
            return self.join_site(&mut table, gpa, probe, space);
        }
        check_guest_kprobes(&table, &probe.location, target.va)?;
        check_patched_text(&table, &probe.location, target.va)?;
        let decoded = self.decode_site(&table, &probe.location, space, target)?;
        let plan = self.plan_site(&table, &probe, target, decoded)?;
        self.commit_site(&mut table, gpa, target, probe, plan, space)
    }

    /// Stage 1: the target is mapped (its guest physical address), and a return probe sits at
    /// its function's entry.
    fn check_target(
        &self,
        probe: &Probe<A>,
        target: PlantTarget,
        space: A::AddressSpace,
    ) -> Result<u64, PlantError> {
        let location = &probe.location;
        let gpa = A::translate(&self.mem, space, target.va)
            .map_err(|source| {
                PlantError::new(
                    location.clone(),
                    PlantErrorKind::NotMapped {
                        va: target.va,
                        source,
                    },
                )
            })?
            .gpa;
        if probe.on_return.is_some() && target.function_start.is_some_and(|f| f != target.va) {
            return Err(PlantError::new(
                location.clone(),
                PlantErrorKind::NotFunctionEntry,
            ));
        }
        Ok(gpa)
    }

    /// A probe at a site that has probes already: it shares their trap and plan. A site whose
    /// trap was taken out (disarmed) refuses it with the reason, rather than take a probe that
    /// would never fire.
    fn join_site(
        &self,
        table: &mut ProbeTable<A>,
        gpa: u64,
        probe: Probe<A>,
        space: A::AddressSpace,
    ) -> Result<ProbeId, PlantError> {
        let location = probe.location.clone();
        let site = table.sites.get(&gpa).expect("joined site present");
        if let Some(&reason) = site.disarmed.get() {
            return Err(PlantError::new(
                location,
                PlantErrorKind::DisarmedSite {
                    va: site.va,
                    reason,
                },
            ));
        }
        if site.trap != probe.trap {
            return Err(PlantError::new(location, PlantErrorKind::MixedTraps));
        }
        let trapped = match &*site.run {
            SiteRun::OutOfLine {
                ool, trapped: None, ..
            } if probe.post.is_some() => {
                self.map_xol(&location, space)?;
                Some(self.trapped_slot(&location, &site.instruction, ool, site.va)?)
            }
            _ => None,
        };
        if probe.on_return.is_some() {
            self.map_xol(&location, space)?;
            self.trampoline(&location)?;
        }
        let id = ProbeId(table.next_id);
        table.next_id += 1;
        let site = table.sites.get_mut(&gpa).expect("site present");
        if let (Some(slot), SiteRun::OutOfLine { trapped, .. }) =
            (trapped, Arc::make_mut(&mut site.run))
        {
            *trapped = Some(slot);
        }
        let site_va = site.va;
        let run = site.run.clone();
        Arc::make_mut(&mut site.probes).push(ProbeEntry::new(id, location, probe));
        if let (Some(slot), SiteRun::OutOfLine { ool, .. }) = (trapped, &*run) {
            table.slot_traps.insert(
                slot.va + ool.copy_len(site_va),
                SlotTrap {
                    orig_va: site_va,
                    len: ool.original_len(),
                    site_gpa: gpa,
                },
            );
        }
        table.by_probe.insert(id, gpa);
        Ok(id)
    }

    /// A probe that needs exits (a return probe, a post handler, memory reads) added to a jump
    /// site: the site becomes a trapped one for all its probes (the jump plan's probes need
    /// nothing an exit does not give). The guest's bytes go back under the site and it is
    /// planned and committed afresh with the new probe, then the jump plan's probes join it
    /// with their ids and counters. Their trampoline stays where it is, never reused (a task
    /// preempted inside it finishes it). On error the jump is put back: nothing changed.
    fn trap_jump_site(
        &self,
        table: &mut ProbeTable<A>,
        gpa: u64,
        probe: Probe<A>,
        target: PlantTarget,
        space: A::AddressSpace,
    ) -> Result<ProbeId, PlantError> {
        let old = table.sites.remove(&gpa).expect("the jump site");
        let location = probe.location.clone();
        // What the trampoline dropped so far stays counted as its probes' missed.
        if let SiteRun::Jump { tag, .. } = *old.run {
            let (dropped, filtered) = self.jump_site_counts(tag);
            for p in old.probes.iter() {
                p.counters.missed.fetch_add(dropped, Ordering::Relaxed);
                p.counters.hits.fetch_add(filtered, Ordering::Relaxed);
            }
        }
        let write = |bytes: &[u8]| {
            self.mem
                .write_slice(bytes, GuestAddress(gpa))
                .map_err(|_| PlantError::new(location.clone(), PlantErrorKind::Memory { gpa }))
                .map(|()| self.wrote_code(gpa, bytes.len()))
        };
        write(&old.saved)?;
        let planted = check_guest_kprobes(table, &probe.location, target.va)
            .and_then(|()| self.decode_site(table, &probe.location, space, target))
            .and_then(|decoded| self.plan_site(table, &probe, target, decoded))
            .and_then(|plan| self.commit_site(table, gpa, target, probe, plan, space));
        match planted {
            Ok(id) => {
                let site = table.sites.get_mut(&gpa).expect("the site just committed");
                Arc::make_mut(&mut site.probes).extend(old.probes.iter().cloned());
                site.jump_refusal = Some("a probe that needs exits joined the site");
                Ok(id)
            }
            Err(e) => {
                write(&old.patch)?;
                table.sites.insert(gpa, old);
                Err(e)
            }
        }
    }

    /// Stage 2: the instruction at the target, decoded from the guest's own bytes (ours and
    /// the guest's kprobes read through), on an instruction boundary of its function, with the
    /// decoder's plan for it (or its refusal, naming the instruction).
    fn decode_site(
        &self,
        table: &ProbeTable<A>,
        location: &str,
        space: A::AddressSpace,
        target: PlantTarget,
    ) -> Result<DecodedSite<A>, PlantError> {
        let decode_err = |source| PlantError::new(location, PlantErrorKind::Decode { source });
        // Capstone handles are not Send; planting is rare, so each plant makes its own.
        let decoder = A::Decoder::new(table.cpu_features).map_err(decode_err)?;
        let mut preceding = Vec::new();
        if let Some(start) = target.function_start.filter(|s| *s < target.va) {
            let offset = target.va - start;
            let mut code = self.read_virt_bytes(
                location,
                space,
                start,
                offset as usize + A::MAX_INSN_LEN + 1,
            )?;
            // Decode what the guest wrote, not our own breakpoints, nor the guest's kprobes
            // (kprobes' recover_probed_instruction).
            let originals = table
                .sites
                .values()
                .map(|site| (site.va, &site.saved[..]))
                .chain(
                    table
                        .guest_kprobes
                        .iter()
                        .flatten()
                        .map(|(va, kp)| (*va, &kp.original[..])),
                );
            for (va, bytes) in originals {
                if let Some(i) = va.checked_sub(start).map(|i| i as usize) {
                    for (j, b) in bytes.iter().enumerate() {
                        if let Some(c) = code.get_mut(i + j) {
                            *c = *b;
                        }
                    }
                }
            }
            let guest = if table.guest_kprobes.is_some() {
                GuestBreakpoints::Known
            } else {
                GuestBreakpoints::Unknown
            };
            decoder
                .check_boundary(&code, start, offset, guest)
                .map_err(decode_err)?;
            code.truncate(offset as usize);
            preceding = code;
        }
        let code = self.read_virt_bytes(location, space, target.va, A::MAX_INSN_LEN + 1)?;
        let insn = decoder.decode(&code, target.va).map_err(decode_err)?;
        let plan = decoder
            .check_context(&preceding, &insn)
            .and_then(|()| decoder.plan(&insn))
            .map_err(|source| PlantError::new(location, PlantErrorKind::Refused { source }))?;
        let fallback = match &plan {
            StepPlan::Emulate(e) if e.touches_stack() => decoder.fallback_copy(&insn),
            _ => None,
        };
        Ok(DecodedSite {
            insn,
            plan,
            fallback,
        })
    }

    /// Stage 3, pure: what this engine can do with the plan (an exception-table entry needs
    /// the slot-exception rewind; a hardware breakpoint needs a free one; a post handler needs
    /// a trappable copy; a copy needs to reach back from the XOL area). Writes nothing.
    fn plan_site(
        &self,
        table: &ProbeTable<A>,
        probe: &Probe<A>,
        target: PlantTarget,
        decoded: DecodedSite<A>,
    ) -> Result<SitePlan<A>, PlantError> {
        let location = &probe.location;
        let DecodedSite {
            insn,
            plan,
            fallback,
        } = decoded;
        // A user access (or any instruction the kernel expects to fault) runs only where its
        // fault is rewound to it: stepped in a trapped slot, with the VMM watching for it.
        let fixed_up = table.exception_table.contains(&target.va);
        if fixed_up
            && !(self.slot_exception_rewind.load(Ordering::SeqCst)
                && matches!(plan, StepPlan::StepOutOfLine(_)))
        {
            return Err(PlantError::new(
                location.clone(),
                PlantErrorKind::ExceptionTable {
                    instruction: insn.text().into(),
                    va: target.va,
                },
            ));
        }
        let hw_index = match probe.trap {
            TrapKind::Hardware => Some(table.hw.iter().position(Option::is_none).ok_or(
                PlantError::new(
                    location.clone(),
                    PlantErrorKind::NoHardwareBreakpoint {
                        count: table.hw.len(),
                    },
                ),
            )?),
            TrapKind::Software => None,
        };
        let copy = match &plan {
            StepPlan::StepOutOfLine(ool) => Some(ool),
            StepPlan::Emulate(_) => fallback.as_ref(),
        };
        if let (Some(reason), StepPlan::StepOutOfLine(_), true) = (
            copy.and_then(|c| c.untrappable()),
            &plan,
            probe.post.is_some(),
        ) {
            return Err(PlantError::new(
                location.clone(),
                PlantErrorKind::Untrappable {
                    instruction: insn.text().into(),
                    reason,
                },
            ));
        }
        if let Some(ool) = copy
            && if self.boosted_slots() {
                ool.boosted_slot(target.va, self.jump_code_va(self.xol_va_base))
            } else {
                ool.trapped_slot(target.va, self.xol_va_base)
            }
            .is_none()
        {
            return Err(PlantError::new(
                location.clone(),
                PlantErrorKind::OutOfReach {
                    instruction: insn.text().into(),
                },
            ));
        }
        // A probe that may run in the guest takes a jump where the site allows; else it takes
        // exits as any other, and the reason is kept for the summary.
        let (jump, jump_refusal) = if probe.in_guest {
            match self
                .jump_spec(probe, fixed_up, target, self.jump_code_va(self.xol_va_base))
                .and_then(|spec| A::jump_patch(&plan, &insn, &spec).map(|_| spec))
            {
                Ok(spec) => (Some(spec), None),
                Err(why) => (None, Some(why)),
            }
        } else {
            (None, None)
        };
        Ok(SitePlan {
            insn,
            plan,
            fallback,
            fixed_up,
            hw_index,
            jump,
            jump_refusal,
        })
    }

    /// Stage 4, the only writer: the XOL mapping and trampoline where needed, the slots, the
    /// trap (the breakpoint written last of all guest-visible text, or the debug register),
    /// and the table.
    fn commit_site(
        &self,
        table: &mut ProbeTable<A>,
        gpa: u64,
        target: PlantTarget,
        probe: Probe<A>,
        site: SitePlan<A>,
        space: A::AddressSpace,
    ) -> Result<ProbeId, PlantError> {
        let location = probe.location.clone();
        // Unknown counts as guarded: the flags are then read, never wrongly left.
        let guarded = A::translate(&self.mem, space, target.va).map_or(true, |t| t.guarded);
        let SitePlan {
            insn,
            plan,
            fallback,
            fixed_up,
            hw_index,
            jump,
            jump_refusal,
        } = site;
        if let Some(spec) = jump {
            self.map_xol(&location, space)?;
            self.map_code_alias(&location, space)?;
            let filter = spec.filter.clone();
            let (tag, patch) = self.commit_jump(&location, gpa, &plan, &insn, spec)?;
            let id = ProbeId(table.next_id);
            table.next_id += 1;
            table.by_probe.insert(id, gpa);
            table.touched.push((target.va, patch.len() as u64));
            table.sites.insert(
                gpa,
                Site {
                    va: target.va,
                    trap: probe.trap,
                    saved: insn.bytes()[..patch.len()].to_vec(),
                    instruction: insn.text().into(),
                    run: Arc::new(SiteRun::Jump { tag, filter }),
                    disarmed: std::sync::OnceLock::new(),
                    rate: Arc::default(),
                    patch,
                    jump_refusal: None,
                    guarded,
                    probes: Arc::new(vec![ProbeEntry::new(id, location, probe)]),
                },
            );
            return Ok(id);
        }
        let copy = match &plan {
            StepPlan::StepOutOfLine(ool) => Some(ool),
            StepPlan::Emulate(_) => fallback.as_ref(),
        };
        if copy.is_some() || probe.on_return.is_some() {
            self.map_xol(&location, space)?;
        }
        if probe.on_return.is_some() {
            self.trampoline(&location)?;
        }
        // Where the architecture has no boosted slots, the one slot is a trapped one, and
        // every step goes through its breakpoint.
        let boosting = self.boosted_slots();
        if boosting && copy.is_some() {
            self.map_code_alias(&location, space)?;
        }
        let boosted = copy
            .map(|ool| {
                if boosting {
                    self.boosted_slot(&location, insn.text(), ool, target.va)
                } else {
                    self.trapped_slot(&location, insn.text(), ool, target.va)
                }
            })
            .transpose()?;
        let trapped = match &plan {
            StepPlan::StepOutOfLine(_) if !boosting => boosted,
            StepPlan::StepOutOfLine(ool) if probe.post.is_some() || fixed_up => {
                Some(self.trapped_slot(&location, insn.text(), ool, target.va)?)
            }
            _ => None,
        };
        let run: SiteRun<A> = match plan {
            StepPlan::Emulate(emulation) => SiteRun::Emulate {
                emulation,
                fallback: boosted,
            },
            StepPlan::StepOutOfLine(ool) => SiteRun::OutOfLine {
                // An out-of-line plan always has its copy (made above, or refused there).
                boosted: boosted.ok_or(PlantError::new(
                    location.clone(),
                    PlantErrorKind::OutOfReach {
                        instruction: insn.text().into(),
                    },
                ))?,
                ool,
                trapped,
                fixed_up,
            },
        };
        let saved = insn.bytes()[..A::BREAKPOINT.len()].to_vec();
        if probe.trap == TrapKind::Software {
            self.will_write_breakpoint(&location, "a software-breakpoint probe")?;
            self.mem
                .write_slice(A::BREAKPOINT, GuestAddress(gpa))
                .map_err(|_| PlantError::new(location.clone(), PlantErrorKind::Memory { gpa }))?;
            self.wrote_code(gpa, A::BREAKPOINT.len());
        }
        if let Some(i) = hw_index {
            table.hw[i] = Some(target.va);
            self.hw_generation.fetch_add(1, Ordering::SeqCst);
        }
        let id = ProbeId(table.next_id);
        table.next_id += 1;
        table.by_probe.insert(id, gpa);
        if let SiteRun::OutOfLine {
            ool,
            trapped: Some(slot),
            ..
        } = &run
        {
            table.slot_traps.insert(
                slot.va + ool.copy_len(target.va),
                SlotTrap {
                    orig_va: target.va,
                    len: insn.bytes().len() as u64,
                    site_gpa: gpa,
                },
            );
        }
        table.sites.insert(
            gpa,
            Site {
                va: target.va,
                trap: probe.trap,
                saved,
                instruction: insn.text().into(),
                run: Arc::new(run),
                disarmed: std::sync::OnceLock::new(),
                rate: Arc::default(),
                patch: A::BREAKPOINT.to_vec(),
                jump_refusal,
                guarded,
                probes: Arc::new(vec![ProbeEntry::new(id, location, probe)]),
            },
        );
        table.index_site_va(target.va);
        table.touched.push((target.va, A::BREAKPOINT.len() as u64));
        Ok(id)
    }

    /// Maps the XOL area in `space` (and, through the kernel table they share, in every
    /// address space).
    pub(super) fn map_xol(&self, location: &str, space: A::AddressSpace) -> Result<(), PlantError> {
        self.ensure_xol_mapped(space)
            .map_err(|source| PlantError::new(location, PlantErrorKind::Xol { source }))
    }

    /// Makes sure the XOL area is mapped in `space` (checked, and written if absent, at every
    /// use: the guest could take the hole).
    pub(super) fn ensure_xol_mapped(&self, space: A::AddressSpace) -> Result<(), XolError> {
        self.map_xol_in(space).map(|_| ())
    }

    /// Maps the XOL area in the address space `space` (the VMM calls it with the kernel's
    /// initial page tables, before any vCPU has run); returns whether it wrote.
    pub fn map_xol_in(&self, space: A::AddressSpace) -> Result<bool, XolError> {
        let xol = self.xol.lock().unwrap_or_else(|e| e.into_inner());
        A::ensure_xol_mapped(&xol, &self.mem, space)
    }

    /// Takes a fresh XOL slot and writes what `bytes` makes of its address into it, the
    /// architecture's slot breakpoint after.
    pub(super) fn fill_slot(
        &self,
        location: &str,
        bytes: impl FnOnce(u64) -> Option<Vec<u8>>,
    ) -> Result<Option<XolSlot>, PlantError> {
        let slot = self
            .xol
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate()
            .map_err(|source| PlantError::new(location, PlantErrorKind::Xol { source }))?;
        let Some(code) = bytes(slot.va) else {
            return Ok(None);
        };
        let mut fill: Vec<u8> = A::SLOT_BREAKPOINT
            .iter()
            .copied()
            .cycle()
            .take(A::XOL.slot_size as usize)
            .collect();
        fill[..code.len()].copy_from_slice(&code);
        self.mem
            .write_slice(&fill, GuestAddress(slot.gpa))
            .map_err(|_| PlantError::new(location, PlantErrorKind::Memory { gpa: slot.gpa }))?;
        self.wrote_code(slot.gpa, fill.len());
        Ok(Some(slot))
    }

    /// A boosted slot for the instruction at `va`: its copy, then a branch back to `va + len`.
    pub(super) fn boosted_slot(
        &self,
        location: &str,
        instruction: &str,
        ool: &A::Copy,
        va: u64,
    ) -> Result<XolSlot, PlantError> {
        // Written through the XOL area, run where the code pages reach the text.
        self.copy_slot(location, instruction, |slot| {
            ool.boosted_slot(va, self.jump_code_va(slot))
        })
        .map(|slot| XolSlot {
            va: self.jump_code_va(slot.va),
            ..slot
        })
    }

    /// A trapped slot for the instruction at `va`: its copy, then the host's breakpoint.
    pub(super) fn trapped_slot(
        &self,
        location: &str,
        instruction: &str,
        ool: &A::Copy,
        va: u64,
    ) -> Result<XolSlot, PlantError> {
        if let Some(reason) = ool.untrappable() {
            return Err(PlantError::new(
                location,
                PlantErrorKind::Untrappable {
                    instruction: instruction.into(),
                    reason,
                },
            ));
        }
        self.will_write_breakpoint(location, "a post handler after a stepped instruction")?;
        self.copy_slot(location, instruction, |slot| ool.trapped_slot(va, slot))
    }

    /// A slot holding a copy of `instruction` that `bytes` makes for the slot's address; a copy
    /// that cannot be relocated there is out of reach.
    pub(super) fn copy_slot(
        &self,
        location: &str,
        instruction: &str,
        bytes: impl FnOnce(u64) -> Option<Vec<u8>>,
    ) -> Result<XolSlot, PlantError> {
        self.fill_slot(location, bytes)?.ok_or_else(|| {
            PlantError::new(
                location,
                PlantErrorKind::OutOfReach {
                    instruction: instruction.into(),
                },
            )
        })
    }

    /// The return trampoline: an XOL slot of breakpoints that replaced return addresses point
    /// to.
    pub(super) fn trampoline(&self, location: &str) -> Result<XolSlot, PlantError> {
        let mut t = self.trampoline.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = *t {
            return Ok(slot);
        }
        self.will_write_breakpoint(location, "a return probe (its trampoline is a breakpoint)")?;
        let slot = self
            .fill_slot(location, |_| Some(Vec::new()))?
            .expect("an empty slot always fits");
        *t = Some(slot);
        Ok(slot)
    }

    /// Removes one probe; the breakpoint goes when its last probe goes. Returns a rewritten
    /// site if the guest had replaced the trap byte (then the guest's bytes are kept).
    pub fn remove(&self, id: ProbeId) -> Result<Option<RewrittenSite>, RemoveError> {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if self.remove_watch(&mut table, id) || self.remove_protect(&mut table, id) {
            return Ok(None);
        }
        let gpa = table
            .by_probe
            .remove(&id)
            .ok_or(RemoveError::UnknownProbe(id))?;
        let site = table.sites.get_mut(&gpa).expect("site of a planted probe");
        Arc::make_mut(&mut site.probes).retain(|p| p.id != id);
        if !site.probes.is_empty() {
            return Ok(None);
        }
        let site = table.sites.remove(&gpa).expect("site present");
        table.index_site_va(site.va);
        if site.disarmed.get().is_some() || site.rate.paused() {
            return Ok(None);
        }
        if site.trap == TrapKind::Hardware {
            table.free_breakpoint_slots(site.va);
            self.hw_generation.fetch_add(1, Ordering::SeqCst);
            return Ok(None);
        }
        let mut now = vec![0u8; site.saved.len()];
        if !self.mem.read_phys(gpa, &mut now) {
            return Err(RemoveError::Memory { va: site.va, gpa });
        }
        if now != site.patch {
            return Ok(Some(RewrittenSite {
                va: site.va,
                found: now,
            }));
        }
        self.mem
            .write_slice(&site.saved, GuestAddress(gpa))
            .map_err(|_| RemoveError::Memory { va: site.va, gpa })?;
        self.wrote_code(gpa, site.saved.len());
        Ok(None)
    }

    /// Puts the guest's own bytes back wherever `bytes`, read from guest virtual `start`, holds
    /// one of the engine's patches (a breakpoint, a jump), so that a comparison of the kernel's
    /// text with an earlier state sees the guest's changes and not hvprobe's. Bytes that hold
    /// something else at a site (the guest rewrote it) are left as they are.
    pub fn without_own_patches(&self, start: u64, bytes: &mut [u8]) {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let end = start.saturating_add(bytes.len() as u64);
        for site in table.sites.values() {
            if site.va < start || site.va.saturating_add(site.patch.len() as u64) > end {
                continue;
            }
            let at = (site.va - start) as usize;
            let here = &mut bytes[at..at + site.patch.len()];
            if *here == site.patch[..] && site.saved.len() == site.patch.len() {
                here.copy_from_slice(&site.saved);
            }
        }
    }

    /// The text ranges (address, length) of every site planted since the engine started,
    /// removed ones included.
    pub fn touched_text(&self) -> Vec<(u64, u64)> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.touched.clone()
    }

    /// Removes every probe; returns the sites the guest had rewritten.
    pub fn remove_all(&self) -> Vec<RewrittenSite> {
        let ids: Vec<ProbeId> = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            let mut ids: Vec<ProbeId> = table
                .by_probe
                .keys()
                .chain(table.watches.keys())
                .chain(table.protects.keys())
                .copied()
                .collect();
            ids.sort();
            ids
        };
        ids.into_iter()
            .filter_map(|id| self.remove(id).ok().flatten())
            .collect()
    }

    /// Takes the trap out of a site whose probes cannot run any more (`why`): the guest's
    /// bytes go back under a breakpoint; a hardware breakpoint is released (the VMM reloads
    /// the debug registers before the vCPU runs again). The probes stay listed, counting
    /// misses, and the site refuses new probes with `why`.
    pub(super) fn disarm(&self, gpa: u64, why: &'static str) {
        let paused = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            match table.sites.get(&gpa) {
                Some(site) if site.disarmed.set(why).is_ok() => site.rate.paused(),
                _ => return,
            }
        };
        if !paused {
            self.take_trap_out(gpa);
        }
    }

    /// The guest's bytes back under the site at `gpa`, or its hardware breakpoint released.
    pub(super) fn take_trap_out(&self, gpa: u64) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let Some(site) = table.sites.get(&gpa) else {
            return;
        };
        match site.trap {
            TrapKind::Software => {
                if self.mem.write_slice(&site.saved, GuestAddress(gpa)).is_ok() {
                    self.wrote_code(gpa, site.saved.len());
                }
            }
            TrapKind::Hardware => {
                let va = site.va;
                table.free_breakpoint_slots(va);
                self.hw_generation.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Puts a paused site's trap back (its breakpoint, or a free hardware breakpoint) and
    /// opens a new window; a disarmed site only stops being paused. Whether the trap is back.
    pub(super) fn put_trap_back(&self, gpa: u64) -> bool {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let Some(site) = table.sites.get(&gpa) else {
            return false;
        };
        let (va, trap, rate) = (site.va, site.trap, site.rate.clone());
        let disarmed = site.disarmed.get().is_some();
        let back = !disarmed
            && match trap {
                TrapKind::Software => {
                    let ok = self.mem.write_slice(&site.patch, GuestAddress(gpa)).is_ok();
                    if ok {
                        self.wrote_code(gpa, site.patch.len());
                    }
                    ok
                }
                TrapKind::Hardware => match table.hw.iter().position(Option::is_none) {
                    Some(i) => {
                        table.hw[i] = Some(va);
                        self.hw_generation.fetch_add(1, Ordering::SeqCst);
                        true
                    }
                    None => false,
                },
            };
        if back || disarmed {
            rate.resume();
        }
        back
    }

    /// Instructions were written at guest physical `gpa..gpa + len` (a breakpoint, a slot, the
    /// guest's bytes back): the architecture makes them visible to instruction fetch (arm64:
    /// the data and instruction caches cleaned and invalidated, as `__clear_cache` does), and
    /// the write is counted.
    pub(super) fn wrote_code(&self, gpa: u64, len: usize) {
        A::sync_instructions(&self.mem, gpa, len);
        self.instruction_syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// A breakpoint of the host's is about to be written (a site, a trapped slot, the
    /// trampoline): refused if this KVM cannot trap it, else recorded so that breakpoint
    /// exceptions are trapped from now on.
    pub(super) fn will_write_breakpoint(
        &self,
        location: &str,
        what: &'static str,
    ) -> Result<(), PlantError> {
        if !self.breakpoints_trappable.load(Ordering::SeqCst) {
            return Err(PlantError::new(
                location,
                PlantErrorKind::NeedsInt3 { what },
            ));
        }
        self.breakpoint_written.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The target is not one of the guest's own kprobes (nor inside an optimized kprobe's jump).
/// Refuses a site the guest kernel rewrites itself.
fn check_patched_text<A: Arch>(
    table: &ProbeTable<A>,
    location: &str,
    va: u64,
) -> Result<(), PlantError> {
    match table.patched_text.get(&va) {
        Some(&what) => Err(PlantError::new(
            location,
            PlantErrorKind::PatchedByKernel { va, what },
        )),
        None => Ok(()),
    }
}

fn check_guest_kprobes<A: Arch>(
    table: &ProbeTable<A>,
    location: &str,
    va: u64,
) -> Result<(), PlantError> {
    match table
        .guest_kprobes
        .iter()
        .flatten()
        .find(|(at, kp)| (**at..**at + kp.span).contains(&va))
    {
        Some((&kprobe, _)) => Err(PlantError::new(
            location,
            PlantErrorKind::GuestKprobe {
                va,
                kprobe,
                where_: if kprobe == va {
                    "at"
                } else {
                    "inside the optimized jump of"
                },
            },
        )),
        None => Ok(()),
    }
}

/// What [`ProbeEngine::decode_site`] found at a target.
struct DecodedSite<A: Arch> {
    insn: A::Instruction,
    plan: PlanOf<A>,
    /// The copy an emulated stack access falls back to.
    fallback: Option<A::Copy>,
}

/// A site as [`ProbeEngine::plan_site`] accepted it, ready to commit.
struct SitePlan<A: Arch> {
    /// The jump plan's spec, where the probe may run in the guest and the site allows.
    jump: Option<crate::jump::TrampolineSpec>,
    /// Why a probe that may run in the guest takes exits here.
    jump_refusal: Option<&'static str>,
    insn: A::Instruction,
    plan: PlanOf<A>,
    fallback: Option<A::Copy>,
    /// The instruction has an exception-table entry.
    fixed_up: bool,
    /// The hardware breakpoint it takes.
    hw_index: Option<usize>,
}
