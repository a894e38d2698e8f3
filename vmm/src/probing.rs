//! The KVM side of probing: the per-vCPU guest-debug state and the handling of
//! `KVM_EXIT_DEBUG` on the vCPU thread that took it. What differs per architecture (registers,
//! the `kvm_guest_debug` layout, decoding the exit, the KASLR anchor) comes from [`crate::arch`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_ioctls::VcpuFd;
use probe_core::engine::{ProbeEngine, VcpuProbeState};
use probe_core::vm::{DebugEvent, VcpuError, Verdict};
use vm_memory::GuestMemoryMmap;

use crate::arch::{
    ExitRoute, Guest, GuestDebug, GuestDebugContext, GuestDebugSetup, GuestRegisters, Host, VmmArch,
};

/// Errors of the probing side of a vCPU: a KVM call that failed, or a debug exit the engine
/// could not handle. Any of them stops the machine.
#[derive(Debug, thiserror::Error)]
pub enum ProbingError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// KVM reported a debug exit hvprobe did not ask for.
    #[error("debug exit for {0} that hvprobe did not ask for")]
    UnexpectedExit(String),
    /// The engine could not handle the exit.
    #[error(transparent)]
    Engine(#[from] VcpuError),
    /// The register list for a `KVM_GET_MSRS`/`KVM_GET_ONE_REG` batch could not be built.
    #[error("building the register list: {0}")]
    RegisterList(String),
    /// A debug exit on a vCPU of a run without probes.
    #[error("debug exit without probes ({0})")]
    NoProbes(String),
    /// A store KVM handed over undecoded could not be made.
    #[error("{0}")]
    UnsyndromedStore(String),
    /// This build's architecture has no VMM yet.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// A failed vCPU call made for the engine (a register ioctl), as the engine's [`VcpuError`].
pub(crate) fn vcpu_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |e| VcpuError::Call {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ProbingError {
    move |source| ProbingError::Kvm { what, source }
}

/// What the vCPU loop asks of the component that watches its debug exits: bring the vCPU's
/// guest debugging up to date before each `KVM_RUN`, and handle each `KVM_EXIT_DEBUG`. The
/// loop knows nothing more about probing.
pub trait DebugExitHook: Send {
    /// Called before every `KVM_RUN`.
    fn before_run(&mut self, fd: &mut VcpuFd) -> Result<(), ProbingError>;
    /// Called on every `KVM_EXIT_DEBUG` of vCPU `id`.
    fn on_debug_exit(
        &mut self,
        id: u32,
        fd: &mut VcpuFd,
        exit: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<(), ProbingError>;
    /// Called on every MMIO write exit of vCPU `id`, before any device sees it: whether it
    /// was a store to a page hvprobe protects (then it has been handled).
    fn on_mmio_write(
        &mut self,
        _id: u32,
        _fd: &mut VcpuFd,
        _gpa: u64,
        _data: &[u8],
    ) -> Result<bool, ProbingError> {
        Ok(false)
    }
    /// Called on an exit the vCPU loop does not know (`reason`): whether it was one the
    /// architecture handles for probing (arm64: a store KVM could not decode).
    fn on_other_exit(
        &mut self,
        _id: u32,
        _fd: &mut VcpuFd,
        _reason: u32,
    ) -> Result<bool, ProbingError> {
        Ok(false)
    }
}

/// The hook of a run without probes: no guest debugging, and a debug exit is an error.
pub struct NoProbes;

impl DebugExitHook for NoProbes {
    fn before_run(&mut self, _fd: &mut VcpuFd) -> Result<(), ProbingError> {
        Ok(())
    }

    fn on_debug_exit(
        &mut self,
        _id: u32,
        _fd: &mut VcpuFd,
        exit: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<(), ProbingError> {
        Err(ProbingError::NoProbes(Host::describe_debug_exit(exit)))
    }
}

impl DebugExitHook for VcpuProbing {
    fn before_run(&mut self, fd: &mut VcpuFd) -> Result<(), ProbingError> {
        self.prepare_entry(fd)
    }

    fn on_debug_exit(
        &mut self,
        id: u32,
        fd: &mut VcpuFd,
        exit: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<(), ProbingError> {
        self.handle_exit(id, fd, exit)
    }

    /// A store to a protected page is reported and completed or dropped by the engine; any
    /// other MMIO write is a device's.
    fn on_mmio_write(
        &mut self,
        id: u32,
        fd: &mut VcpuFd,
        gpa: u64,
        data: &[u8],
    ) -> Result<bool, ProbingError> {
        let engine = &self.shared.engine;
        if !engine.is_protected(gpa) {
            return Ok(false);
        }
        // arm64 needs the PC to read registers; x86 has it in the registers.
        let pc = match Host::STORE_EXIT_AT_WRITER {
            true => Host::read_pc(fd).map_err(kvm("KVM_GET_ONE_REG (PC)"))?,
            false => 0,
        };
        let mut vcpu = Host::exit_vcpu(id, fd, self.sync_regs, pc);
        let done = engine.protected_write(&mut vcpu, Host::STORE_EXIT_AT_WRITER, gpa, data);
        let (reads, writes) = Host::register_ioctls(&vcpu);
        self.count_register_ioctls(reads + u64::from(Host::STORE_EXIT_AT_WRITER), writes);
        Ok(done? != probe_core::engine::ProtectedStore::NotProtected)
    }

    fn on_other_exit(
        &mut self,
        id: u32,
        fd: &mut VcpuFd,
        reason: u32,
    ) -> Result<bool, ProbingError> {
        let Some((reads, writes)) = Host::arch_exit(id, fd, reason, &self.shared.engine)? else {
            return Ok(false);
        };
        self.count_register_ioctls(reads, writes);
        Ok(true)
    }
}

/// What the VMM reads from a paused vCPU before planting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PausedState {
    /// The registers (page tables included).
    pub regs: GuestRegisters,
    /// Where the running kernel's KASLR anchor is ([`crate::Host::KASLR_ANCHOR`]), 0 if it
    /// could not be read.
    pub kaslr_anchor: u64,
    /// The vCPU was in the kernel (CPL 0, EL1): its page-table root and anchor register are
    /// the kernel's.
    pub in_kernel: bool,
    /// What the guest's CPU offers, for the engine's plans.
    pub cpu_features: <Guest as probe_core::arch::Arch>::CpuFeatures,
    /// The guest's time stamp counter now and its rate in kHz, where KVM tells them: the
    /// clock of the jump plan's records.
    pub counter: Option<(u64, u64)>,
    /// The protection settings and table bases `--integrity` compares, by name (x86: CR0.WP,
    /// CR4.SMEP, CR4.SMAP, the IDT base; arm64: VBAR_EL1, SCTLR_EL1.WXN, SCTLR_EL1.SPAN).
    pub control: Vec<(&'static str, u64)>,
}

/// The engine type the VMM uses: the host's architecture over mmap'd guest memory.
pub type Engine = ProbeEngine<Guest, GuestMemoryMmap>;

/// Probing shared by all vCPU threads.
pub struct Probing {
    /// The engine.
    pub engine: Arc<Engine>,
    /// This KVM delivers software-breakpoint exits; they are trapped once a breakpoint of
    /// hvprobe's is in the guest.
    pub breakpoint_exits: bool,
    /// Register ioctls made while handling debug exits, for figures.
    pub register_ioctls: Arc<RegisterIoctls>,
    /// The running kernel's return path to user mode (0 until planting found it, or none).
    pub user_return: Arc<AtomicU64>,
    /// The hardware breakpoint kept for the slot-exception watch, if any
    /// ([`crate::<arch::GuestDebugSetup as arch::GuestDebug>::SLOT_EXCEPTION_WATCH`]).
    pub exception_watch_slot: Option<usize>,
    /// What each vCPU's debug exits were, by vCPU id.
    pub vcpus: Arc<[VcpuCounts]>,
}

/// One vCPU's debug exits: how many, how many were probe hits, how many were the guest's own
/// and went back to it. Written by the vCPU's thread, read for the summary and live stats.
#[derive(Debug, Default)]
pub struct VcpuCounts {
    /// `KVM_EXIT_DEBUG` exits taken.
    pub debug_exits: AtomicU64,
    /// Probe sites hit.
    pub site_hits: AtomicU64,
    /// The guest's own breakpoints and debug exceptions handed back to it.
    pub handed_back: AtomicU64,
}

impl VcpuCounts {
    /// The counts now: (debug exits, site hits, handed back).
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.debug_exits.load(Ordering::Relaxed),
            self.site_hits.load(Ordering::Relaxed),
            self.handed_back.load(Ordering::Relaxed),
        )
    }
}

/// Register ioctls made while handling debug exits (`KVM_GET/SET_ONE_REG` on arm64, which has
/// no sync regs; on x86_64 none while sync regs are on): what a hit costs beyond the exit.
#[derive(Debug, Default)]
pub struct RegisterIoctls {
    reads: AtomicU64,
    writes: AtomicU64,
}

impl RegisterIoctls {
    /// Reads and writes so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        )
    }
}

/// One vCPU's probing state, owned by its thread.
pub struct VcpuProbing {
    shared: Arc<Probing>,
    state: VcpuProbeState,
    setup: GuestDebugSetup,
    applied: Option<GuestDebugSetup>,
    applied_generation: u64,
    sync_regs: bool,
}

impl VcpuProbing {
    /// Probing state for one vCPU; turns on register syncing through `kvm_run` if KVM has it.
    pub fn new(shared: Arc<Probing>, fd: &mut VcpuFd, sync_regs: bool) -> VcpuProbing {
        if sync_regs {
            Host::enable_register_sync(fd);
        }
        VcpuProbing {
            shared,
            state: VcpuProbeState::default(),
            setup: GuestDebugSetup::default(),
            applied: None,
            applied_generation: u64::MAX,
            sync_regs,
        }
    }

    /// Brings the vCPU's guest debugging up to date; call before every `KVM_RUN`. Costs an
    /// ioctl only when something changed.
    pub fn prepare_entry(&mut self, fd: &mut VcpuFd) -> Result<(), ProbingError> {
        let engine = &self.shared.engine;
        let generation = engine.hardware_generation();
        if generation != self.applied_generation {
            let (slots, _) = engine.hardware_slots();
            let execute: Vec<Option<u64>> = slots
                .iter()
                .map(|s| s.filter(|s| s.watch.is_none()).map(|s| s.va))
                .collect();
            self.setup.set_hardware(&execute);
            self.setup.set_watchpoints(&engine.watchpoint_slots());
            self.applied_generation = generation;
        }
        // Breakpoints are trapped only once one of ours is in the guest: before that (boot, a
        // run whose probes were all refused) the guest's own stay the guest's business.
        self.setup
            .trap_breakpoints(self.shared.breakpoint_exits && engine.breakpoint_written());
        // An injection acts once, at the ioctl: a request for it always needs one, and what KVM
        // keeps afterwards is the set-up without it. (Comparing with it included would skip
        // the ioctl for a second foreign breakpoint in a row, and the guest would loop on it.)
        if self.applied != Some(self.setup) || self.setup.injecting() {
            if self.sync_regs {
                Host::flush_register_sync(fd)?;
            }
            fd.set_guest_debug(&self.setup.to_kvm())
                .map_err(kvm("KVM_SET_GUEST_DEBUG"))?;
            self.setup.applied();
            self.applied = Some(self.setup);
        }
        Ok(())
    }

    /// Handles a `KVM_EXIT_DEBUG` of vCPU `id`.
    pub fn handle_exit(
        &mut self,
        id: u32,
        fd: &mut VcpuFd,
        exit: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<(), ProbingError> {
        let ctx = GuestDebugContext {
            user_return: Some(self.shared.user_return.load(Ordering::Relaxed)).filter(|&a| a != 0),
            hw_count: self.shared.engine.hardware_breakpoint_count(),
            hardware_in_use: self.applied.is_some_and(|a| a.loads_hardware()),
            exception_watch_slot: self.shared.exception_watch_slot,
        };
        let counts = self.shared.vcpus.get(id as usize);
        if let Some(c) = counts {
            c.debug_exits.fetch_add(1, Ordering::Relaxed);
        }
        let handed_back = || {
            if let Some(c) = counts {
                c.handed_back.fetch_add(1, Ordering::Relaxed);
            }
        };
        // The guest's own debug exits never reach the engine.
        let stepped_watch = match self.setup.take_guest_exit(fd, exit, &ctx)? {
            ExitRoute::Taken => {
                handed_back();
                return Ok(());
            }
            ExitRoute::Engine => None,
            ExitRoute::WatchStep => {
                self.shared.engine.count_watch_step();
                return Ok(());
            }
            ExitRoute::Watchpoint { writer, slots } => Some((writer, slots)),
            ExitRoute::ExceptionEntry { return_pc } => {
                if let Some(rewind) = self
                    .shared
                    .engine
                    .rewind_slot_exception(&mut self.state, return_pc)
                {
                    self.setup.rewind_exception(fd, rewind)?;
                }
                return Ok(());
            }
        };
        let event = match stepped_watch {
            Some((writer, slots)) => DebugEvent::Watchpoint {
                pc: Host::read_pc(fd).map_err(kvm("KVM_GET_ONE_REG (PC)"))?,
                slots,
                writer: Some(writer),
            },
            None => Host::decode_debug_exit(fd, exit, self.setup.watch_slots())
                .ok_or_else(|| ProbingError::UnexpectedExit(Host::describe_debug_exit(exit)))?,
        };
        let mut vcpu = Host::exit_vcpu(id, fd, self.sync_regs, event.pc());
        let verdict = self
            .shared
            .engine
            .handle_debug(&mut vcpu, &mut self.state, event);
        let (reads, writes) = Host::register_ioctls(&vcpu);
        self.count_register_ioctls(reads, writes);
        if let Some(c) = counts {
            c.site_hits.store(self.state.site_hits(), Ordering::Relaxed);
        }
        // (A hand-back acts now or at the next entry; `prepare_entry` applies the set-up
        // either way, and `injecting` makes it do so for one that waits.)
        match verdict? {
            Verdict::Resume => {
                self.setup
                    .watch_slot_exceptions(fd, self.state.stepping(), &ctx)?;
            }
            Verdict::Reinject => {
                handed_back();
                self.setup.hand_back_breakpoint(fd, exit, &ctx)?;
            }
            Verdict::ReinjectDebug => {
                handed_back();
                self.setup.hand_back_debug(fd, exit, &ctx)?;
            }
        }
        Ok(())
    }

    /// Counts register ioctls made for an exit, for figures.
    fn count_register_ioctls(&self, reads: u64, writes: u64) {
        let ioctls = &self.shared.register_ioctls;
        ioctls.reads.fetch_add(reads, Ordering::Relaxed);
        ioctls.writes.fetch_add(writes, Ordering::Relaxed);
    }

    /// Reads the state of a vCPU that is out of `KVM_RUN`: registers and the KASLR anchor.
    pub fn paused_state(fd: &mut VcpuFd) -> Result<PausedState, ProbingError> {
        Host::paused_state(fd)
    }
}
