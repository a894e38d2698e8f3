//! Write-protected regions: the guest pages holding a region are read-only to the guest (the
//! VMM's memslots), so every store to them exits; the VMM hands each one here. A store to
//! protected bytes runs the region's handlers with the bytes before and after and is then
//! completed or dropped (`allow`/`deny`); a store to the rest of a protected page is completed
//! silently and counted. Every store to a protected page is made here, under one lock, so a
//! read-modify-write the VMM emulates (arm64 atomics) is atomic against all of them.

use super::*;
use crate::probe::WatchRecord;
use crate::protect::{PAGE, ProtectAction, ProtectSpec};

/// A planted protected region.
pub(super) struct ProtectSite<A: Arch> {
    /// Its first byte.
    pub(super) va: u64,
    /// What it protects.
    pub(super) spec: ProtectSpec,
    /// Each page it touches: (guest physical, virtual) page addresses.
    pub(super) pages: Vec<(u64, u64)>,
    /// The probe and its handlers.
    pub(super) probe: Arc<ProbeEntry<A>>,
}

impl<A: Arch> Clone for ProtectSite<A> {
    fn clone(&self) -> Self {
        ProtectSite {
            va: self.va,
            spec: self.spec,
            pages: self.pages.clone(),
            probe: self.probe.clone(),
        }
    }
}

impl<A: Arch> ProtectSite<A> {
    fn bytes_in(&self, gpa_page: u64) -> Option<(u64, u64, u64)> {
        bytes_in(self.va, self.spec.len, &self.pages, gpa_page)
    }
}

/// The bytes of the region of `len` bytes at `va` (on `pages`) within the page at guest
/// physical `gpa_page`, as guest physical addresses, with the virtual address of the first.
fn bytes_in(va: u64, len: u64, pages: &[(u64, u64)], gpa_page: u64) -> Option<(u64, u64, u64)> {
    let &(_, va_page) = pages.iter().find(|(g, _)| *g == gpa_page)?;
    let start = va.max(va_page);
    let end = (va + len).min(va_page + PAGE);
    (start < end).then(|| {
        (
            gpa_page + (start - va_page),
            gpa_page + (end - va_page),
            start,
        )
    })
}

/// The exclusive monitor of stores to protected pages, for store-exclusives the VMM emulates
/// (arm64 `STXR` on a read-only page): as the hardware's, a store by anyone to a granule
/// clears everyone's reservation there. The VMM never sees the load-exclusive, so a vCPU's
/// first store-exclusive to a granule fails and records the granule's store count; the retry
/// (after the guest's load-exclusive again) succeeds only if no store reached the granule in
/// between. A failure is always allowed by the architecture; a lost update never happens,
/// since every store to a protected page is made here.
#[derive(Default)]
pub(super) struct ExclusiveMonitor {
    /// Stores made per granule.
    stores: HashMap<u64, u64>,
    /// Each vCPU's reservation: the granule and its store count when it was taken.
    reserved: HashMap<u32, (u64, u64)>,
}

/// The exclusive reservation granule the monitor works in.
const GRANULE: u64 = 64;

/// What a store to a protected page did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtectedStore {
    /// The address is on no protected page: not the engine's (a device's MMIO).
    NotProtected,
    /// Handled: the bytes that were there before (what an emulated atomic loads).
    Done {
        /// The bytes before the store.
        old: Vec<u8>,
    },
}

impl<A: Arch, M: GuestMemory + Send + Sync> ProbeEngine<A, M> {
    /// Protects `spec.len` bytes from `target.va`: every page they touch is translated now
    /// (kernel memory's mapping does not change), and the region is refused, with nothing
    /// changed, if a page is not mapped or a byte is already protected by another region.
    /// The VMM then makes the pages read-only ([`ProbeEngine::protected_pages`]).
    pub(super) fn plant_protect(
        &self,
        probe: Probe<A>,
        spec: ProtectSpec,
        target: PlantTarget,
        regs: &A::Registers,
    ) -> Result<ProbeId, PlantError> {
        let location = probe.location.clone();
        let refuse = |kind| PlantError::new(location.clone(), kind);
        let space = A::address_space(regs);
        let end = target.va.saturating_add(spec.len);
        let mut pages = Vec::new();
        let mut va_page = target.va & !(PAGE - 1);
        while va_page < end {
            let t = A::translate(&self.mem, space, va_page).map_err(|source| {
                refuse(PlantErrorKind::NotMapped {
                    va: va_page,
                    source,
                })
            })?;
            let gpa_page = t.gpa & !(PAGE - 1);
            if !self.mem.read_phys(gpa_page, &mut [0u8; 1]) {
                return Err(refuse(PlantErrorKind::Memory { gpa: gpa_page }));
            }
            pages.push((gpa_page, va_page));
            va_page += PAGE;
        }
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        for other in table.protects.values() {
            let shared = pages.iter().any(|&(g, _)| {
                match (bytes_in(target.va, spec.len, &pages, g), other.bytes_in(g)) {
                    (Some((s1, e1, _)), Some((s2, e2, _))) => s1 < e2 && s2 < e1,
                    _ => false,
                }
            });
            if shared {
                return Err(refuse(PlantErrorKind::ProtectOverlap {
                    other: other.probe.location.clone(),
                }));
            }
        }
        let id = ProbeId(table.next_id);
        table.next_id += 1;
        table.protects.insert(
            id,
            ProtectSite {
                va: target.va,
                spec,
                pages,
                probe: ProbeEntry::new(id, location, probe),
            },
        );
        self.protect_generation.fetch_add(1, Ordering::SeqCst);
        Ok(id)
    }

    /// Takes protected region `id` out, if it is one.
    pub(super) fn remove_protect(&self, table: &mut ProbeTable<A>, id: ProbeId) -> bool {
        if table.protects.remove(&id).is_none() {
            return false;
        }
        self.protect_generation.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// The guest physical page ranges the guest must only read (sorted, merged), and a
    /// generation number that changes whenever they do.
    pub fn protected_pages(&self) -> (Vec<(u64, u64)>, u64) {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut pages: Vec<u64> = table
            .protects
            .values()
            .flat_map(|s| s.pages.iter().map(|(g, _)| *g))
            .collect();
        pages.sort_unstable();
        pages.dedup();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for g in pages {
            match ranges.last_mut() {
                Some(r) if r.1 == g => r.1 = g + PAGE,
                _ => ranges.push((g, g + PAGE)),
            }
        }
        (ranges, self.protect_generation.load(Ordering::SeqCst))
    }

    /// Whether guest physical `gpa` is on a protected page (cheap: for the VMM to route an
    /// MMIO exit).
    pub fn is_protected(&self, gpa: u64) -> bool {
        let page = gpa & !(PAGE - 1);
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table
            .protects
            .values()
            .any(|s| s.pages.iter().any(|(g, _)| *g == page))
    }

    /// A store of `data` at guest physical `gpa` that exited because its page is read-only:
    /// see [`ProbeEngine::protected_update`].
    pub fn protected_write(
        &self,
        vcpu: &mut dyn VcpuAccess<A>,
        at_writer: bool,
        gpa: u64,
        data: &[u8],
    ) -> Result<ProtectedStore, VcpuError> {
        self.protected_update(vcpu, at_writer, gpa, data.len(), |_| Some(data.to_vec()))
    }

    /// For a store-exclusive of vCPU `vcpu` to guest physical `gpa`, called while the store is
    /// being made ([`ProbeEngine::protected_update`]'s `update`): whether it may store (its
    /// reservation holds), else it fails and reserves the granule for its retry.
    pub fn exclusive_store_holds(&self, vcpu: u32, gpa: u64) -> bool {
        let granule = gpa / GRANULE;
        let mut m = self.exclusive.lock().unwrap_or_else(|e| e.into_inner());
        let stores = m.stores.get(&granule).copied().unwrap_or(0);
        match m.reserved.remove(&vcpu) {
            Some(r) if r == (granule, stores) => true,
            _ => {
                m.reserved.insert(vcpu, (granule, stores));
                false
            }
        }
    }

    /// Exempts the writers `exempt` says yes to (`--protect-allow`: given the context of a
    /// write to protected bytes, the stack of its writer) from protection: their writes are
    /// made in full, even to `deny` regions, and not reported (counted as exempted).
    pub fn set_protect_exemption(&self, exempt: ProtectExemption<A>) {
        *self
            .protect_exemption
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(exempt);
    }

    /// Counts a store without a syndrome that the VMM decoded to reach here (arm64).
    pub fn count_emulated_store(&self) {
        self.exits.emulated_stores.fetch_add(1, Ordering::Relaxed);
    }

    /// A store to the `len` bytes at guest physical `gpa` (within one page) whose new bytes
    /// `update` makes from the bytes there now (`None`: it stores nothing, as a failed
    /// compare-and-swap), made while no other store to a protected page can run. Each
    /// region whose bytes it touches runs its handlers with the bytes before and what the
    /// guest wrote (the vCPU's PC is the storing instruction's if `at_writer`, as on arm64,
    /// else the one after it, as on x86); a `deny` region's bytes keep their value, every
    /// other byte takes the new one.
    pub fn protected_update(
        &self,
        vcpu: &mut dyn VcpuAccess<A>,
        at_writer: bool,
        gpa: u64,
        len: usize,
        update: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
    ) -> Result<ProtectedStore, VcpuError> {
        let gpa_page = gpa & !(PAGE - 1);
        let sites: Vec<ProtectSite<A>> = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            table
                .protects
                .values()
                .filter(|s| s.pages.iter().any(|(g, _)| *g == gpa_page))
                .cloned()
                .collect()
        };
        if sites.is_empty() {
            return Ok(ProtectedStore::NotProtected);
        }
        let one_at_a_time = self
            .protect_stores
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut old = vec![0u8; len];
        if !self.mem.read_phys(gpa, &mut old) {
            return Err(VcpuError::ProtectedStore { gpa });
        }
        let Some(wanted) = update(&old).filter(|w| w.len() == len) else {
            return Ok(ProtectedStore::Done { old });
        };
        {
            let mut m = self.exclusive.lock().unwrap_or_else(|e| e.into_inner());
            for granule in gpa / GRANULE..=(gpa + len as u64 - 1) / GRANULE {
                *m.stores.entry(granule).or_default() += 1;
            }
        }
        let end = gpa + wanted.len() as u64;
        let mut stored = wanted.clone();
        let mut hits = Vec::new();
        for s in &sites {
            let Some((ps, pe, va)) = s.bytes_in(gpa_page) else {
                continue;
            };
            let (from, to) = (ps.max(gpa), pe.min(end));
            if from >= to {
                continue;
            }
            let (a, b) = ((from - gpa) as usize, (to - gpa) as usize);
            if s.spec.action == ProtectAction::Deny {
                stored[a..b].copy_from_slice(&old[a..b]);
            }
            hits.push((
                s.probe.clone(),
                WatchRecord {
                    address: va + (from - ps),
                    old: old[a..b].to_vec(),
                    new: wanted[a..b].to_vec(),
                    writer: None,
                    action: Some(s.spec.action),
                },
            ));
        }
        // A write to protected bytes: the registers for its handlers, and whether its writer
        // is one the user exempted (then it is made in full and not reported).
        let regs = match hits.is_empty() {
            true => None,
            false => Some(vcpu.registers()?),
        };
        let exemption = self
            .protect_exemption
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let exempt = match (&regs, exemption) {
            (Some(regs), Some(exempt)) => {
                let lookup = |at: u64| self.real_return_above(at);
                let ctx = ProbeContext {
                    vcpu: vcpu.id(),
                    location: "",
                    address: regs.pc(),
                    time: self.start.elapsed(),
                    regs,
                    entry_regs: None,
                    mem: &self.mem,
                    returns: self.return_recovery(&lookup, None),
                    recorded: None,
                    watch: None,
                };
                exempt(&ctx)
            }
            _ => false,
        };
        if exempt {
            stored = wanted;
        }
        if stored != old {
            self.mem
                .write_slice(&stored, GuestAddress(gpa))
                .map_err(|_| VcpuError::ProtectedStore { gpa })?;
        }
        drop(one_at_a_time);
        let Some(regs) = regs else {
            self.exits.neighbour_writes.fetch_add(1, Ordering::Relaxed);
            return Ok(ProtectedStore::Done { old });
        };
        self.exits.protected_writes.fetch_add(1, Ordering::Relaxed);
        if exempt {
            self.exits.exempted_writes.fetch_add(1, Ordering::Relaxed);
            return Ok(ProtectedStore::Done { old });
        }
        let pc = regs.pc();
        for (probe, mut record) in hits {
            record.writer = at_writer.then_some(pc);
            self.exits.by_plan[PlanKind::Protect as usize].fetch_add(1, Ordering::Relaxed);
            self.run_handlers(vcpu.id(), pc, &[probe], &regs, false, None, Some(record));
        }
        Ok(ProtectedStore::Done { old })
    }
}
