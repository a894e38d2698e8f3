//! The KVM side of probing: the [`VcpuAccess`] implementation over a `VcpuFd` (registers through
//! `KVM_CAP_SYNC_REGS` when KVM offers it), the per-vCPU guest-debug state, and the handling of
//! `KVM_EXIT_DEBUG` on the vCPU thread that took it.

use std::sync::Arc;

use kvm_ioctls::{SyncReg, VcpuFd};
use probe_core::arch::x86_64::Registers;
use probe_core::engine::{ProbeEngine, VcpuProbeState};
use probe_core::vm::{VcpuAccess, Verdict, VmError};
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::debug::{
    GuestDebugSetup, debug_event, registers_from_kvm, registers_to_kvm,
};

/// `MSR_LSTAR`: the 64-bit syscall entry point.
const MSR_LSTAR: u32 = 0xc000_0082;

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
    /// KVM reported a debug exit for a vector hvprobe did not ask for.
    #[error("debug exit for vector {0} that hvprobe did not ask for")]
    UnexpectedVector(u32),
    /// The engine could not handle the exit.
    #[error(transparent)]
    Engine(#[from] VmError),
    /// The MSR list for `KVM_GET_MSRS` could not be built.
    #[error("building the MSR list: {0}")]
    MsrList(String),
    /// A debug exit on a vCPU of a run without probes.
    #[error("debug exit without probes (vector {0})")]
    NoProbes(u32),
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
        arch: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<(), ProbingError>;
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
        arch: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<(), ProbingError> {
        Err(ProbingError::NoProbes(arch.exception))
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
        arch: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<(), ProbingError> {
        self.handle_exit(id, fd, arch)
    }
}

/// What the VMM reads from a paused vCPU before planting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PausedState {
    /// The registers (page tables included).
    pub regs: Registers,
    /// `MSR_LSTAR`: where the running kernel's `entry_SYSCALL_64` is.
    pub syscall_entry: u64,
}

/// The engine type the VMM uses.
pub type Engine = ProbeEngine<GuestMemoryMmap>;

/// Probing shared by all vCPU threads.
pub struct Probing {
    /// The engine.
    pub engine: Arc<Engine>,
    /// This KVM delivers int3 exits; #BP is trapped once an int3 of hvprobe's is in the guest.
    pub int3_exits: bool,
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

/// A vCPU as probe-core sees it.
struct KvmVcpu<'a> {
    id: u32,
    fd: &'a mut VcpuFd,
    sync_regs: bool,
}

fn err(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> VmError + '_ {
    move |e| VmError(format!("{what}: {e}"))
}

impl VcpuAccess for KvmVcpu<'_> {
    fn id(&self) -> u32 {
        self.id
    }

    fn registers(&mut self) -> Result<Registers, VmError> {
        if self.sync_regs {
            let s = self.fd.sync_regs();
            return Ok(registers_from_kvm(&s.regs, &s.sregs));
        }
        let r = self.fd.get_regs().map_err(err("KVM_GET_REGS"))?;
        let s = self.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        Ok(registers_from_kvm(&r, &s))
    }

    fn set_registers(&mut self, regs: &Registers) -> Result<(), VmError> {
        let r = registers_to_kvm(regs);
        if self.sync_regs {
            self.fd.sync_regs_mut().regs = r;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            return Ok(());
        }
        self.fd.set_regs(&r).map_err(err("KVM_SET_REGS"))
    }

    fn block_interrupts_once(&mut self) -> Result<(), VmError> {
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(err("KVM_GET_VCPU_EVENTS"))?;
        events.interrupt.shadow = kvm_bindings::KVM_X86_SHADOW_INT_STI as u8;
        events.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW;
        self.fd
            .set_vcpu_events(&events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))
    }
}

impl VcpuProbing {
    /// Probing state for one vCPU; turns on register syncing through `kvm_run` if KVM has it.
    pub fn new(shared: Arc<Probing>, fd: &mut VcpuFd, sync_regs: bool) -> VcpuProbing {
        if sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
            fd.set_sync_valid_reg(SyncReg::SystemRegister);
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
            self.setup.hardware = engine.hardware_breakpoints().0;
            self.applied_generation = generation;
        }
        // #BP is trapped only once an int3 of ours is in the guest: before that (boot, a run
        // whose probes were all refused) the guest's own int3s stay the guest's business.
        self.setup.software_breakpoints = self.shared.int3_exits && engine.int3_written();
        // INJECT_BP acts once, at the ioctl: a request for it always needs one, and what KVM
        // keeps afterwards is the set-up without it. (Comparing with it included would skip
        // the ioctl for a second foreign int3 in a row, and the guest would loop on it.)
        if self.applied != Some(self.setup)
            || self.setup.inject_breakpoint
            || self.setup.inject_debug
        {
            // KVM_SET_GUEST_DEBUG computes TF from the registers KVM holds now, so registers
            // the engine left in the sync area must reach KVM first.
            if self.sync_regs
                && fd.get_kvm_run().kvm_dirty_regs & u64::from(kvm_bindings::KVM_SYNC_X86_REGS) != 0
            {
                let regs = fd.sync_regs().regs;
                fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
                fd.get_kvm_run().kvm_dirty_regs &= !u64::from(kvm_bindings::KVM_SYNC_X86_REGS);
            }
            fd.set_guest_debug(&self.setup.to_kvm())
                .map_err(kvm("KVM_SET_GUEST_DEBUG"))?;
            self.setup.inject_breakpoint = false;
            self.setup.inject_debug = false;
            self.applied = Some(self.setup);
        }
        Ok(())
    }

    /// Handles a `KVM_EXIT_DEBUG` of vCPU `id`.
    pub fn handle_exit(
        &mut self,
        id: u32,
        fd: &mut VcpuFd,
        arch: &kvm_bindings::kvm_debug_exit_arch,
    ) -> Result<(), ProbingError> {
        let Some(event) = debug_event(arch) else {
            return Err(ProbingError::UnexpectedVector(arch.exception));
        };
        let mut vcpu = KvmVcpu {
            id,
            fd,
            sync_regs: self.sync_regs,
        };
        let verdict = self
            .shared
            .engine
            .handle_debug(&mut vcpu, &mut self.state, event)?;
        match verdict {
            Verdict::Resume => {}
            Verdict::Reinject => self.setup.inject_breakpoint = true,
            Verdict::ReinjectDebug => self.setup.inject_debug = true,
        }
        Ok(())
    }

    /// Reads the state of a vCPU that is out of `KVM_RUN`: registers and the syscall entry
    /// point (`MSR_LSTAR`), from which the KASLR slide follows.
    pub fn paused_state(fd: &mut VcpuFd) -> Result<PausedState, ProbingError> {
        let r = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let s = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: MSR_LSTAR,
            ..Default::default()
        }])
        .map_err(|e| ProbingError::MsrList(format!("{e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        let syscall_entry = if n == 1 { msrs.as_slice()[0].data } else { 0 };
        Ok(PausedState {
            regs: registers_from_kvm(&r, &s),
            syscall_entry,
        })
    }
}
