//! Data watchpoints: a hardware debug slot on the watched bytes (x86_64 shares its four with
//! the execute breakpoints), the bytes as last seen, and the handlers run after each access
//! with what changed. No guest instruction or byte is touched.

use super::*;
use crate::definition::WatchSpec;
use crate::probe::WatchRecord;

/// A planted watchpoint.
pub(super) struct WatchSite<A: Arch> {
    /// The watched address.
    pub(super) va: u64,
    /// What it watches.
    pub(super) spec: WatchSpec,
    /// Its hardware slot.
    pub(super) slot: usize,
    /// The probe and its handlers.
    pub(super) probe: Arc<ProbeEntry<A>>,
    /// The watched bytes as the engine last saw them (at planting, then at each hit).
    pub(super) last: Arc<Mutex<u64>>,
}

impl<A: Arch> ProbeTable<A> {
    /// The slots watchpoints take: the breakpoints' where they share them.
    fn watch_pool(&mut self) -> &mut Vec<Option<u64>> {
        if A::WATCHPOINTS_SHARE_BREAKPOINTS {
            &mut self.hw
        } else {
            &mut self.watch_hw
        }
    }
}

impl<A: Arch> Clone for WatchSite<A> {
    fn clone(&self) -> Self {
        WatchSite {
            va: self.va,
            spec: self.spec,
            slot: self.slot,
            probe: self.probe.clone(),
            last: self.last.clone(),
        }
    }
}

impl<A: Arch, M: GuestMemory + Send + Sync> ProbeEngine<A, M> {
    /// Reads the `len` watched bytes at `va` (aligned to `len`, so within one page) as a
    /// little-endian number.
    fn read_watched(
        &self,
        space: A::AddressSpace,
        va: u64,
        len: u8,
    ) -> Result<u64, PlantErrorKind> {
        let t = A::translate(&self.mem, space, va)
            .map_err(|source| PlantErrorKind::NotMapped { va, source })?;
        let mut b = [0u8; 8];
        if !self.mem.read_phys(t.gpa, &mut b[..usize::from(len)]) {
            return Err(PlantErrorKind::Memory { gpa: t.gpa });
        }
        Ok(u64::from_le_bytes(b))
    }

    /// Plants a watchpoint `spec` on `target.va` in a free hardware slot, with what is there
    /// now as the value before its first hit. Refused, with nothing changed: an architecture
    /// without them here, an address not aligned to the length, one not mapped, no slot free.
    pub(super) fn plant_watch(
        &self,
        probe: Probe<A>,
        spec: WatchSpec,
        target: PlantTarget,
        regs: &A::Registers,
    ) -> Result<ProbeId, PlantError> {
        let location = probe.location.clone();
        let refuse = |kind| PlantError::new(location.clone(), kind);
        if let Some(reason) = A::watch_refusal(spec) {
            return Err(refuse(PlantErrorKind::WatchRefused { reason }));
        }
        if !target.va.is_multiple_of(u64::from(spec.len)) {
            return Err(refuse(PlantErrorKind::WatchMisaligned {
                va: target.va,
                len: spec.len,
            }));
        }
        let now = self
            .read_watched(A::address_space(regs), target.va, spec.len)
            .map_err(refuse)?;
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let pool = table.watch_pool();
        let slot = pool.iter().position(Option::is_none).ok_or_else(|| {
            refuse(if A::WATCHPOINTS_SHARE_BREAKPOINTS {
                PlantErrorKind::NoHardwareBreakpoint { count: pool.len() }
            } else {
                PlantErrorKind::NoWatchpoint { count: pool.len() }
            })
        })?;
        pool[slot] = Some(target.va);
        let id = ProbeId(table.next_id);
        table.next_id += 1;
        table.watches.insert(
            id,
            WatchSite {
                va: target.va,
                spec,
                slot,
                probe: ProbeEntry::new(id, location, probe),
                last: Arc::new(Mutex::new(now)),
            },
        );
        self.hw_generation.fetch_add(1, Ordering::SeqCst);
        Ok(id)
    }

    /// Takes watchpoint `id` out, if it is one: its slot is free again.
    pub(super) fn remove_watch(&self, table: &mut ProbeTable<A>, id: ProbeId) -> bool {
        let Some(w) = table.watches.remove(&id) else {
            return false;
        };
        table.watch_pool()[w.slot] = None;
        self.hw_generation.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Watchpoints in `slots` fired on a vCPU now at `pc`, after the access: each one's
    /// handlers run with the bytes before and after. None of ours: the guest's own debug
    /// exception, handed back.
    pub(super) fn watch_hit(
        &self,
        vcpu: &mut dyn VcpuAccess<A>,
        pc: u64,
        slots: u32,
        writer: Option<u64>,
    ) -> Result<Verdict, VcpuError> {
        let fired: Vec<WatchSite<A>> = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            table
                .watches
                .values()
                .filter(|w| slots & (1 << w.slot) != 0)
                .cloned()
                .collect()
        };
        if fired.is_empty() {
            self.exits.reinjected_debug.fetch_add(1, Ordering::Relaxed);
            return Ok(Verdict::ReinjectDebug);
        }
        self.exits.hw_breakpoints.fetch_add(1, Ordering::Relaxed);
        let regs = vcpu.registers()?;
        let space = A::address_space(&regs);
        for w in fired {
            self.exits.by_plan[PlanKind::Watch as usize].fetch_add(1, Ordering::Relaxed);
            let Ok(new) = self.read_watched(space, w.va, w.spec.len) else {
                w.probe.counters.missed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let old =
                std::mem::replace(&mut *w.last.lock().unwrap_or_else(|e| e.into_inner()), new);
            let len = usize::from(w.spec.len);
            let record = WatchRecord {
                address: w.va,
                old: old.to_le_bytes()[..len].to_vec(),
                new: new.to_le_bytes()[..len].to_vec(),
                writer,
                action: None,
            };
            self.run_handlers(vcpu.id(), pc, &[w.probe], &regs, false, None, Some(record));
        }
        Ok(Verdict::Resume)
    }

    /// Counts an exit that began a step over a watched access (arm64 reports watchpoints
    /// before the access; the VMM steps over it and reports the hit after).
    pub fn count_watch_step(&self) {
        self.exits.watch_steps.fetch_add(1, Ordering::Relaxed);
    }

    /// Says how many watchpoints the vCPUs have where they have registers of their own (from
    /// KVM: arm64 reports its count in `KVM_CAP_GUEST_DEBUG_HW_WPS`); where they share the
    /// breakpoints' (x86), nothing to say. Call before planting.
    pub fn set_watchpoint_count(&self, count: usize) {
        if A::WATCHPOINTS_SHARE_BREAKPOINTS {
            return;
        }
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        table.watch_hw.resize(count, None);
        self.hw_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The watchpoint slots every vCPU must load, by slot (`None`: free, or an execute
    /// breakpoint's where they share slots).
    pub fn watchpoint_slots(&self) -> Vec<Option<crate::vm::HardwareSlot>> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let len = if A::WATCHPOINTS_SHARE_BREAKPOINTS {
            table.hw.len()
        } else {
            table.watch_hw.len()
        };
        let mut slots = vec![None; len];
        for w in table.watches.values() {
            if let Some(s) = slots.get_mut(w.slot) {
                *s = Some(crate::vm::HardwareSlot {
                    va: w.va,
                    watch: Some(w.spec),
                });
            }
        }
        slots
    }

    /// The hardware slots every vCPU must load, execute breakpoints and (where they share
    /// slots) watchpoints, and a generation number that changes whenever either changes.
    pub fn hardware_slots(&self) -> (Vec<Option<crate::vm::HardwareSlot>>, u64) {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let slots = table
            .hw
            .iter()
            .enumerate()
            .map(|(i, va)| {
                va.map(|va| crate::vm::HardwareSlot {
                    va,
                    watch: table
                        .watches
                        .values()
                        .find(|w| A::WATCHPOINTS_SHARE_BREAKPOINTS && w.slot == i)
                        .map(|w| w.spec),
                })
            })
            .collect();
        (slots, self.hw_generation.load(Ordering::SeqCst))
    }
}
