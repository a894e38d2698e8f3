//! The seam between the probe engine and the hypervisor: what the engine needs from one vCPU,
//! and guest physical memory as everything in probe-core reads it. The KVM implementation
//! lives in `vmm/`; tests use a fake vCPU over real `GuestMemoryMmap` memory.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::arch::Arch;

/// Guest physical memory as probe-core reads it: the page walker, handlers, the engine. Every
/// `vm_memory::GuestMemory` is one; tests give the walker small fakes.
pub trait GuestPhysMemory: Send + Sync {
    /// Fills `buf` from guest physical `gpa`; false if any byte is not memory.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool;

    /// The little-endian u64 at guest physical `gpa`, or `None` if it is not memory.
    fn read_phys_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b).then(|| u64::from_le_bytes(b))
    }
}

impl<M: GuestMemory + Send + Sync> GuestPhysMemory for M {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.read_slice(buf, GuestAddress(gpa)).is_ok()
    }
}

/// Errors the VM side reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VmError(pub String);

/// One vCPU of architecture `A`, as the engine drives it while handling one of its debug exits.
pub trait VcpuAccess<A: Arch> {
    /// The vCPU index.
    fn id(&self) -> u32;
    /// Reads the registers (from the shared `kvm_run` page where KVM offers sync regs).
    fn registers(&mut self) -> Result<A::Registers, VmError>;
    /// Reads the registers the engine needs to find a site and move the vCPU on (the PC, the
    /// flags, the stack pointers, the page-table roots), where reading the general-purpose ones
    /// too costs (arm64: one `KVM_GET_ONE_REG` each). Those read as zero until
    /// [`VcpuAccess::complete_registers`] and must not be changed before. By default all.
    fn control_registers(&mut self) -> Result<A::Registers, VmError> {
        self.registers()
    }
    /// Fills in the general-purpose registers of `regs`, which came from
    /// [`VcpuAccess::control_registers`]; nothing if they were read already.
    fn complete_registers(&mut self, _regs: &mut A::Registers) -> Result<(), VmError> {
        Ok(())
    }
    /// Writes the registers back before the next entry.
    fn set_registers(&mut self, regs: &A::Registers) -> Result<(), VmError>;
    /// Blocks interrupts for the next instruction the vCPU runs, as `sti` does (the interrupt
    /// shadow), for an emulated `sti`; asked only where [`crate::arch::HostEmulation`] says an
    /// instruction opens one (x86_64).
    fn block_interrupts_once(&mut self) -> Result<(), VmError>;
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
