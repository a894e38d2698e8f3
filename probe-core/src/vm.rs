//! The seam between the probe engine and the hypervisor: what the engine needs from one vCPU
//! (guest physical memory, which everything in probe-core reads, is [`crate::guest_memory`]'s). The KVM implementation
//! lives in `vmm/`; tests use a fake vCPU over real `GuestMemoryMmap` memory.

use crate::arch::Arch;
pub use crate::guest_memory::GuestPhysMemory;

/// Why a debug exit could not be handled: the run stops with it.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A call on the vCPU failed (a register ioctl).
    #[error("{what}: {source}")]
    Call {
        /// The call.
        what: &'static str,
        /// What it returned.
        source: std::io::Error,
    },
    /// A store to a protected page could not be made in guest memory.
    #[error("a store to a protected page at {gpa:#x} is outside guest memory")]
    ProtectedStore {
        /// Where.
        gpa: u64,
    },
    /// General-purpose registers were changed without having been read (a lazily read
    /// register file cannot tell a change from a value it never had).
    #[error("general-purpose registers written without having been read")]
    UnreadRegistersWritten,
    /// One of hvprobe's breakpoint encodings where it planted none: never handed to the guest.
    #[error(
        "an hvprobe breakpoint at {pc:#x}, where hvprobe planted none (a copy of probed text the guest made?); not handed to the guest"
    )]
    StrayBreakpoint {
        /// Where.
        pc: u64,
    },
    /// A return through the trampoline that no live instance accounts for.
    #[error(
        "vCPU {vcpu}: a return through the trampoline with no live instance (sp {sp:#x}); the real return address is lost"
    )]
    LostReturn {
        /// The vCPU.
        vcpu: u32,
        /// Its stack pointer at the trampoline.
        sp: u64,
    },
}

/// One vCPU of architecture `A`, as the engine drives it while handling one of its debug exits.
pub trait VcpuAccess<A: Arch> {
    /// The vCPU index.
    fn id(&self) -> u32;
    /// Reads the registers (from the shared `kvm_run` page where KVM offers sync regs).
    fn registers(&mut self) -> Result<A::Registers, VcpuError>;
    /// The registers a debug exit gives the engine to start with: at least the PC. Where
    /// reading a register costs (arm64: one `KVM_GET_ONE_REG` each) the rest are left unread
    /// (x0-x30 as zero, page-table roots as a root no walk gets through) until
    /// [`VcpuAccess::complete_registers_in`] reads them, and must not be changed before. By
    /// default all.
    fn exit_registers(&mut self) -> Result<A::Registers, VcpuError> {
        self.registers()
    }
    /// Fills in every register of `regs`, which came from [`VcpuAccess::exit_registers`];
    /// nothing if they were read already.
    fn complete_registers(&mut self, _regs: &mut A::Registers) -> Result<(), VcpuError> {
        Ok(())
    }
    /// Fills in at least the registers of `regs` that the register-use mask `used` names
    /// ([`crate::arch::HostEmulation::registers_used`]), leaving those read already as `regs`
    /// has them; by default all of them.
    fn complete_registers_in(
        &mut self,
        regs: &mut A::Registers,
        _used: u64,
    ) -> Result<(), VcpuError> {
        self.complete_registers(regs)
    }
    /// Says that the engine wrote the general-purpose registers of the register-use mask
    /// `registers` whole, without reading them ([`crate::arch::HostEmulation::registers_overwritten`]):
    /// [`VcpuAccess::set_registers`] writes them whatever their old values. Nothing to do
    /// where every register was read.
    fn overwrote(&mut self, _registers: u64) {}
    /// Writes the registers back before the next entry.
    fn set_registers(&mut self, regs: &A::Registers) -> Result<(), VcpuError>;
    /// Blocks interrupts for the next instruction the vCPU runs, as `sti` does (the interrupt
    /// shadow), for an emulated `sti`; asked only where [`crate::arch::HostEmulation`] says an
    /// instruction opens one (x86_64).
    fn block_interrupts_once(&mut self) -> Result<(), VcpuError>;
}

/// What a debug exit reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugEvent {
    /// A software breakpoint (#BP, BRK); `pc` is the breakpoint instruction itself.
    Breakpoint {
        /// Address of the breakpoint.
        pc: u64,
    },
    /// A hardware execute breakpoint fired before the instruction at `pc` ran.
    HardwareBreakpoint {
        /// Address of the instruction.
        pc: u64,
    },
    /// Data watchpoints fired and the accessing instruction has run: `pc` is where the vCPU
    /// is now, after it (x86_64 reports data breakpoints as traps; arm64 before the access,
    /// and the VMM steps over it first).
    Watchpoint {
        /// Where the vCPU is: after the access.
        pc: u64,
        /// The watchpoint slots that fired (bit n: slot n).
        slots: u32,
        /// The accessing instruction, where the architecture reports it (arm64).
        writer: Option<u64>,
    },
    /// A debug exception that is not a hardware breakpoint of the engine (a single step);
    /// `pc` is where the vCPU is now.
    SingleStep {
        /// The new instruction pointer.
        pc: u64,
    },
}

impl DebugEvent {
    /// Where the vCPU is: the breakpoint, the instruction, or where the step left it.
    pub fn pc(&self) -> u64 {
        match *self {
            DebugEvent::Breakpoint { pc }
            | DebugEvent::HardwareBreakpoint { pc }
            | DebugEvent::Watchpoint { pc, .. }
            | DebugEvent::SingleStep { pc } => pc,
        }
    }
}

/// What the hypervisor should do after the engine handled a debug exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Resume the vCPU (registers and debug state already set).
    Resume,
    /// The trap is not ours: deliver the breakpoint exception to the guest as if no debugger
    /// were attached.
    Reinject,
    /// The debug exception (#DB, a step) is the guest's own: deliver it to the guest.
    ReinjectDebug,
}

/// What one hardware debug slot of every vCPU must hold: an execute breakpoint at `va`, or a
/// data watchpoint on `va` when `watch` says what it watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HardwareSlot {
    /// The address.
    pub va: u64,
    /// For a watchpoint: its length and accesses.
    pub watch: Option<crate::definition::WatchSpec>,
}
