//! The jump plan in the engine ([`crate::jump`]): which sites take it, their trampolines, and
//! the drain that turns the guest's records into handler calls on a host thread.

use super::*;
use crate::arch::PlanOf;
use crate::jump::{
    GuestAnchors, JumpPatch, JumpRecord, MAX_JUMP_SITES, RingLayout, TrampolineSpec,
};

/// How the guest's time stamp counter maps to the engine's clock: read once with the vCPUs
/// paused (the counter's value then, the engine's time then, and its rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestClock {
    /// The counter's value at `at`.
    pub counter: u64,
    /// The engine's time when the counter was read.
    pub at: std::time::Duration,
    /// Counts per millisecond.
    pub khz: u64,
}

impl GuestClock {
    /// The engine time of counter value `c`.
    fn time_of(&self, c: u64) -> std::time::Duration {
        let delta = c.wrapping_sub(self.counter) as i64;
        let micros = (i128::from(delta) * 1000 / i128::from(self.khz.max(1))) as i64;
        if micros >= 0 {
            self.at + std::time::Duration::from_micros(micros as u64)
        } else {
            self.at
                .saturating_sub(std::time::Duration::from_micros(micros.unsigned_abs()))
        }
    }
}

/// The jump plan's state: the rings (none until enabled), what the trampolines read, the
/// guest clock, and the site of each tag.
#[derive(Debug, Default)]
pub(super) struct JumpState {
    rings: Option<RingLayout>,
    anchors: GuestAnchors,
    clock: Option<GuestClock>,
    /// Guest physical address of each tag's site.
    sites: Vec<u64>,
    /// Text ranges no jump goes into, with why.
    excluded: Vec<(u64, u64, &'static str)>,
    /// Where the XOL code pages run for trampolines when that is not their own address
    /// ([`Arch::map_jump_code`]): the alias's base.
    code_alias: Option<u64>,
    /// The guest range the alias is in, mapped at each use.
    code_window: Option<(u64, u64)>,
}

impl<A: Arch, M: GuestMemory + Send + Sync> ProbeEngine<A, M> {
    /// Enables the jump plan: its rings at `rings` (in the XOL area's data pages, zeroed now),
    /// the trampolines reading the current CPU and task through `anchors`. Call before
    /// planting; probes marked [`Probe::in_guest`] then take a jump where the site allows.
    pub fn enable_jump(&self, rings: RingLayout, anchors: GuestAnchors) -> bool {
        if !rings.clear(&self.mem) {
            return false;
        }
        let mut j = self.jump.lock().unwrap_or_else(|e| e.into_inner());
        j.rings = Some(rings);
        j.anchors = anchors;
        true
    }

    /// Keeps jumps out of the guest text `[start, end)` (running addresses) for `why`: code
    /// that runs before the kernel's per-CPU base is loaded or on the user's page tables
    /// (entry text), or where the kernel allows no instrumentation (noinstr, cpuidle). Probes
    /// there take exits. Call before planting.
    pub fn exclude_from_jump(&self, start: u64, end: u64, why: &'static str) {
        self.jump
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .excluded
            .push((start, end, why));
    }

    /// Readies the XOL code for the running guest, once, with every vCPU paused: the XOL code
    /// pages mapped a second time in `space` inside `window` where the architecture
    /// runs code there ([`Arch::map_jump_code`]; arm64: the kernel's freed init range, within
    /// `b` reach of the text, for the jump plan's trampolines and for boosted slots); and, if
    /// the jump plan is on, the per-CPU symbols its trampolines read moved by the KASLR `slide`
    /// where they move with it. If the alias cannot be mapped, the jump plan is off (every
    /// probe takes exits), steps out of line use trapped slots, and the reason is returned.
    pub fn attach_code(
        &self,
        slide: u64,
        window: Option<(u64, u64)>,
        space: A::AddressSpace,
    ) -> Result<(), String> {
        let alias = (|| {
            let Some(w) = window else {
                return Ok(None);
            };
            // Checked now, written at the first trampoline or boosted slot: a run whose
            // probes are all refused leaves the guest's tables as they were.
            let xol = self.xol.lock().unwrap_or_else(|e| e.into_inner());
            A::map_jump_code(&xol, &self.mem, space, w, false).map_err(|e| e.to_string())
        })();
        let mut j = self.jump.lock().unwrap_or_else(|e| e.into_inner());
        match alias {
            Ok(alias) => {
                j.code_alias = alias;
                j.code_window = window.filter(|_| alias.is_some());
                if A::PER_CPU_SYMBOLS_SLIDE
                    && j.rings.is_some()
                    && let Some(c) = &mut j.anchors.cpu_number
                {
                    *c = c.wrapping_add(slide);
                }
                Ok(())
            }
            Err(e) => {
                // Without the alias an architecture that needs it has no trampoline in reach.
                if !A::BOOSTED_SLOTS {
                    j.rings = None;
                }
                Err(e)
            }
        }
    }

    /// Makes sure the XOL code pages' alias is mapped in `space` where there is one (checked
    /// absent-or-ours, and written, at every use, as the XOL area's own entry).
    pub(super) fn map_code_alias(
        &self,
        location: &str,
        space: A::AddressSpace,
    ) -> Result<(), PlantError> {
        let Some(window) = self
            .jump
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .code_window
        else {
            return Ok(());
        };
        let xol = self.xol.lock().unwrap_or_else(|e| e.into_inner());
        A::map_jump_code(&xol, &self.mem, space, window, true)
            .map(|_| ())
            .map_err(|source| PlantError::new(location, PlantErrorKind::Xol { source }))
    }

    /// Whether steps out of line run in boosted slots (the copy, then a branch back: one exit
    /// a hit): where the architecture's slots reach the text, or their alias does (arm64).
    pub(super) fn boosted_slots(&self) -> bool {
        A::BOOSTED_SLOTS
            || self
                .jump
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .code_alias
                .is_some()
    }

    /// Where code written at XOL address `va` runs (a trampoline, a boosted slot).
    pub(super) fn jump_code_va(&self, va: u64) -> u64 {
        let j = self.jump.lock().unwrap_or_else(|e| e.into_inner());
        j.code_alias
            .map_or(va, |alias| alias + (va - self.xol_va_base))
    }

    /// Says how the guest's time stamp counter maps to the engine's clock, so that drained
    /// hits carry the time they happened; `counter` is read now.
    pub fn set_guest_clock(&self, counter: u64, khz: u64) {
        let clock = GuestClock {
            counter,
            at: self.start.elapsed(),
            khz,
        };
        self.jump.lock().unwrap_or_else(|e| e.into_inner()).clock = Some(clock);
    }

    /// Whether any site has a jump plan (the VMM then runs a drain).
    pub fn has_jump_sites(&self) -> bool {
        !self
            .jump
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sites
            .is_empty()
    }

    /// Hits the trampolines could not record: on a CPU past the last ring, and in full or
    /// nested rings. `None` without rings.
    pub fn jump_dropped(&self) -> Option<(u64, u64)> {
        let j = self.jump.lock().unwrap_or_else(|e| e.into_inner());
        j.rings.map(|r| r.dropped(&self.mem))
    }

    /// Runs the handlers of every hit recorded in the rings since the last drain, per ring in
    /// order: counts them as hits of their probes (and of the jump plan). One drainer at a
    /// time (the VMM's drain thread, and with the vCPUs paused before removals and at the
    /// end). Returns how many records it took.
    pub fn drain_jump_rings(&self) -> usize {
        let _one = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        let (rings, anchors, clock, sites) = {
            let j = self.jump.lock().unwrap_or_else(|e| e.into_inner());
            match j.rings {
                Some(r) if !j.sites.is_empty() => (r, j.anchors, j.clock, j.sites.clone()),
                _ => return 0,
            }
        };
        let mut taken = 0;
        for cpu in 0..rings.cpus {
            taken += rings.drain(&self.mem, cpu, |rec| {
                self.deliver(cpu, rec, &anchors, clock, &sites);
            });
        }
        taken
    }

    /// One recorded hit: its site's probes' pre-handlers, against the recorded registers and
    /// memory. A record whose tag names no live jump site (removed since, or forged by the
    /// guest, which can write the rings) is dropped.
    fn deliver(
        &self,
        cpu: u32,
        rec: &JumpRecord,
        anchors: &GuestAnchors,
        clock: Option<GuestClock>,
        sites: &[u64],
    ) {
        let Some(&gpa) = sites.get(rec.tag as usize) else {
            return;
        };
        let (va, probes) = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            match table.sites.get(&gpa) {
                Some(s) if matches!(*s.run, SiteRun::Jump { tag, .. } if tag == rec.tag) => {
                    (s.va, s.probes.clone())
                }
                _ => return,
            }
        };
        let regs = A::jump_registers(rec);
        let memory = rec.memory(regs.sp(), anchors);
        let time = clock.map_or_else(|| self.start.elapsed(), |c| c.time_of(rec.time));
        self.exits.by_plan[PlanKind::Jump as usize].fetch_add(1, Ordering::Relaxed);
        self.run_handlers(cpu, va, &probes, &regs, false, Some((time, &memory)), None);
    }

    /// Hits the trampoline of jump site `tag` dropped (full ring, nesting), and hits its task
    /// filter left out.
    pub(super) fn jump_site_counts(&self, tag: u32) -> (u64, u64) {
        let j = self.jump.lock().unwrap_or_else(|e| e.into_inner());
        j.rings.map_or((0, 0), |r| {
            (
                r.site_missed(&self.mem, tag),
                r.site_filtered(&self.mem, tag),
            )
        })
    }

    /// Hits every jump site's task filter left out, counted in the guest.
    pub(super) fn jump_filtered_total(&self) -> u64 {
        let j = self.jump.lock().unwrap_or_else(|e| e.into_inner());
        j.rings.map_or(0, |r| {
            (0..j.sites.len() as u32)
                .map(|tag| r.site_filtered(&self.mem, tag))
                .sum()
        })
    }

    /// The trampolines' counts added to their probes': missed (full ring, nesting), and hits
    /// the task filter left out (hits all the same, as the exit plan counts them).
    pub(super) fn add_jump_missed(&self, stats: &mut [ProbeStats]) {
        let j = self.jump.lock().unwrap_or_else(|e| e.into_inner());
        let Some(rings) = j.rings else { return };
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        for s in stats.iter_mut().filter(|s| s.plan == PlanKind::Jump) {
            let tag = table
                .by_probe
                .get(&s.id)
                .and_then(|gpa| table.sites.get(gpa))
                .and_then(|site| match *site.run {
                    SiteRun::Jump { tag, .. } => Some(tag),
                    _ => None,
                });
            if let Some(tag) = tag {
                s.missed += rings.site_missed(&self.mem, tag);
                s.hits += rings.site_filtered(&self.mem, tag);
            }
        }
    }

    /// Why `probe` at `target` cannot take a jump plan, or the next tag and a spec to generate
    /// its trampoline with (at `at`).
    pub(super) fn jump_spec(
        &self,
        probe: &Probe<A>,
        fixed_up: bool,
        target: PlantTarget,
        at: u64,
    ) -> Result<TrampolineSpec, &'static str> {
        if probe.trap != TrapKind::Software {
            return Err("the probe asks for a hardware breakpoint");
        }
        if probe.post.is_some() || probe.on_return.is_some() {
            return Err("a post handler or a return probe needs exits");
        }
        if fixed_up {
            return Err(
                "the instruction has an exception-table entry: a fault in a copy could not be fixed up",
            );
        }
        let j = self.jump.lock().unwrap_or_else(|e| e.into_inner());
        let rings = j
            .rings
            .ok_or("the jump plan is off (--plan exit, or no rings)")?;
        if let Some((_, _, why)) = j
            .excluded
            .iter()
            .find(|(s, e, _)| (*s..*e).contains(&target.va))
        {
            return Err(why);
        }
        if j.sites.len() >= MAX_JUMP_SITES as usize {
            return Err("every jump-site counter is in use");
        }
        Ok(TrampolineSpec {
            tag: j.sites.len() as u32,
            site: target.va,
            at,
            rings,
            anchors: j.anchors,
            filter: probe.record_filter.clone(),
        })
    }

    /// Writes a jump site: the trampoline into fresh XOL slots (read-only to the guest), the
    /// area mapped, and then the jump over the instruction. Returns the site's tag and what was
    /// written over it.
    pub(super) fn commit_jump(
        &self,
        location: &str,
        gpa: u64,
        plan: &PlanOf<A>,
        insn: &A::Instruction,
        spec: TrampolineSpec,
    ) -> Result<(u32, Vec<u8>), PlantError> {
        let refused = |why: &'static str| {
            PlantError::new(
                location,
                PlantErrorKind::Refused {
                    source: Refusal {
                        va: spec.site,
                        text: insn.text().into(),
                        reason: why,
                    },
                },
            )
        };
        // The trampoline's length does not depend on where it goes: size it first.
        let JumpPatch { trampoline, .. } = A::jump_patch(plan, insn, &spec).map_err(refused)?;
        let slot = self
            .xol
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate_bytes(trampoline.len() as u64)
            .map_err(|source| PlantError::new(location, PlantErrorKind::Xol { source }))?;
        let spec = TrampolineSpec {
            at: self.jump_code_va(slot.va),
            ..spec
        };
        let JumpPatch { trampoline, site } = A::jump_patch(plan, insn, &spec).map_err(refused)?;
        self.mem
            .write_slice(&trampoline, GuestAddress(slot.gpa))
            .map_err(|_| PlantError::new(location, PlantErrorKind::Memory { gpa: slot.gpa }))?;
        self.wrote_code(slot.gpa, trampoline.len());
        self.mem
            .write_slice(&site, GuestAddress(gpa))
            .map_err(|_| PlantError::new(location, PlantErrorKind::Memory { gpa }))?;
        self.wrote_code(gpa, site.len());
        let mut j = self.jump.lock().unwrap_or_else(|e| e.into_inner());
        j.sites.push(gpa);
        Ok((spec.tag, site))
    }
}
