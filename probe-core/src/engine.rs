//! The probe engine: the probe table keyed by guest physical address, planting and removal,
//! and the per-vCPU hit state machine (breakpoint -> handlers -> step plan -> resume).
//!
//! The engine runs in the vCPU threads: each debug exit is handled on the thread that took it,
//! against that vCPU's [`VcpuAccess`] and its own [`VcpuProbeState`]; the table is shared and
//! only written while every vCPU is out of `KVM_RUN` (the VMM pauses them to plant or remove).

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::arch::x86_64::{
    DecodeError, Decoder, Emulation, EmulationError, Gpr, INT3, OutOfLine, Refusal, Registers,
    StepPlan,
};
use crate::pagewalk::{PagingMode, WalkError, translate};
use crate::probe::{Handler, PhysMemory, Probe, ProbeContext, TrapKind, Walker, read_virt};
use crate::retprobe::{Instance, InstanceTable};
use crate::vm::{DebugEvent, VcpuAccess, Verdict, VmError};
use crate::xol::{SLOT_SIZE, XolArea, XolError, XolSlot};

/// RFLAGS.RF: suppresses instruction breakpoints for one instruction.
const RFLAGS_RF: u64 = 1 << 16;

/// How many probed instructions in a row one exit follows through emulation.
const MAX_CHAINED_HITS: usize = 8;

/// Most hardware execute breakpoints x86 offers.
pub const MAX_HW_BREAKPOINTS: usize = 4;

/// Errors of planting and removing probes.
#[derive(Debug, thiserror::Error)]
pub enum PlantError {
    /// The address is not mapped in the guest's kernel page tables.
    #[error("{location}: {va:#x} is not mapped in the guest ({source})")]
    NotMapped {
        /// The probe location.
        location: String,
        /// The address.
        va: u64,
        /// The walk error.
        source: WalkError,
    },
    /// Guest memory could not be read or written.
    #[error("{location}: guest memory at {gpa:#x} is not accessible")]
    Memory {
        /// The probe location.
        location: String,
        /// The guest physical address.
        gpa: u64,
    },
    /// Decoding failed or the offset is not on an instruction boundary.
    #[error("{location}: {source}")]
    Decode {
        /// The probe location.
        location: String,
        /// What went wrong.
        source: DecodeError,
    },
    /// The instruction cannot be probed.
    #[error("{location}: {source}")]
    Refused {
        /// The probe location.
        location: String,
        /// Why.
        source: Refusal,
    },
    /// No XOL slot.
    #[error("{location}: {source}")]
    Xol {
        /// The probe location.
        location: String,
        /// What went wrong.
        source: XolError,
    },
    /// All hardware breakpoints are taken.
    #[error("{location}: all {MAX_HW_BREAKPOINTS} hardware breakpoints are in use")]
    NoHardwareBreakpoint {
        /// The probe location.
        location: String,
    },
    /// The same address has probes of both trap kinds.
    #[error("{location}: the address already has a probe with the other trap kind")]
    MixedTraps {
        /// The probe location.
        location: String,
    },
    /// No such probe.
    #[error("no probe with id {0}")]
    UnknownProbe(usize),
    /// A return probe away from a function's first instruction.
    #[error("{location}: a return probe must be on a function's first instruction")]
    NotFunctionEntry {
        /// The probe location.
        location: String,
    },
}

/// Identifies a planted probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeId(pub usize);

/// Counters of one probe.
#[derive(Debug, Default)]
struct ProbeCounters {
    hits: AtomicU64,
    missed: AtomicU64,
    handler_errors: AtomicU64,
    returns: AtomicU64,
    nmissed: AtomicU64,
}

/// A snapshot of one probe's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStats {
    /// The probe's id.
    pub id: ProbeId,
    /// Its location as given.
    pub location: String,
    /// Its address.
    pub address: u64,
    /// Name of the step plan (`emulate`, `xol`, `xol-riprel`, `xol-call`).
    pub plan: &'static str,
    /// The probed instruction.
    pub instruction: String,
    /// Which trap.
    pub trap: TrapKind,
    /// Times a vCPU reached it.
    pub hits: u64,
    /// Hits on which the handlers could not run.
    pub missed: u64,
    /// Handler calls that returned an error or panicked.
    pub handler_errors: u64,
    /// Whether it is a return probe.
    pub return_probe: bool,
    /// Returns seen (return probes).
    pub returns: u64,
    /// Entries whose return could not be watched: `max_active` instances were live, or the
    /// frame never returned through its caller.
    pub nmissed: u64,
}

struct ProbeEntry {
    id: ProbeId,
    location: String,
    pre: Option<Handler>,
    post: Option<Handler>,
    on_return: Option<Handler>,
    max_active: usize,
    counters: ProbeCounters,
}

impl ProbeEntry {
    fn new(id: ProbeId, location: String, probe: Probe) -> Arc<ProbeEntry> {
        Arc::new(ProbeEntry {
            id,
            location,
            pre: probe.pre,
            post: probe.post,
            on_return: probe.on_return,
            max_active: probe.max_active,
            counters: ProbeCounters::default(),
        })
    }
}

/// One planted breakpoint: an address with one or more probes on it.
struct Site {
    va: u64,
    trap: TrapKind,
    /// The guest's bytes under the breakpoint, restored on removal.
    saved: Vec<u8>,
    instruction: String,
    /// Shared so that a hit takes it without copying (the table lock is not held meanwhile).
    plan: Arc<StepPlan>,
    slot: Option<XolSlot>,
    /// Shared for the same reason; planting and removal copy on write.
    probes: Arc<Vec<Arc<ProbeEntry>>>,
    /// Set when the engine had to take the trap out while the probe stays listed.
    disarmed: std::sync::atomic::AtomicBool,
}

/// A trap the engine planted and later found rewritten by the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrittenSite {
    /// The probed address.
    pub va: u64,
    /// What the guest wrote there.
    pub found: Vec<u8>,
}

/// Counts of debug exits by what they were, for figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// Software breakpoint exits that were ours.
    pub breakpoints: u64,
    /// Hardware breakpoint exits that were ours.
    pub hw_breakpoints: u64,
    /// Single-step exits that completed an out-of-line step.
    pub steps: u64,
    /// Traps that were the guest's own and went back to it.
    pub reinjected: u64,
    /// Returns through the return-probe trampoline.
    pub returns: u64,
    /// Hits per step plan name.
    pub hits_by_plan: Vec<(&'static str, u64)>,
}

#[derive(Default)]
struct ExitCounters {
    breakpoints: AtomicU64,
    hw_breakpoints: AtomicU64,
    steps: AtomicU64,
    reinjected: AtomicU64,
    returns: AtomicU64,
    by_plan: [AtomicU64; 4],
}

const PLAN_NAMES: [&str; 4] = ["emulate", "xol", "xol-riprel", "xol-call"];

/// An out-of-line step under way on one vCPU. Self-contained, so it completes correctly even
/// if its probe is removed while the step is pending.
#[derive(Debug, Clone)]
struct StepInFlight {
    orig_va: u64,
    len: u64,
    slot_va: u64,
    scratch: Option<(Gpr, u64)>,
    fix_return_address: bool,
    site_gpa: u64,
}

/// Per-vCPU engine state, owned by the vCPU thread.
#[derive(Debug, Default)]
pub struct VcpuProbeState {
    in_flight: Option<StepInFlight>,
}

impl VcpuProbeState {
    /// Whether an out-of-line step is pending on this vCPU.
    pub fn stepping(&self) -> bool {
        self.in_flight.is_some()
    }
}

struct ProbeTable {
    sites: HashMap<u64, Site>,
    /// The virtual addresses of the sites: after an emulated instruction, whether the next
    /// one may be probed too is answered here without a page walk.
    site_vas: HashSet<u64>,
    by_probe: HashMap<ProbeId, u64>,
    next_id: usize,
    hw: [Option<u64>; MAX_HW_BREAKPOINTS],
}

/// The probe engine over guest memory `M`.
pub struct ProbeEngine<M: GuestMemory + Send + Sync> {
    mem: M,
    table: RwLock<ProbeTable>,
    xol: Mutex<XolArea>,
    exits: ExitCounters,
    start: Instant,
    hw_generation: AtomicU64,
    returns: Mutex<InstanceTable<Arc<ProbeEntry>>>,
    trampoline: Mutex<Option<XolSlot>>,
}

/// Where to plant: the address, and the function start to decode from for the boundary check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlantTarget {
    /// The probed address.
    pub va: u64,
    /// Start of the containing function, when known.
    pub function_start: Option<u64>,
}

impl<M: GuestMemory + Send + Sync> ProbeEngine<M> {
    /// An engine over `mem` with the XOL area `xol` (whose page tables it writes now).
    pub fn new(mem: M, xol: XolArea) -> Result<ProbeEngine<M>, XolError> {
        xol.write_tables(&mem)?;
        Ok(ProbeEngine {
            mem,
            table: RwLock::new(ProbeTable {
                sites: HashMap::new(),
                site_vas: HashSet::new(),
                by_probe: HashMap::new(),
                next_id: 0,
                hw: [None; MAX_HW_BREAKPOINTS],
            }),
            xol: Mutex::new(xol),
            exits: ExitCounters::default(),
            start: Instant::now(),
            hw_generation: AtomicU64::new(0),
            returns: Mutex::new(InstanceTable::default()),
            trampoline: Mutex::new(None),
        })
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    fn read_virt_bytes(
        &self,
        location: &str,
        regs: &Registers,
        va: u64,
        len: usize,
    ) -> Result<Vec<u8>, PlantError> {
        let mode = PagingMode::from_cr4(regs.cr4);
        let mut buf = vec![0u8; len];
        // Read what is readable: code near the end of a mapping may be shorter than `len`.
        for (i, b) in buf.iter_mut().enumerate() {
            let at = va.wrapping_add(i as u64);
            match translate(&Walker(&self.mem), regs.cr3, mode, at) {
                Ok(t) if self.mem.read_phys(t.gpa, std::slice::from_mut(b)) => {}
                _ if i > 0 => {
                    return Ok(buf[..i].to_vec());
                }
                Ok(t) => {
                    return Err(PlantError::Memory {
                        location: location.into(),
                        gpa: t.gpa,
                    });
                }
                Err(source) => {
                    return Err(PlantError::NotMapped {
                        location: location.into(),
                        va: at,
                        source,
                    });
                }
            }
        }
        Ok(buf)
    }

    /// Plants `probe` at `target`, using the page tables in `regs` (any vCPU's, all map kernel
    /// text alike). All checks come first: on error nothing in the guest has changed. Call
    /// with every vCPU out of `KVM_RUN`.
    pub fn plant(
        &self,
        probe: Probe,
        target: PlantTarget,
        regs: &Registers,
    ) -> Result<ProbeId, PlantError> {
        let location = probe.location.clone();
        let mode = PagingMode::from_cr4(regs.cr4);
        let gpa = translate(&Walker(&self.mem), regs.cr3, mode, target.va)
            .map_err(|source| PlantError::NotMapped {
                location: location.clone(),
                va: target.va,
                source,
            })?
            .gpa;
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if let Some(site) = table.sites.get_mut(&gpa) {
            if site.trap != probe.trap {
                return Err(PlantError::MixedTraps { location });
            }
            if probe.on_return.is_some() {
                if target.function_start.is_some_and(|f| f != target.va) {
                    return Err(PlantError::NotFunctionEntry { location });
                }
                self.trampoline(&location)?;
            }
            let id = ProbeId(table.next_id);
            table.next_id += 1;
            let site = table.sites.get_mut(&gpa).expect("site present");
            Arc::make_mut(&mut site.probes).push(ProbeEntry::new(id, location, probe));
            table.by_probe.insert(id, gpa);
            return Ok(id);
        }

        // Capstone handles are not Send; planting is rare, so each plant makes its own.
        let decoder = Decoder::new().map_err(|source| PlantError::Decode {
            location: location.clone(),
            source,
        })?;
        if let Some(start) = target.function_start.filter(|s| *s < target.va) {
            let offset = target.va - start;
            let mut code = self.read_virt_bytes(&location, regs, start, offset as usize + 16)?;
            // Decode what the guest wrote, not our own breakpoints (kprobes'
            // recover_probed_instruction).
            for site in table.sites.values() {
                if let Some(i) = site.va.checked_sub(start).map(|i| i as usize)
                    && i < code.len()
                {
                    code[i] = site.saved[0];
                }
            }
            decoder
                .check_boundary(&code, start, offset)
                .map_err(|source| PlantError::Decode {
                    location: location.clone(),
                    source,
                })?;
        }
        let code = self.read_virt_bytes(&location, regs, target.va, 16)?;
        let insn = decoder
            .decode(&code, target.va)
            .map_err(|source| PlantError::Decode {
                location: location.clone(),
                source,
            })?;
        let plan = decoder.plan(&insn).map_err(|source| PlantError::Refused {
            location: location.clone(),
            source,
        })?;
        drop(decoder);

        if probe.on_return.is_some() {
            if target.function_start.is_some_and(|f| f != target.va) {
                return Err(PlantError::NotFunctionEntry { location });
            }
            self.trampoline(&location)?;
        }
        let hw_index = match probe.trap {
            TrapKind::Hardware => Some(table.hw.iter().position(Option::is_none).ok_or(
                PlantError::NoHardwareBreakpoint {
                    location: location.clone(),
                },
            )?),
            TrapKind::Software => None,
        };
        if matches!(plan, StepPlan::StepOutOfLine(_)) && mode == PagingMode::FiveLevel {
            return Err(PlantError::Xol {
                location,
                source: XolError::FiveLevel,
            });
        }
        let slot = match &plan {
            StepPlan::StepOutOfLine(ool) => Some(self.prepare_slot(&location, ool, target.va)?),
            StepPlan::Emulate(_) => None,
        };
        let saved = insn.bytes[..1].to_vec();
        if probe.trap == TrapKind::Software {
            self.mem
                .write_slice(&[INT3], GuestAddress(gpa))
                .map_err(|_| PlantError::Memory {
                    location: location.clone(),
                    gpa,
                })?;
        }
        if let Some(i) = hw_index {
            table.hw[i] = Some(target.va);
            self.hw_generation.fetch_add(1, Ordering::SeqCst);
        }
        let id = ProbeId(table.next_id);
        table.next_id += 1;
        table.by_probe.insert(id, gpa);
        table.site_vas.insert(target.va);
        table.sites.insert(
            gpa,
            Site {
                va: target.va,
                trap: probe.trap,
                saved,
                instruction: insn.text.clone(),
                plan: Arc::new(plan),
                slot,
                disarmed: std::sync::atomic::AtomicBool::new(false),
                probes: Arc::new(vec![ProbeEntry::new(id, location, probe)]),
            },
        );
        Ok(id)
    }

    /// Takes a fresh XOL slot and writes `bytes` into it.
    fn fill_slot(&self, location: &str, bytes: &[u8]) -> Result<XolSlot, PlantError> {
        let slot = self
            .xol
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate()
            .map_err(|source| PlantError::Xol {
                location: location.into(),
                source,
            })?;
        self.mem
            .write_slice(bytes, GuestAddress(slot.gpa))
            .map_err(|_| PlantError::Memory {
                location: location.into(),
                gpa: slot.gpa,
            })?;
        Ok(slot)
    }

    /// Writes an instruction's out-of-line copy into a fresh slot, followed by an absolute
    /// jump back to the original stream (taken only if the guest ever resumes in the slot
    /// without the host, e.g. after an exception in the stepped instruction), then int3s.
    fn prepare_slot(
        &self,
        location: &str,
        ool: &OutOfLine,
        va: u64,
    ) -> Result<XolSlot, PlantError> {
        let mut bytes = vec![INT3; SLOT_SIZE as usize];
        let n = ool.slot_bytes.len();
        bytes[..n].copy_from_slice(&ool.slot_bytes);
        if ool.scratch.is_none() && n + 14 <= bytes.len() {
            // jmp *0(%rip); .quad next
            bytes[n..n + 6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
            bytes[n + 6..n + 14].copy_from_slice(&(va + u64::from(ool.len)).to_le_bytes());
        }
        self.fill_slot(location, &bytes)
    }

    /// The return trampoline: an XOL slot of int3s that replaced return addresses point to.
    fn trampoline(&self, location: &str) -> Result<XolSlot, PlantError> {
        let mut t = self.trampoline.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = *t {
            return Ok(slot);
        }
        let slot = self.fill_slot(location, &[INT3; SLOT_SIZE as usize])?;
        *t = Some(slot);
        Ok(slot)
    }

    /// Maps the XOL area in the top-level page table at guest physical `table` (the kernel's
    /// initial one, which every new page table copies its kernel half from).
    pub fn map_xol_into(&self, table: u64) -> Result<bool, XolError> {
        self.xol
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ensure_mapped(&self.mem, table, PagingMode::FourLevel)
    }

    /// Live return-probe instances.
    pub fn live_returns(&self) -> usize {
        self.returns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// At the entry of a function with return probes: replaces the return address at the top
    /// of the stack with the trampoline and records the instance, within each probe's
    /// `max_active`.
    fn enter_returns(&self, probes: &[Arc<ProbeEntry>], regs: &Registers) {
        let wanting: Vec<&Arc<ProbeEntry>> =
            probes.iter().filter(|p| p.on_return.is_some()).collect();
        if wanting.is_empty() {
            return;
        }
        let Some(trampoline) = *self.trampoline.lock().unwrap_or_else(|e| e.into_inner()) else {
            return;
        };
        let mode = PagingMode::from_cr4(regs.cr4);
        let mut table = self.returns.lock().unwrap_or_else(|e| e.into_inner());
        let mut taking = Vec::new();
        for p in wanting {
            if table.count(|q| q.id == p.id) >= p.max_active {
                p.counters.nmissed.fetch_add(1, Ordering::Relaxed);
            } else {
                taking.push(p.clone());
            }
        }
        let miss_all = |taking: &[Arc<ProbeEntry>]| {
            for p in taking {
                p.counters.nmissed.fetch_add(1, Ordering::Relaxed);
            }
        };
        if taking.is_empty() {
            return;
        }
        let mapped = self
            .xol
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ensure_mapped(&self.mem, regs.cr3, mode)
            .is_ok();
        let slot = regs.get(Gpr::Rsp);
        let mut ret = [0u8; 8];
        if !mapped || read_virt(&self.mem, regs.cr3, mode, slot, &mut ret).is_err() {
            miss_all(&taking);
            return;
        }
        let return_address = u64::from_le_bytes(ret);
        if return_address == trampoline.va
            || write_virt(
                &self.mem,
                regs.cr3,
                mode,
                slot,
                &trampoline.va.to_le_bytes(),
            )
            .is_err()
        {
            miss_all(&taking);
            return;
        }
        let stale = table.enter(
            slot,
            Instance {
                return_address,
                entry_regs: regs.clone(),
                probes: taking,
            },
        );
        if let Some(stale) = stale {
            miss_all(&stale.probes);
        }
    }

    /// A return through the trampoline: back to the real return address, return handlers.
    fn leave_return(
        &self,
        vcpu: &mut dyn VcpuAccess,
        mut regs: Registers,
    ) -> Result<Verdict, VmError> {
        self.exits.returns.fetch_add(1, Ordering::Relaxed);
        let (found, dropped) = self
            .returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .leave(regs.get(Gpr::Rsp));
        for d in dropped {
            for p in &d.probes {
                p.counters.nmissed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some(instance) = found else {
            return Err(VmError(format!(
                "vCPU {}: a return through the trampoline with no live instance (rsp {:#x}); \
                 the real return address is lost",
                vcpu.id(),
                regs.get(Gpr::Rsp)
            )));
        };
        regs.rip = instance.return_address;
        vcpu.set_registers(&regs)?;
        for p in &instance.probes {
            p.counters.returns.fetch_add(1, Ordering::Relaxed);
            let Some(h) = &p.on_return else { continue };
            let ctx = ProbeContext {
                vcpu: vcpu.id(),
                location: &p.location,
                address: instance.entry_regs.rip,
                time: self.start.elapsed(),
                regs: &regs,
                entry_regs: Some(&instance.entry_regs),
                mem: &self.mem,
            };
            if !matches!(catch_unwind(AssertUnwindSafe(|| h(&ctx))), Ok(Ok(()))) {
                p.counters.handler_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Verdict::Resume)
    }

    /// Removes one probe; the breakpoint goes when its last probe goes. Returns a rewritten
    /// site if the guest had replaced the trap byte (then the guest's bytes are kept).
    pub fn remove(&self, id: ProbeId) -> Result<Option<RewrittenSite>, PlantError> {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let gpa = table
            .by_probe
            .remove(&id)
            .ok_or(PlantError::UnknownProbe(id.0))?;
        let site = table.sites.get_mut(&gpa).expect("site of a planted probe");
        Arc::make_mut(&mut site.probes).retain(|p| p.id != id);
        if !site.probes.is_empty() {
            return Ok(None);
        }
        let site = table.sites.remove(&gpa).expect("site present");
        if !table.sites.values().any(|s| s.va == site.va) {
            table.site_vas.remove(&site.va);
        }
        if site.disarmed.load(Ordering::SeqCst) {
            return Ok(None);
        }
        if site.trap == TrapKind::Hardware {
            for slot in table.hw.iter_mut() {
                if *slot == Some(site.va) {
                    *slot = None;
                }
            }
            self.hw_generation.fetch_add(1, Ordering::SeqCst);
            return Ok(None);
        }
        let mut now = vec![0u8; site.saved.len()];
        if !self.mem.read_phys(gpa, &mut now) {
            return Err(PlantError::Memory {
                location: format!("{:#x}", site.va),
                gpa,
            });
        }
        if now != <crate::arch::x86_64::X86_64 as crate::arch::Arch>::BREAKPOINT {
            return Ok(Some(RewrittenSite {
                va: site.va,
                found: now,
            }));
        }
        self.mem
            .write_slice(&site.saved, GuestAddress(gpa))
            .map_err(|_| PlantError::Memory {
                location: format!("{:#x}", site.va),
                gpa,
            })?;
        Ok(None)
    }

    /// Removes every probe; returns the sites the guest had rewritten.
    pub fn remove_all(&self) -> Vec<RewrittenSite> {
        let ids: Vec<ProbeId> = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            let mut ids: Vec<ProbeId> = table.by_probe.keys().copied().collect();
            ids.sort();
            ids
        };
        ids.into_iter()
            .filter_map(|id| self.remove(id).ok().flatten())
            .collect()
    }

    /// The hardware breakpoint addresses every vCPU must load, and a generation number that
    /// changes whenever they change.
    pub fn hardware_breakpoints(&self) -> ([Option<u64>; MAX_HW_BREAKPOINTS], u64) {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        (table.hw, self.hw_generation.load(Ordering::SeqCst))
    }

    /// Generation of the hardware breakpoint set; cheap to poll before each `KVM_RUN`.
    pub fn hardware_generation(&self) -> u64 {
        self.hw_generation.load(Ordering::SeqCst)
    }

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
                    plan: site.plan.name(),
                    instruction: site.instruction.clone(),
                    trap: site.trap,
                    hits: p.counters.hits.load(Ordering::Relaxed),
                    missed: p.counters.missed.load(Ordering::Relaxed),
                    handler_errors: p.counters.handler_errors.load(Ordering::Relaxed),
                    return_probe: p.on_return.is_some(),
                    returns: p.counters.returns.load(Ordering::Relaxed),
                    nmissed: p.counters.nmissed.load(Ordering::Relaxed),
                })
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Exit counts, for figures.
    pub fn exit_stats(&self) -> ExitStats {
        let e = &self.exits;
        ExitStats {
            breakpoints: e.breakpoints.load(Ordering::Relaxed),
            hw_breakpoints: e.hw_breakpoints.load(Ordering::Relaxed),
            steps: e.steps.load(Ordering::Relaxed),
            reinjected: e.reinjected.load(Ordering::Relaxed),
            returns: e.returns.load(Ordering::Relaxed),
            hits_by_plan: PLAN_NAMES
                .iter()
                .zip(&e.by_plan)
                .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Whether the engine has any probe planted.
    pub fn is_empty(&self) -> bool {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .sites
            .is_empty()
    }

    fn run_handlers(
        &self,
        vcpu: u32,
        site_va: u64,
        probes: &[Arc<ProbeEntry>],
        regs: &Registers,
        post: bool,
    ) {
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
                time: self.start.elapsed(),
                regs,
                entry_regs: None,
                mem: &self.mem,
            };
            match catch_unwind(AssertUnwindSafe(|| h(&ctx))) {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    p.counters.handler_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Handles one debug exit of `vcpu`. On `Resume` the registers and the step state are set
    /// for the next `KVM_RUN`; on `Reinject` nothing was changed.
    pub fn handle_debug(
        &self,
        vcpu: &mut dyn VcpuAccess,
        state: &mut VcpuProbeState,
        event: DebugEvent,
    ) -> Result<Verdict, VmError> {
        match event {
            DebugEvent::SingleStep { pc } => self.complete_step(vcpu, state, pc),
            DebugEvent::Breakpoint { pc } | DebugEvent::HardwareBreakpoint { pc } => {
                let hw = matches!(event, DebugEvent::HardwareBreakpoint { .. });
                self.hit(vcpu, state, pc, hw)
            }
        }
    }

    fn hit(
        &self,
        vcpu: &mut dyn VcpuAccess,
        state: &mut VcpuProbeState,
        pc: u64,
        hw: bool,
    ) -> Result<Verdict, VmError> {
        let regs = vcpu.registers()?;
        let trampoline = *self.trampoline.lock().unwrap_or_else(|e| e.into_inner());
        if !hw && trampoline.is_some_and(|t| t.va == pc) {
            return self.leave_return(vcpu, regs);
        }
        let mut regs = regs;
        let mode = PagingMode::from_cr4(regs.cr4);
        let mut pc = pc;
        // An emulated instruction whose successor is probed too is followed into that probe in
        // the same exit, instead of re-entering the guest only to trap again at once.
        for chained in 0..=MAX_CHAINED_HITS {
            if chained > 0
                && !self
                    .table
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .site_vas
                    .contains(&pc)
            {
                vcpu.set_registers(&regs)?;
                return Ok(Verdict::Resume);
            }
            let site = translate(&Walker(&self.mem), regs.cr3, mode, pc)
                .ok()
                .and_then(|t| {
                    let table = self.table.read().unwrap_or_else(|e| e.into_inner());
                    table
                        .sites
                        .get(&t.gpa)
                        .filter(|s| s.va == pc && !s.disarmed.load(Ordering::SeqCst))
                        .map(|s| (t.gpa, s.probes.clone(), s.plan.clone(), s.slot))
                });
            let Some((gpa, probes, plan, slot)) = site else {
                if chained > 0 {
                    vcpu.set_registers(&regs)?;
                    return Ok(Verdict::Resume);
                }
                return self.not_probed(pc, regs.cr3, mode, hw);
            };
            if chained == 0 {
                let counter = if hw {
                    &self.exits.hw_breakpoints
                } else {
                    &self.exits.breakpoints
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            if state.in_flight.is_some() {
                // A hit while this vCPU is stepping cannot happen with interrupts blocked; if
                // it does, do not nest: count it and let the pending step finish first.
                for p in probes.iter() {
                    p.counters.missed.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(Verdict::Resume);
            }
            self.run_handlers(vcpu.id(), pc, &probes, &regs, false);
            self.enter_returns(&probes, &regs);
            let has_post = probes.iter().any(|p| p.post.is_some());
            let plan_index = PLAN_NAMES
                .iter()
                .position(|n| *n == plan.name())
                .unwrap_or(0);
            self.exits.by_plan[plan_index].fetch_add(1, Ordering::Relaxed);

            match &*plan {
                StepPlan::Emulate(emu) => {
                    if self.emulate(emu, &mut regs).is_err() {
                        // The stack is not writable from here (it should always be): the hit
                        // is counted as missed and the vCPU retries the instruction.
                        for p in probes.iter() {
                            p.counters.missed.fetch_add(1, Ordering::Relaxed);
                        }
                        vcpu.set_registers(&regs)?;
                        return Ok(Verdict::Resume);
                    }
                    // RIP moved on: a resume flag left from a hardware-breakpoint #DB would
                    // suppress a breakpoint on the next instruction.
                    regs.rflags &= !RFLAGS_RF;
                    if has_post {
                        self.run_handlers(vcpu.id(), pc, &probes, &regs, true);
                    }
                    pc = regs.rip;
                }
                StepPlan::StepOutOfLine(ool) => {
                    let Some(slot) = slot else {
                        return Ok(Verdict::Resume);
                    };
                    return self.start_step(vcpu, state, regs, pc, gpa, ool, slot, &probes);
                }
            }
        }
        vcpu.set_registers(&regs)?;
        Ok(Verdict::Resume)
    }

    /// What to do with a trap at `pc` where no probe is: a hardware breakpoint that was just
    /// removed resumes where it is (the debug registers are reloaded before the next entry);
    /// an int3 that is no longer there (ours removed while this exit was on its way, or the
    /// guest's own taken out by text_poke) is retried as the guest's own handler would;
    /// otherwise the trap is the guest's own int3 and goes back to it.
    fn not_probed(
        &self,
        pc: u64,
        cr3: u64,
        mode: PagingMode,
        hw: bool,
    ) -> Result<Verdict, VmError> {
        if hw {
            return Ok(Verdict::Resume);
        }
        if let Ok(t) = translate(&Walker(&self.mem), cr3, mode, pc) {
            let mut byte = [0u8];
            if self.mem.read_phys(t.gpa, &mut byte) && byte[0] != INT3 {
                return Ok(Verdict::Resume);
            }
        }
        self.exits.reinjected.fetch_add(1, Ordering::Relaxed);
        Ok(Verdict::Reinject)
    }

    /// Points the vCPU at the slot holding the instruction at `pc` and turns single-stepping on.
    #[allow(clippy::too_many_arguments)]
    fn start_step(
        &self,
        vcpu: &mut dyn VcpuAccess,
        state: &mut VcpuProbeState,
        mut regs: Registers,
        pc: u64,
        gpa: u64,
        ool: &OutOfLine,
        slot: XolSlot,
        probes: &[Arc<ProbeEntry>],
    ) -> Result<Verdict, VmError> {
        let mode = PagingMode::from_cr4(regs.cr4);
        if self
            .xol
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ensure_mapped(&self.mem, regs.cr3, mode)
            .is_err()
        {
            // The slot cannot be mapped in this address space (the guest uses the hole): the
            // instruction cannot run out of line, and leaving the trap in place would trap
            // forever. Disarm the site (the guest's byte goes back), count the miss, and let
            // the vCPU run the original instruction.
            for p in probes {
                p.counters.missed.fetch_add(1, Ordering::Relaxed);
            }
            self.disarm(gpa);
            vcpu.set_registers(&regs)?;
            return Ok(Verdict::Resume);
        }
        let len = u64::from(ool.len);
        let scratch = ool.scratch.map(|r| {
            let saved = regs.get(r);
            regs.set(r, pc + len);
            (r, saved)
        });
        regs.rip = slot.va;
        vcpu.set_registers(&regs)?;
        vcpu.set_single_step(true)?;
        state.in_flight = Some(StepInFlight {
            orig_va: pc,
            len,
            slot_va: slot.va,
            scratch,
            fix_return_address: ool.fix_return_address,
            site_gpa: gpa,
        });
        Ok(Verdict::Resume)
    }

    /// Writes the guest's byte back under a site whose probes cannot run any more.
    fn disarm(&self, gpa: u64) {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        if let Some(site) = table.sites.get(&gpa)
            && site.trap == TrapKind::Software
            && !site.disarmed.swap(true, Ordering::SeqCst)
        {
            let _ = self.mem.write_slice(&site.saved, GuestAddress(gpa));
        }
    }

    fn emulate(&self, emu: &Emulation, regs: &mut Registers) -> Result<(), EmulationError> {
        let cr3 = regs.cr3;
        let mode = PagingMode::from_cr4(regs.cr4);
        let mem = &self.mem;
        emu.apply(regs, &mut |va, value| {
            write_virt(mem, cr3, mode, va, &value.to_le_bytes())
        })
    }

    fn complete_step(
        &self,
        vcpu: &mut dyn VcpuAccess,
        state: &mut VcpuProbeState,
        pc: u64,
    ) -> Result<Verdict, VmError> {
        let Some(step) = state.in_flight.take() else {
            // A step nobody asked for (a stale single-step flag): just go on.
            vcpu.set_single_step(false)?;
            return Ok(Verdict::Resume);
        };
        self.exits.steps.fetch_add(1, Ordering::Relaxed);
        if pc == step.slot_va {
            // A `rep` string instruction traps after each iteration with RIP unchanged: keep
            // stepping until it falls through.
            state.in_flight = Some(step);
            return Ok(Verdict::Resume);
        }
        let mut regs = vcpu.registers()?;
        let fell_through = pc == step.slot_va + step.len;
        if fell_through {
            regs.rip = step.orig_va + step.len;
        }
        if step.fix_return_address && !fell_through {
            // An indirect call pushed the slot address as its return address.
            let sp = regs.get(Gpr::Rsp);
            let ret = step.orig_va + step.len;
            let _ = write_virt(
                &self.mem,
                regs.cr3,
                PagingMode::from_cr4(regs.cr4),
                sp,
                &ret.to_le_bytes(),
            );
        }
        if let Some((r, saved)) = step.scratch {
            regs.set(r, saved);
        }
        regs.rflags &= !RFLAGS_RF;
        vcpu.set_registers(&regs)?;
        vcpu.set_single_step(false)?;
        let probes = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            table
                .sites
                .get(&step.site_gpa)
                .map(|s| s.probes.clone())
                .unwrap_or_default()
        };
        if probes.iter().any(|p| p.post.is_some()) {
            self.run_handlers(vcpu.id(), step.orig_va, &probes, &regs, true);
        }
        Ok(Verdict::Resume)
    }
}

/// Writes guest virtual memory (the stack, for emulated pushes) through the page tables.
fn write_virt<M: GuestMemory + Send + Sync>(
    mem: &M,
    cr3: u64,
    mode: PagingMode,
    va: u64,
    bytes: &[u8],
) -> Result<(), EmulationError> {
    let err = |why: String| EmulationError::Stack { va, why };
    // Translate every byte's page first so a split write is all or nothing.
    let mut parts = Vec::new();
    let mut done = 0usize;
    while done < bytes.len() {
        let at = va.wrapping_add(done as u64);
        let t = translate(&Walker(mem), cr3, mode, at).map_err(|e| err(e.to_string()))?;
        if !t.writable {
            return Err(err("not writable".into()));
        }
        let n = ((t.page_size - (at & (t.page_size - 1))) as usize).min(bytes.len() - done);
        parts.push((t.gpa, done, n));
        done += n;
    }
    for (gpa, off, n) in parts {
        mem.write_slice(&bytes[off..off + n], GuestAddress(gpa))
            .map_err(|_| err(format!("guest physical {gpa:#x} is not memory")))?;
    }
    Ok(())
}

/// Reads guest virtual memory through the page tables in `regs`, for the VMM's own checks.
pub fn read_guest_virtual<M: GuestMemory + Send + Sync>(
    mem: &M,
    regs: &Registers,
    va: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    read_virt(mem, regs.cr3, PagingMode::from_cr4(regs.cr4), va, buf).map_err(|e| e.0)
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;

/// FNV-1a hash of guest virtual memory `[start, end)` as mapped by the page tables in `regs`:
/// the check that removing probes leaves kernel text byte-for-byte as it was.
pub fn hash_guest_virtual<M: GuestMemory + Send + Sync>(
    mem: &M,
    regs: &Registers,
    start: u64,
    end: u64,
) -> Result<u64, String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 4096];
    let mut at = start;
    while at < end {
        let n = ((4096 - (at & 4095)).min(end - at)) as usize;
        read_guest_virtual(mem, regs, at, &mut buf[..n])?;
        for b in &buf[..n] {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        at += n as u64;
    }
    Ok(h)
}
