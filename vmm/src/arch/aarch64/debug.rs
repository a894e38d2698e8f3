//! arm64 guest-debug set-up: the `kvm_guest_debug` control word and the BCR/BVR pairs of
//! hardware breakpoints, and the decoding of `KVM_EXIT_DEBUG` by the exception class of its
//! syndrome (ESR_EL2): BRK, hardware breakpoint, software step.

use kvm_bindings::{
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW, KVM_GUESTDBG_USE_SW_BP,
    kvm_debug_exit_arch, kvm_guest_debug,
};
use kvm_ioctls::VcpuFd;
use probe_core::arch::Arch;
use probe_core::arch::aarch64::Aarch64;
use probe_core::vm::DebugEvent;

use super::vcpu::{FAR_EL1, inject_sync_exception, read_pc, set};
use crate::arch::GuestDebugContext;
use crate::probing::ProbingError;

/// DBGBCR<n>/DBGBVR<n>: at most 16 on arm64.
pub const HW_BREAKPOINTS: usize = Aarch64::MAX_HW_BREAKPOINTS;

/// Exception classes (ESR_ELx.EC) of debug exits.
const EC_HW_BREAKPOINT_LOWER: u32 = 0x30;
const EC_HW_BREAKPOINT_CURRENT: u32 = 0x31;
const EC_SOFTWARE_STEP_LOWER: u32 = 0x32;
const EC_SOFTWARE_STEP_CURRENT: u32 = 0x33;
const EC_WATCHPOINT_LOWER: u32 = 0x34;
const EC_WATCHPOINT_CURRENT: u32 = 0x35;
const EC_BKPT32: u32 = 0x38;
const EC_BRK64: u32 = 0x3c;

/// DBGBCR: enabled, for EL1 and EL0 (PMC = 0b11), all four bytes of an A64 instruction.
const BCR_EXECUTE_EL1_EL0: u64 = 1 | (0b11 << 1) | (0xf << 5);

/// What one vCPU's guest debugging should look like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestDebugSetup {
    /// Trap `BRK` to the VMM.
    pub software_breakpoints: bool,
    /// Hardware execute breakpoints.
    pub hardware: [Option<u64>; HW_BREAKPOINTS],
    /// Single-step.
    pub single_step: bool,
}

impl GuestDebugSetup {
    /// Loads the engine's hardware breakpoint addresses.
    pub fn set_hardware(&mut self, addresses: &[Option<u64>]) {
        self.hardware = [None; HW_BREAKPOINTS];
        for (slot, a) in self.hardware.iter_mut().zip(addresses) {
            *slot = *a;
        }
    }

    /// Traps the guest's `BRK` to the VMM.
    pub fn trap_breakpoints(&mut self, on: bool) {
        self.software_breakpoints = on;
    }

    /// Hands a BRK that was not ours back to the guest now. arm64 KVM has no `INJECT_BP`: the
    /// exception entry is emulated through the vCPU's registers (ESR, ELR, SPSR, PSTATE, PC =
    /// VBAR_EL1 + the vector's offset), with the syndrome KVM reported.
    pub fn reinject_breakpoint(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
    ) -> Result<(), ProbingError> {
        inject_sync_exception(fd, exit.hsr).map_err(|source| ProbingError::Kvm {
            what: "handing a BRK back to the guest (KVM_SET_ONE_REG)",
            source,
        })
    }

    /// Hands the guest's own debug exception (its step, its hardware breakpoint: guest
    /// debugging routes them all to KVM) back the same way.
    pub fn reinject_debug(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
    ) -> Result<(), ProbingError> {
        inject_sync_exception(fd, exit.hsr).map_err(|source| ProbingError::Kvm {
            what: "handing a debug exception back to the guest (KVM_SET_ONE_REG)",
            source,
        })
    }

    /// Takes the debug exits that are the guest's own, before the engine sees any: its
    /// watchpoints (with FAR_EL1) and AArch32 BKPTs, which hvprobe never sets, and its hardware
    /// breakpoints when hvprobe's debug registers were not loaded (KVM then loads the guest's),
    /// each handed back as the CPU would have delivered it. Returns whether the exit was taken
    /// here.
    pub fn take_guest_exit(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
        ctx: &GuestDebugContext,
    ) -> Result<bool, ProbingError> {
        match exception_class(exit) {
            EC_WATCHPOINT_LOWER | EC_WATCHPOINT_CURRENT => {
                set(fd, FAR_EL1, exit.far).map_err(|source| ProbingError::Kvm {
                    what: "handing a watchpoint back to the guest (FAR_EL1)",
                    source,
                })?;
                self.reinject_debug(fd, exit)?;
                Ok(true)
            }
            EC_BKPT32 => {
                self.reinject_debug(fd, exit)?;
                Ok(true)
            }
            EC_HW_BREAKPOINT_LOWER | EC_HW_BREAKPOINT_CURRENT if !ctx.hardware_in_use => {
                self.reinject_debug(fd, exit)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether an injection is pending at the next entry (never: arm64 injects at once).
    pub fn injecting(&self) -> bool {
        false
    }

    /// The set-up as KVM keeps it after the ioctl.
    pub fn applied(&mut self) {}

    /// The `KVM_SET_GUEST_DEBUG` argument.
    pub fn to_kvm(&self) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug::default();
        let hw = self.hardware.iter().any(Option::is_some);
        if !(self.software_breakpoints || self.single_step || hw) {
            return dbg;
        }
        dbg.control = KVM_GUESTDBG_ENABLE;
        if self.software_breakpoints {
            dbg.control |= KVM_GUESTDBG_USE_SW_BP;
        }
        if self.single_step {
            dbg.control |= KVM_GUESTDBG_SINGLESTEP;
        }
        if hw {
            dbg.control |= KVM_GUESTDBG_USE_HW;
            for (i, a) in self.hardware.iter().enumerate() {
                if let Some(a) = a {
                    dbg.arch.dbg_bcr[i] = BCR_EXECUTE_EL1_EL0;
                    dbg.arch.dbg_bvr[i] = *a & !3;
                }
            }
        }
        dbg
    }
}

fn exception_class(exit: &kvm_debug_exit_arch) -> u32 {
    exit.hsr >> 26
}

/// What a `KVM_EXIT_DEBUG` reported (its exception class and syndrome), for an error about an
/// exit hvprobe did not ask for.
pub fn describe_debug_exit(exit: &kvm_debug_exit_arch) -> String {
    format!(
        "exception class {:#x} (ESR {:#x})",
        exception_class(exit),
        exit.hsr
    )
}

/// What a `KVM_EXIT_DEBUG` reported, with the PC read from the vCPU, or `None` for an exception
/// class hvprobe never asks for (or a PC that cannot be read).
pub fn decode_debug_exit(fd: &VcpuFd, exit: &kvm_debug_exit_arch) -> Option<DebugEvent> {
    let pc = read_pc(fd).ok()?;
    match exception_class(exit) {
        EC_BRK64 => Some(DebugEvent::Breakpoint { pc }),
        EC_HW_BREAKPOINT_LOWER | EC_HW_BREAKPOINT_CURRENT => {
            Some(DebugEvent::HardwareBreakpoint { pc })
        }
        EC_SOFTWARE_STEP_LOWER | EC_SOFTWARE_STEP_CURRENT => Some(DebugEvent::SingleStep { pc }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_breakpoints_fill_bcr_bvr_pairs() {
        let mut s = GuestDebugSetup::default();
        assert_eq!(s.to_kvm().control, 0);
        s.set_hardware(&[None, Some(0xffff_8000_0801_0004)]);
        s.trap_breakpoints(true);
        let k = s.to_kvm();
        assert_eq!(
            k.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP | KVM_GUESTDBG_USE_HW
        );
        assert_eq!((k.arch.dbg_bcr[0], k.arch.dbg_bvr[0]), (0, 0));
        assert_eq!(k.arch.dbg_bcr[1], 0x1e7);
        assert_eq!(k.arch.dbg_bvr[1], 0xffff_8000_0801_0004);
    }

    #[test]
    fn exits_are_told_apart_by_exception_class() {
        let brk = kvm_debug_exit_arch {
            hsr: (EC_BRK64 << 26) | 0x14a5,
            ..Default::default()
        };
        assert_eq!(exception_class(&brk), 0x3c);
        assert!(describe_debug_exit(&brk).contains("0x3c"));
    }
}
