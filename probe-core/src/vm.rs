//! The seam between the probe engine and the hypervisor: what the engine needs from one vCPU.
//! The KVM implementation lives in `vmm/`; tests use a fake over real `GuestMemoryMmap`
//! memory. Guest physical memory is reached directly through `vm_memory::GuestMemory`.

use crate::arch::x86_64::Registers;

/// Errors the VM side reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VmError(pub String);

/// One vCPU, as the engine drives it while handling one of its debug exits.
pub trait VcpuAccess {
    /// The vCPU index.
    fn id(&self) -> u32;
    /// Reads the registers (from the shared `kvm_run` page where KVM offers sync regs).
    fn registers(&mut self) -> Result<Registers, VmError>;
    /// Writes the registers back before the next entry.
    fn set_registers(&mut self, regs: &Registers) -> Result<(), VmError>;
    /// Blocks interrupts for the next instruction the vCPU runs, as `sti` does (the interrupt
    /// shadow), for an emulated `sti`.
    fn block_interrupts_once(&mut self) -> Result<(), VmError>;
}

/// What a debug exit reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugEvent {
    /// A software breakpoint (#BP); `pc` is the breakpoint instruction itself.
    Breakpoint {
        /// Address of the breakpoint.
        pc: u64,
    },
    /// A hardware execute breakpoint fired before the instruction at `pc` ran.
    HardwareBreakpoint {
        /// Address of the instruction.
        pc: u64,
    },
    /// A debug exception that is not a hardware breakpoint of the engine (a single step);
    /// `pc` is where the vCPU is now.
    SingleStep {
        /// The new instruction pointer.
        pc: u64,
    },
}

/// What the hypervisor should do after the engine handled a debug exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Resume the vCPU (registers and debug state already set).
    Resume,
    /// The trap is not ours: deliver #BP to the guest as if no debugger were attached.
    Reinject,
    /// The debug exception (#DB) is the guest's own: deliver it to the guest.
    ReinjectDebug,
}
