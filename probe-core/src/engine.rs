//! The probe engine: the probe table keyed by guest physical address, planting and removal,
//! and the per-vCPU hit state machine (breakpoint -> handlers -> step plan -> resume).
//!
//! The engine runs in the vCPU threads: each debug exit is handled on the thread that took it,
//! against that vCPU's [`VcpuAccess`] and its own [`VcpuProbeState`]; the table is shared and
//! only written while every vCPU is out of `KVM_RUN` (the VMM pauses them to plant or remove).

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::arch::x86_64::{
    DecodeError, Decoder, Emulation, EmulationError, Gpr, GuestInt3, GuestStack, INT3, OutOfLine,
    Refusal, Registers, StepPlan,
};
use crate::guest_kprobes::GuestKprobe;
use crate::pagewalk::{PagingMode, WalkError, translate};
use crate::probe::{Handler, PhysMemory, Probe, ProbeContext, TrapKind, Walker, read_virt};
use crate::retprobe::{Instance, InstanceTable, Returning};
use crate::vm::{DebugEvent, VcpuAccess, Verdict, VmError};
use crate::xol::{SLOT_SIZE, XolArea, XolError, XolSlot};

/// RFLAGS.RF: suppresses instruction breakpoints for one instruction.
const RFLAGS_RF: u64 = 1 << 16;
/// RFLAGS.IF: a trapped step runs with it clear, as Linux kprobes' int3 single-step does.
const RFLAGS_IF: u64 = 1 << 9;

/// How long a trapped step may stay pending on a vCPU before it counts as abandoned (its copy
/// faulted and the guest went elsewhere): with interrupts off it completes at once otherwise.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

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
    /// The probe needs an int3 trap of the host's (a trampoline, a trapped slot) and this KVM
    /// does not deliver int3 exits.
    #[error(
        "{location}: {what} needs int3 traps, which this KVM does not deliver (the trap self-test found hardware breakpoints only)"
    )]
    NeedsInt3 {
        /// The probe location.
        location: String,
        /// What needs it.
        what: &'static str,
    },
    /// The address is on, or inside the text taken by, one of the guest's own kprobes.
    #[error(
        "{location}: {va:#x} is {where_} the guest's own kprobe at {kprobe:#x}; hvprobe does not plant over it"
    )]
    GuestKprobe {
        /// The probe location.
        location: String,
        /// The probed address.
        va: u64,
        /// The guest kprobe's address.
        kprobe: u64,
        /// "at" or "inside the optimized jump of".
        where_: &'static str,
    },
    /// A post handler on an instruction whose copy cannot be followed by the host's trap.
    #[error("{location}: a post handler cannot run after `{instruction}`: it {reason}")]
    Untrappable {
        /// The probe location.
        location: String,
        /// The instruction.
        instruction: String,
        /// Why.
        reason: &'static str,
    },
    /// A RIP-relative operand whose target a copy in the XOL area cannot reach.
    #[error(
        "{location}: `{instruction}` addresses memory beyond +-2 GiB of the XOL area; its copy cannot be relocated"
    )]
    OutOfReach {
        /// The probe location.
        location: String,
        /// The instruction.
        instruction: String,
    },
    /// The instruction may fault with a fix-up in the guest's exception table.
    #[error(
        "{location}: refusing to probe `{instruction}` at {va:#x}: it has an entry in the guest's exception table (__ex_table), so a fault in a copy out of line could not be fixed up"
    )]
    ExceptionTable {
        /// The probe location.
        location: String,
        /// The instruction.
        instruction: String,
        /// Its address.
        va: u64,
    },
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
    /// The boosted copy (the copy, then `jmp` back): where an out-of-line plan runs, or where
    /// the real instruction of an emulated plan runs when its stack access fails.
    boosted: Option<XolSlot>,
    /// The trapped copy (the copy, then the host's int3), for post handlers.
    trapped: Option<XolSlot>,
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
    /// Traps that were the guest's own and went back to it.
    pub reinjected: u64,
    /// Returns through the return-probe trampoline.
    pub returns: u64,
    /// Trapped steps completed through a slot's int3.
    pub slot_traps: u64,
    /// Debug exceptions that were the guest's own (its single-step) and went back to it.
    pub reinjected_debug: u64,
    /// Trapped steps that never reached their trap (the copy faulted and the guest went on
    /// elsewhere), dropped after a bound.
    pub abandoned_steps: u64,
    /// Emulated instructions whose stack access failed, left to the real instruction in a
    /// boosted slot so that the guest takes its own fault.
    pub emulation_fallbacks: u64,
    /// Hits per step plan name.
    pub hits_by_plan: Vec<(&'static str, u64)>,
}

#[derive(Default)]
struct ExitCounters {
    breakpoints: AtomicU64,
    hw_breakpoints: AtomicU64,
    reinjected: AtomicU64,
    returns: AtomicU64,
    slot_traps: AtomicU64,
    reinjected_debug: AtomicU64,
    abandoned_steps: AtomicU64,
    emulation_fallbacks: AtomicU64,
    by_plan: [AtomicU64; 3],
}

const PLAN_NAMES: [&str; 3] = ["emulate", "xol", "xol-riprel"];

/// A trapped step under way on one vCPU: its copy runs with interrupts off until the slot's
/// int3, which is found by its address (never by "a step is pending").
#[derive(Debug, Clone)]
struct PendingStep {
    trap_va: u64,
    interrupts: u64,
    since: Instant,
}

/// Per-vCPU engine state, owned by the vCPU thread: the trapped steps under way (more than
/// one only when an NMI handler hits a probe between a copy and its trap).
#[derive(Debug, Default)]
pub struct VcpuProbeState {
    pending: Vec<PendingStep>,
}

impl VcpuProbeState {
    /// Whether a trapped step is pending on this vCPU.
    pub fn stepping(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Where a trapped slot's int3 sends the vCPU.
#[derive(Debug, Clone, Copy)]
struct SlotTrap {
    orig_va: u64,
    len: u64,
    site_gpa: u64,
}

struct ProbeTable {
    sites: HashMap<u64, Site>,
    /// The virtual addresses of the sites: after an emulated instruction, whether the next
    /// one may be probed too is answered here without a page walk.
    site_vas: HashSet<u64>,
    by_probe: HashMap<ProbeId, u64>,
    /// The int3 of each trapped slot, by its address.
    slot_traps: HashMap<u64, SlotTrap>,
    /// Addresses of the instructions with an entry in the guest's exception table.
    exception_table: HashSet<u64>,
    /// The guest's own armed kprobes, when its kprobe table could be read.
    guest_kprobes: Option<HashMap<u64, GuestKprobe>>,
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
    int3_written: AtomicBool,
    int3_trappable: AtomicBool,
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
                slot_traps: HashMap::new(),
                exception_table: HashSet::new(),
                guest_kprobes: None,
                next_id: 0,
                hw: [None; MAX_HW_BREAKPOINTS],
            }),
            xol: Mutex::new(xol),
            exits: ExitCounters::default(),
            start: Instant::now(),
            hw_generation: AtomicU64::new(0),
            int3_written: AtomicBool::new(false),
            int3_trappable: AtomicBool::new(true),
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

    /// Records the addresses of the instructions the guest's exception table lists
    /// (`__start___ex_table`..`__stop___ex_table`): they are never copied out of line.
    pub fn set_exception_table(&self, addresses: impl IntoIterator<Item = u64>) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        table.exception_table = addresses.into_iter().collect();
    }

    /// Records the guest's own armed kprobes (from its `kprobe_table`): the boundary walk puts
    /// back the bytes they cover, and no probe is planted over one. Without them an int3 in
    /// the walk that may cover an instruction makes the check fail.
    pub fn set_guest_kprobes(&self, kprobes: HashMap<u64, GuestKprobe>) {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        table.guest_kprobes = Some(kprobes);
    }

    /// Plants `probe` at `target`, using the page tables in `regs` (any vCPU's, all map kernel
    /// text alike). All checks come first: on error nothing in the guest's text has changed.
    /// Call with every vCPU out of `KVM_RUN`.
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
        if probe.on_return.is_some() && target.function_start.is_some_and(|f| f != target.va) {
            return Err(PlantError::NotFunctionEntry { location });
        }
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        if let Some(site) = table.sites.get(&gpa) {
            if site.trap != probe.trap {
                return Err(PlantError::MixedTraps { location });
            }
            let trapped = match (&*site.plan, site.trapped) {
                (StepPlan::StepOutOfLine(ool), None) if probe.post.is_some() => {
                    self.map_xol(&location, regs)?;
                    Some(self.trapped_slot(&location, &site.instruction, ool, site.va)?)
                }
                _ => None,
            };
            if probe.on_return.is_some() {
                self.map_xol(&location, regs)?;
                self.trampoline(&location)?;
            }
            let id = ProbeId(table.next_id);
            table.next_id += 1;
            let site = table.sites.get_mut(&gpa).expect("site present");
            if let Some(slot) = trapped {
                site.trapped = Some(slot);
            }
            let site_va = site.va;
            let plan = site.plan.clone();
            Arc::make_mut(&mut site.probes).push(ProbeEntry::new(id, location, probe));
            if let (Some(slot), StepPlan::StepOutOfLine(ool)) = (trapped, &*plan) {
                table.slot_traps.insert(
                    slot.va + ool.copy_len(site_va),
                    SlotTrap {
                        orig_va: site_va,
                        len: u64::from(ool.len),
                        site_gpa: gpa,
                    },
                );
            }
            table.by_probe.insert(id, gpa);
            return Ok(id);
        }

        if let Some((&kprobe, _)) = table
            .guest_kprobes
            .iter()
            .flatten()
            .find(|(va, kp)| (**va..**va + kp.span).contains(&target.va))
        {
            return Err(PlantError::GuestKprobe {
                location,
                va: target.va,
                kprobe,
                where_: if kprobe == target.va {
                    "at"
                } else {
                    "inside the optimized jump of"
                },
            });
        }
        // Capstone handles are not Send; planting is rare, so each plant makes its own.
        let decoder = Decoder::new().map_err(|source| PlantError::Decode {
            location: location.clone(),
            source,
        })?;
        if let Some(start) = target.function_start.filter(|s| *s < target.va) {
            let offset = target.va - start;
            let mut code = self.read_virt_bytes(&location, regs, start, offset as usize + 16)?;
            // Decode what the guest wrote, not our own breakpoints, nor the guest's kprobes
            // (kprobes' recover_probed_instruction).
            for site in table.sites.values() {
                if let Some(i) = site.va.checked_sub(start).map(|i| i as usize)
                    && i < code.len()
                {
                    code[i] = site.saved[0];
                }
            }
            for (va, kp) in table.guest_kprobes.iter().flatten() {
                if let Some(i) = va.checked_sub(start).map(|i| i as usize) {
                    for (j, b) in kp.original.iter().enumerate() {
                        if let Some(c) = code.get_mut(i + j) {
                            *c = *b;
                        }
                    }
                }
            }
            let int3 = if table.guest_kprobes.is_some() {
                GuestInt3::Padding
            } else {
                GuestInt3::Unknown
            };
            decoder
                .check_boundary(&code, start, offset, int3)
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
        let fallback = match &plan {
            StepPlan::Emulate(e) if e.touches_stack() => decoder.fallback_copy(&insn),
            _ => None,
        };
        drop(decoder);
        if table.exception_table.contains(&target.va) {
            return Err(PlantError::ExceptionTable {
                location,
                instruction: insn.text,
                va: target.va,
            });
        }
        let hw_index = match probe.trap {
            TrapKind::Hardware => Some(table.hw.iter().position(Option::is_none).ok_or(
                PlantError::NoHardwareBreakpoint {
                    location: location.clone(),
                },
            )?),
            TrapKind::Software => None,
        };
        let copy = match &plan {
            StepPlan::StepOutOfLine(ool) => Some(ool),
            StepPlan::Emulate(_) => fallback.as_ref(),
        };
        if copy.is_some() || probe.on_return.is_some() {
            self.map_xol(&location, regs)?;
        }
        if let (Some(reason), StepPlan::StepOutOfLine(_), true) = (
            copy.and_then(|c| c.untrappable),
            &plan,
            probe.post.is_some(),
        ) {
            return Err(PlantError::Untrappable {
                location,
                instruction: insn.text,
                reason,
            });
        }
        // Check that the copies can be made before anything is written.
        if let Some(ool) = copy
            && ool
                .boosted_slot(target.va, crate::xol::XOL_VA_BASE)
                .is_none()
        {
            return Err(PlantError::OutOfReach {
                location,
                instruction: insn.text,
            });
        }
        if probe.on_return.is_some() {
            self.trampoline(&location)?;
        }
        let boosted = copy
            .map(|ool| self.boosted_slot(&location, &insn.text, ool, target.va))
            .transpose()?;
        let trapped = match &plan {
            StepPlan::StepOutOfLine(ool) if probe.post.is_some() => {
                Some(self.trapped_slot(&location, &insn.text, ool, target.va)?)
            }
            _ => None,
        };
        let saved = insn.bytes[..1].to_vec();
        if probe.trap == TrapKind::Software {
            self.will_write_int3(&location, "an int3 probe")?;
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
        if let Some(slot) = trapped {
            let copy_len = match &plan {
                StepPlan::StepOutOfLine(ool) => ool.copy_len(target.va),
                StepPlan::Emulate(_) => insn.bytes.len() as u64,
            };
            table.slot_traps.insert(
                slot.va + copy_len,
                SlotTrap {
                    orig_va: target.va,
                    len: insn.bytes.len() as u64,
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
                instruction: insn.text.clone(),
                plan: Arc::new(plan),
                boosted,
                trapped,
                disarmed: std::sync::atomic::AtomicBool::new(false),
                probes: Arc::new(vec![ProbeEntry::new(id, location, probe)]),
            },
        );
        Ok(id)
    }

    /// Maps the XOL area through the kernel PUD table that every address space shares.
    fn map_xol(&self, location: &str, regs: &Registers) -> Result<(), PlantError> {
        self.xol
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ensure_mapped(&self.mem, regs.cr3, PagingMode::from_cr4(regs.cr4))
            .map(|_| ())
            .map_err(|source| PlantError::Xol {
                location: location.into(),
                source,
            })
    }

    /// Takes a fresh XOL slot and writes what `bytes` makes of its address into it, int3s
    /// after.
    fn fill_slot(
        &self,
        location: &str,
        bytes: impl FnOnce(u64) -> Option<Vec<u8>>,
    ) -> Result<Option<XolSlot>, PlantError> {
        let slot = self
            .xol
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allocate()
            .map_err(|source| PlantError::Xol {
                location: location.into(),
                source,
            })?;
        let Some(code) = bytes(slot.va) else {
            return Ok(None);
        };
        let mut fill = vec![INT3; SLOT_SIZE as usize];
        fill[..code.len()].copy_from_slice(&code);
        self.mem
            .write_slice(&fill, GuestAddress(slot.gpa))
            .map_err(|_| PlantError::Memory {
                location: location.into(),
                gpa: slot.gpa,
            })?;
        Ok(Some(slot))
    }

    /// A boosted slot for the instruction at `va`: its copy, then `jmp` back to `va + len`.
    fn boosted_slot(
        &self,
        location: &str,
        instruction: &str,
        ool: &OutOfLine,
        va: u64,
    ) -> Result<XolSlot, PlantError> {
        self.copy_slot(location, instruction, |slot| ool.boosted_slot(va, slot))
    }

    /// A trapped slot for the instruction at `va`: its copy, then the host's int3.
    fn trapped_slot(
        &self,
        location: &str,
        instruction: &str,
        ool: &OutOfLine,
        va: u64,
    ) -> Result<XolSlot, PlantError> {
        if let Some(reason) = ool.untrappable {
            return Err(PlantError::Untrappable {
                location: location.into(),
                instruction: instruction.into(),
                reason,
            });
        }
        self.will_write_int3(location, "a post handler after a stepped instruction")?;
        self.copy_slot(location, instruction, |slot| ool.trapped_slot(va, slot))
    }

    /// A slot holding a copy of `instruction` that `bytes` makes for the slot's address; a copy
    /// that cannot be relocated there is out of reach.
    fn copy_slot(
        &self,
        location: &str,
        instruction: &str,
        bytes: impl FnOnce(u64) -> Option<Vec<u8>>,
    ) -> Result<XolSlot, PlantError> {
        self.fill_slot(location, bytes)?
            .ok_or_else(|| PlantError::OutOfReach {
                location: location.into(),
                instruction: instruction.into(),
            })
    }

    /// The return trampoline: an XOL slot of int3s that replaced return addresses point to.
    fn trampoline(&self, location: &str) -> Result<XolSlot, PlantError> {
        let mut t = self.trampoline.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = *t {
            return Ok(slot);
        }
        self.will_write_int3(location, "a return probe (its trampoline is an int3)")?;
        let slot = self
            .fill_slot(location, |_| Some(Vec::new()))?
            .expect("an empty slot always fits");
        *t = Some(slot);
        Ok(slot)
    }

    /// Maps the XOL area through the kernel PUD table reached from the top-level page table at
    /// guest physical `table` (the kernel's initial one; every address space shares the PUD
    /// table). Returns whether it wrote the entry.
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
        let (found, retired) = self
            .returns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .leave(regs.get(Gpr::Rsp));
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

    /// Whether an int3 of ours has ever been written into the guest: until then no #BP can be
    /// ours, and the VMM leaves the guest's own int3s (its kprobes, text patching) to the
    /// guest instead of trapping and handing each back.
    pub fn int3_written(&self) -> bool {
        self.int3_written.load(Ordering::SeqCst)
    }

    /// Says whether this KVM delivers int3 exits (the trap self-test): without them, probes
    /// that need an int3 of the host's (return probes' trampoline, trapped slots for post
    /// handlers) are refused, even with hardware breakpoints as their trap.
    pub fn set_int3_trappable(&self, trappable: bool) {
        self.int3_trappable.store(trappable, Ordering::SeqCst);
    }

    /// An int3 of the host's is about to be written (a site, a trapped slot, the trampoline):
    /// refused if this KVM cannot trap it, else recorded so that #BP is trapped from now on.
    fn will_write_int3(&self, location: &str, what: &'static str) -> Result<(), PlantError> {
        if !self.int3_trappable.load(Ordering::SeqCst) {
            return Err(PlantError::NeedsInt3 {
                location: location.into(),
                what,
            });
        }
        self.int3_written.store(true, Ordering::SeqCst);
        Ok(())
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
            reinjected: e.reinjected.load(Ordering::Relaxed),
            returns: e.returns.load(Ordering::Relaxed),
            slot_traps: e.slot_traps.load(Ordering::Relaxed),
            reinjected_debug: e.reinjected_debug.load(Ordering::Relaxed),
            abandoned_steps: e.abandoned_steps.load(Ordering::Relaxed),
            emulation_fallbacks: e.emulation_fallbacks.load(Ordering::Relaxed),
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

    /// Handles one debug exit of `vcpu`. On `Resume` the registers are set for the next
    /// `KVM_RUN`; on a reinjection nothing was changed.
    pub fn handle_debug(
        &self,
        vcpu: &mut dyn VcpuAccess,
        state: &mut VcpuProbeState,
        event: DebugEvent,
    ) -> Result<Verdict, VmError> {
        match event {
            // The engine never single-steps: a #DB that is not one of its hardware breakpoints
            // is the guest's own (its TF, its debug registers) and goes back to it.
            DebugEvent::SingleStep { .. } => {
                self.exits.reinjected_debug.fetch_add(1, Ordering::Relaxed);
                Ok(Verdict::ReinjectDebug)
            }
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
        let mut regs = vcpu.registers()?;
        if !hw {
            let trampoline = *self.trampoline.lock().unwrap_or_else(|e| e.into_inner());
            if trampoline.is_some_and(|t| t.va == pc) {
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
                return self.finish_trapped_step(vcpu, state, regs, pc, trap);
            }
        }
        self.drop_abandoned(state);
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
                break;
            }
            let site = translate(&Walker(&self.mem), regs.cr3, mode, pc)
                .ok()
                .and_then(|t| {
                    let table = self.table.read().unwrap_or_else(|e| e.into_inner());
                    table
                        .sites
                        .get(&t.gpa)
                        .filter(|s| s.va == pc && !s.disarmed.load(Ordering::SeqCst))
                        .map(|s| {
                            (
                                t.gpa,
                                s.probes.clone(),
                                s.plan.clone(),
                                s.boosted,
                                s.trapped,
                            )
                        })
                });
            let Some((gpa, probes, plan, boosted, trapped)) = site else {
                if chained > 0 {
                    break;
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
            self.run_handlers(vcpu.id(), pc, &probes, &regs, false);
            self.enter_returns(&probes, &regs);
            let has_post = probes.iter().any(|p| p.post.is_some());
            let plan_index = PLAN_NAMES
                .iter()
                .position(|n| *n == plan.name())
                .unwrap_or(0);
            self.exits.by_plan[plan_index].fetch_add(1, Ordering::Relaxed);
            // RIP moves on: a resume flag left from a hardware-breakpoint #DB would suppress a
            // breakpoint on the next instruction.
            regs.rflags &= !RFLAGS_RF;

            match &*plan {
                StepPlan::Emulate(emu) => {
                    if self.emulate(emu, &mut regs).is_err() {
                        // The stack is not accessible from here: the real instruction runs in
                        // its boosted slot, where the guest takes its own fault.
                        if let Some(slot) = boosted {
                            self.exits
                                .emulation_fallbacks
                                .fetch_add(1, Ordering::Relaxed);
                            regs.rip = slot.va;
                            vcpu.set_registers(&regs)?;
                            return Ok(Verdict::Resume);
                        }
                        for p in probes.iter() {
                            p.counters.missed.fetch_add(1, Ordering::Relaxed);
                        }
                        vcpu.set_registers(&regs)?;
                        return Ok(Verdict::Resume);
                    }
                    if has_post {
                        self.run_handlers(vcpu.id(), pc, &probes, &regs, true);
                    }
                    if emu.opens_interrupt_shadow() {
                        // `sti` blocks interrupts for one more instruction (`sti; hlt` relies
                        // on it): the VMM sets the shadow, and the chain stops here.
                        vcpu.set_registers(&regs)?;
                        vcpu.block_interrupts_once()?;
                        return Ok(Verdict::Resume);
                    }
                    pc = regs.rip;
                }
                StepPlan::StepOutOfLine(ool) => {
                    return self.start_step(
                        vcpu, state, regs, gpa, ool, boosted, trapped, has_post, &probes,
                    );
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

    /// Sends the vCPU to the copy of the instruction: the boosted slot (copy, `jmp` back: no
    /// further exit), or, when post handlers want control after it, the trapped slot with
    /// interrupts off until its int3 (Linux x86 kprobes' int3 single-step).
    #[allow(clippy::too_many_arguments)]
    fn start_step(
        &self,
        vcpu: &mut dyn VcpuAccess,
        state: &mut VcpuProbeState,
        mut regs: Registers,
        gpa: u64,
        ool: &OutOfLine,
        boosted: Option<XolSlot>,
        trapped: Option<XolSlot>,
        has_post: bool,
        probes: &[Arc<ProbeEntry>],
    ) -> Result<Verdict, VmError> {
        let mode = PagingMode::from_cr4(regs.cr4);
        let mapped = self
            .xol
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ensure_mapped(&self.mem, regs.cr3, mode)
            .is_ok();
        let slot = match (trapped, boosted) {
            (Some(t), _) if has_post => Some((t, true)),
            (_, Some(b)) => Some((b, false)),
            _ => None,
        };
        let Some((slot, trapping)) = slot.filter(|_| mapped) else {
            // The slot cannot be reached in this address space (the guest took the hole): the
            // instruction cannot run out of line, and leaving the trap in place would trap
            // forever. Disarm the site (the guest's byte goes back), count the miss, and let
            // the vCPU run the original instruction.
            for p in probes {
                p.counters.missed.fetch_add(1, Ordering::Relaxed);
            }
            self.disarm(gpa);
            vcpu.set_registers(&regs)?;
            return Ok(Verdict::Resume);
        };
        if trapping {
            state.pending.push(PendingStep {
                trap_va: slot.va + ool.copy_len(regs.rip),
                interrupts: regs.rflags & RFLAGS_IF,
                since: Instant::now(),
            });
            regs.rflags &= !RFLAGS_IF;
        }
        regs.rip = slot.va;
        vcpu.set_registers(&regs)?;
        Ok(Verdict::Resume)
    }

    /// A trapped slot's int3: back to the original stream after the copied instruction, the
    /// interrupt flag as it was at the hit, post handlers.
    fn finish_trapped_step(
        &self,
        vcpu: &mut dyn VcpuAccess,
        state: &mut VcpuProbeState,
        mut regs: Registers,
        pc: u64,
        trap: SlotTrap,
    ) -> Result<Verdict, VmError> {
        self.exits.slot_traps.fetch_add(1, Ordering::Relaxed);
        regs.rip = trap.orig_va + trap.len;
        match state.pending.iter().rposition(|p| p.trap_va == pc) {
            Some(i) => {
                let step = state.pending.remove(i);
                regs.rflags |= step.interrupts;
            }
            // Not started on this vCPU (it cannot move with interrupts off, but a guest can
            // jump anywhere): the flags stay as the guest has them.
            None => {
                self.exits.abandoned_steps.fetch_add(1, Ordering::Relaxed);
            }
        }
        vcpu.set_registers(&regs)?;
        let probes = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            table
                .sites
                .get(&trap.site_gpa)
                .map(|s| s.probes.clone())
                .unwrap_or_default()
        };
        if probes.iter().any(|p| p.post.is_some()) {
            self.run_handlers(vcpu.id(), trap.orig_va, &probes, &regs, true);
        }
        Ok(Verdict::Resume)
    }

    /// Forgets trapped steps that never reached their trap within [`ABANDONED_AFTER`].
    fn drop_abandoned(&self, state: &mut VcpuProbeState) {
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
        let mut stack = VirtualStack {
            mem: &self.mem,
            cr3: regs.cr3,
            mode: PagingMode::from_cr4(regs.cr4),
        };
        emu.apply(regs, &mut stack)
    }
}

/// The guest stack through the page tables of one vCPU, for emulation.
struct VirtualStack<'a, M: GuestMemory + Send + Sync> {
    mem: &'a M,
    cr3: u64,
    mode: PagingMode,
}

impl<M: GuestMemory + Send + Sync> GuestStack for VirtualStack<'_, M> {
    fn read_u64(&mut self, va: u64) -> Result<u64, EmulationError> {
        let mut b = [0u8; 8];
        read_virt(self.mem, self.cr3, self.mode, va, &mut b)
            .map_err(|e| EmulationError::Stack { va, why: e.0 })?;
        Ok(u64::from_le_bytes(b))
    }

    fn write_u64(&mut self, va: u64, value: u64) -> Result<(), EmulationError> {
        write_virt(self.mem, self.cr3, self.mode, va, &value.to_le_bytes())
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
