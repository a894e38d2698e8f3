//! x86_64 guest-debug set-up: the `kvm_guest_debug` control word and debug registers for
//! software breakpoints, hardware execute breakpoints and single-stepping, the decoding of
//! `KVM_EXIT_DEBUG`, and conversion between KVM's register structs and probe-core's.

use kvm_ioctls::VcpuFd;
use probe_core::engine::SlotRewind;

use crate::arch::{ExitRoute, GuestDebug, GuestDebugContext, HandBack};
use crate::probing::ProbingError;
use kvm_bindings::{
    KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_INJECT_BP, KVM_GUESTDBG_INJECT_DB,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP, kvm_debug_exit_arch,
    kvm_guest_debug, kvm_regs, kvm_sregs,
};
use probe_core::arch::Arch;
use probe_core::arch::x86_64::{Gpr, Registers, X86_64};
use probe_core::definition::{WatchAccess, WatchSpec};
use probe_core::vm::{DebugEvent, HardwareSlot};

/// The debug registers DR0-DR3: x86's hardware breakpoints, always four.
pub const HW_BREAKPOINTS: usize = X86_64::MAX_HW_BREAKPOINTS;

/// How many hardware breakpoints a vCPU of this KVM has: x86 has no capability for it, the
/// four debug registers are always there.
pub fn hw_breakpoint_count(_kvm: &kvm_ioctls::Kvm) -> usize {
    HW_BREAKPOINTS
}

/// #DB vector.
const DB_VECTOR: u32 = 1;
/// #BP vector.
const BP_VECTOR: u32 = 3;
/// DR6.BS: the #DB came from single-stepping.
const DR6_BS: u64 = 1 << 14;

/// What one vCPU's guest debugging should look like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestDebugSetup {
    /// Trap `int3` (#BP) to the VMM.
    pub software_breakpoints: bool,
    /// Hardware execute breakpoints.
    pub hardware: [Option<u64>; HW_BREAKPOINTS],
    /// Data watchpoints, in the slots the execute breakpoints leave.
    pub watches: [Option<HardwareSlot>; HW_BREAKPOINTS],
    /// Single-step with interrupts blocked.
    pub single_step: bool,
    /// Deliver a #BP to the guest now (a trap that was not ours).
    pub inject_breakpoint: bool,
    /// Deliver a #DB to the guest now (its own single-step or debug-register trap).
    pub inject_debug: bool,
}

impl GuestDebugSetup {
    /// Whether anything is enabled at all.
    pub fn enabled(&self) -> bool {
        self.software_breakpoints
            || self.single_step
            || self.inject_breakpoint
            || self.inject_debug
            || self.loads_hardware()
    }
}

impl GuestDebug for GuestDebugSetup {
    /// No watch on x86_64: the guest's exception entry for a fault in a slot (the IDT's
    /// page-fault handler) is the one every user page fault goes through, and a debug
    /// register on it would cost an exit per page fault.
    const SLOT_EXCEPTION_WATCH: bool = false;

    fn set_hardware(&mut self, addresses: &[Option<u64>]) {
        self.hardware = [None; HW_BREAKPOINTS];
        for (slot, a) in self.hardware.iter_mut().zip(addresses) {
            *slot = *a;
        }
    }

    fn set_watchpoints(&mut self, slots: &[Option<HardwareSlot>]) {
        crate::arch::seam::load_watchpoints(&mut self.watches, slots);
    }

    fn watch_slots(&self) -> u32 {
        crate::arch::seam::watch_mask(&self.watches)
    }

    fn trap_breakpoints(&mut self, on: bool) {
        self.software_breakpoints = on;
    }

    /// None on x86_64: KVM intercepts #DB only while hvprobe single-steps or uses DR0-3
    /// (then every #DB is the engine's to sort out) and every #BP goes through the engine's
    /// check of the int3 under it.
    fn take_guest_exit(
        &mut self,
        _: &VcpuFd,
        _: &kvm_debug_exit_arch,
        _: &GuestDebugContext,
    ) -> Result<ExitRoute, ProbingError> {
        Ok(ExitRoute::Engine)
    }

    /// `KVM_GUESTDBG_INJECT_BP` at the next entry.
    fn hand_back_breakpoint(
        &mut self,
        _: &VcpuFd,
        _: &kvm_debug_exit_arch,
        _: &GuestDebugContext,
    ) -> Result<HandBack, ProbingError> {
        self.inject_breakpoint = true;
        Ok(HandBack::AtNextEntry)
    }

    /// `KVM_GUESTDBG_INJECT_DB` at the next entry.
    fn hand_back_debug(
        &mut self,
        _: &VcpuFd,
        _: &kvm_debug_exit_arch,
        _: &GuestDebugContext,
    ) -> Result<HandBack, ProbingError> {
        self.inject_debug = true;
        Ok(HandBack::AtNextEntry)
    }

    fn watch_slot_exceptions(
        &mut self,
        _: &VcpuFd,
        _: bool,
        _: &GuestDebugContext,
    ) -> Result<(), ProbingError> {
        Ok(())
    }

    /// Never asked: `take_guest_exit` routes no exit as an exception entry.
    fn rewind_exception(&mut self, _: &VcpuFd, _: SlotRewind) -> Result<(), ProbingError> {
        Ok(())
    }

    fn loads_hardware(&self) -> bool {
        self.hardware.iter().any(Option::is_some) || self.watches.iter().any(Option::is_some)
    }

    fn injecting(&self) -> bool {
        self.inject_breakpoint || self.inject_debug
    }

    fn applied(&mut self) {
        self.inject_breakpoint = false;
        self.inject_debug = false;
    }

    fn to_kvm(&self) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug::default();
        if !self.enabled() {
            return dbg;
        }
        dbg.control = KVM_GUESTDBG_ENABLE;
        if self.software_breakpoints {
            dbg.control |= KVM_GUESTDBG_USE_SW_BP;
        }
        if self.single_step {
            // Without BLOCKIRQ a pending interrupt is taken first and the "step" lands in the
            // interrupt handler.
            dbg.control |= KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ;
        }
        if self.inject_breakpoint {
            dbg.control |= KVM_GUESTDBG_INJECT_BP;
        }
        if self.inject_debug {
            dbg.control |= KVM_GUESTDBG_INJECT_DB;
        }
        let mut dr7 = 0u64;
        for (i, addr) in self.hardware.iter().enumerate() {
            if let Some(a) = addr {
                dbg.arch.debugreg[i] = *a;
                // Gi enables breakpoint i globally; R/Wi = 00 (execute) and LENi = 00.
                dr7 |= 1 << (2 * i + 1);
            }
        }
        for (i, slot) in self.watches.iter().enumerate() {
            if let Some(HardwareSlot {
                va,
                watch: Some(spec),
            }) = slot
            {
                dbg.arch.debugreg[i] = *va;
                dr7 |= 1 << (2 * i + 1) | watch_bits(*spec) << (16 + 4 * i);
            }
        }
        if dr7 != 0 {
            dbg.control |= KVM_GUESTDBG_USE_HW_BP;
            // GE, as QEMU's gdbstub and firecracker set it.
            dbg.arch.debugreg[7] = dr7 | (1 << 9);
        }
        dbg
    }
}

/// What a `KVM_EXIT_DEBUG` reported (its vector), for an error about an exit hvprobe did not
/// ask for.
pub fn describe_debug_exit(arch: &kvm_debug_exit_arch) -> String {
    format!("vector {}", arch.exception)
}

/// DR7's R/W and LEN fields (4 bits, R/W low) for a watchpoint: R/W 01 for writes, 11 for
/// reads and writes; LEN 00, 01, 11, 10 for 1, 2, 4, 8 bytes (SDM vol. 3, 18.2.4).
fn watch_bits(spec: WatchSpec) -> u64 {
    let rw = match spec.access {
        WatchAccess::Write => 0b01,
        WatchAccess::ReadWrite => 0b11,
    };
    let len = match spec.len {
        1 => 0b00,
        2 => 0b01,
        4 => 0b11,
        _ => 0b10,
    };
    rw | len << 2
}

/// What a `KVM_EXIT_DEBUG` reported, or `None` for a vector hvprobe never asks for. A #DB
/// whose DR6 names a slot of `watch_slots` is a data watchpoint (a trap: RIP is past the
/// access).
pub fn debug_event(arch: &kvm_debug_exit_arch, watch_slots: u32) -> Option<DebugEvent> {
    let fired = (arch.dr6 & 0xf) as u32;
    match arch.exception {
        BP_VECTOR => Some(DebugEvent::Breakpoint { pc: arch.pc }),
        DB_VECTOR if fired & watch_slots != 0 => Some(DebugEvent::Watchpoint {
            pc: arch.pc,
            slots: fired & watch_slots,
            writer: None,
        }),
        DB_VECTOR if arch.dr6 & 0xf != 0 && arch.dr6 & DR6_BS == 0 => {
            Some(DebugEvent::HardwareBreakpoint { pc: arch.pc })
        }
        DB_VECTOR => Some(DebugEvent::SingleStep { pc: arch.pc }),
        _ => None,
    }
}

/// probe-core registers from KVM's.
pub fn registers_from_kvm(r: &kvm_regs, s: &kvm_sregs) -> Registers {
    let mut out = Registers {
        rip: r.rip,
        rflags: r.rflags,
        cr3: s.cr3,
        cr4: s.cr4,
        gs_base: s.gs.base,
        ..Default::default()
    };
    for (g, v) in [
        (Gpr::Rax, r.rax),
        (Gpr::Rcx, r.rcx),
        (Gpr::Rdx, r.rdx),
        (Gpr::Rbx, r.rbx),
        (Gpr::Rsp, r.rsp),
        (Gpr::Rbp, r.rbp),
        (Gpr::Rsi, r.rsi),
        (Gpr::Rdi, r.rdi),
        (Gpr::R8, r.r8),
        (Gpr::R9, r.r9),
        (Gpr::R10, r.r10),
        (Gpr::R11, r.r11),
        (Gpr::R12, r.r12),
        (Gpr::R13, r.r13),
        (Gpr::R14, r.r14),
        (Gpr::R15, r.r15),
    ] {
        out.set(g, v);
    }
    out
}

/// KVM's general-purpose registers from probe-core's.
pub fn registers_to_kvm(r: &Registers) -> kvm_regs {
    kvm_regs {
        rax: r.get(Gpr::Rax),
        rbx: r.get(Gpr::Rbx),
        rcx: r.get(Gpr::Rcx),
        rdx: r.get(Gpr::Rdx),
        rsi: r.get(Gpr::Rsi),
        rdi: r.get(Gpr::Rdi),
        rsp: r.get(Gpr::Rsp),
        rbp: r.get(Gpr::Rbp),
        r8: r.get(Gpr::R8),
        r9: r.get(Gpr::R9),
        r10: r.get(Gpr::R10),
        r11: r.get(Gpr::R11),
        r12: r.get(Gpr::R12),
        r13: r.get(Gpr::R13),
        r14: r.get(Gpr::R14),
        r15: r.get(Gpr::R15),
        rip: r.rip,
        rflags: r.rflags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchpoints_set_dr7_access_and_length_and_their_traps_are_told_apart() {
        let mut s = GuestDebugSetup::default();
        s.set_hardware(&[Some(0xffff_ffff_8100_0000)]);
        let watch = |va, len, access| {
            Some(HardwareSlot {
                va,
                watch: Some(WatchSpec { len, access }),
            })
        };
        s.set_watchpoints(&[
            None,
            watch(0xffff_ffff_82a5_a640, 8, WatchAccess::Write),
            watch(0xffff_ffff_82b7_f1e0, 4, WatchAccess::ReadWrite),
            // An execute breakpoint's slot is not a watchpoint.
            Some(HardwareSlot {
                va: 0x1000,
                watch: None,
            }),
        ]);
        assert_eq!(s.watch_slots(), 0b110);
        let k = s.to_kvm();
        assert_eq!(k.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(k.arch.debugreg[1], 0xffff_ffff_82a5_a640);
        assert_eq!(k.arch.debugreg[2], 0xffff_ffff_82b7_f1e0);
        // G0-G2; slot 0 executes (R/W0 LEN0 00); slot 1: R/W 01, LEN 10 (8 bytes); slot 2:
        // R/W 11, LEN 11 (4 bytes); GE.
        let dr7 = k.arch.debugreg[7];
        assert_eq!(dr7 & 0xff, 0b10_1010);
        assert_eq!((dr7 >> 16) & 0xf, 0);
        assert_eq!((dr7 >> 20) & 0xf, 0b1001);
        assert_eq!((dr7 >> 24) & 0xf, 0b1111);
        assert_ne!(dr7 & 1 << 9, 0);
        // DR6 B1 with slot 1 a watchpoint: a watchpoint exit; B0 alone: an execute breakpoint.
        let db = |dr6| kvm_debug_exit_arch {
            exception: DB_VECTOR,
            dr6,
            pc: 0xffff_ffff_8100_0010,
            ..Default::default()
        };
        assert_eq!(
            debug_event(&db(0xffff_0ff2), s.watch_slots()),
            Some(DebugEvent::Watchpoint {
                pc: 0xffff_ffff_8100_0010,
                slots: 0b10,
                writer: None
            })
        );
        assert_eq!(
            debug_event(&db(0xffff_0ff1), s.watch_slots()),
            Some(DebugEvent::HardwareBreakpoint {
                pc: 0xffff_ffff_8100_0010
            })
        );
    }

    #[test]
    fn control_word_and_debug_registers() {
        assert_eq!(GuestDebugSetup::default().to_kvm().control, 0);
        let sw = GuestDebugSetup {
            software_breakpoints: true,
            ..Default::default()
        };
        assert_eq!(
            sw.to_kvm().control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP
        );
        let step = GuestDebugSetup {
            single_step: true,
            inject_breakpoint: true,
            ..sw
        };
        let c = step.to_kvm().control;
        assert_ne!(c & KVM_GUESTDBG_BLOCKIRQ, 0);
        assert_ne!(c & KVM_GUESTDBG_SINGLESTEP, 0);
        assert_ne!(c & KVM_GUESTDBG_INJECT_BP, 0);
        let hw = GuestDebugSetup {
            hardware: [None, Some(0xffff_ffff_8100_0000), None, Some(0x1000)],
            ..Default::default()
        };
        let k = hw.to_kvm();
        assert_eq!(k.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(k.arch.debugreg[1], 0xffff_ffff_8100_0000);
        assert_eq!(k.arch.debugreg[7], (1 << 3) | (1 << 7) | (1 << 9));
    }

    #[test]
    fn debug_exits_are_told_apart() {
        let exit = |exception, dr6| kvm_debug_exit_arch {
            exception,
            pad: 0,
            pc: 0x10,
            dr6,
            dr7: 0,
        };
        assert_eq!(
            debug_event(&exit(3, 0), 0),
            Some(DebugEvent::Breakpoint { pc: 0x10 })
        );
        assert_eq!(
            debug_event(&exit(1, 0xffff_4ff0), 0),
            Some(DebugEvent::SingleStep { pc: 0x10 })
        );
        assert_eq!(
            debug_event(&exit(1, 0xffff_0ff2), 0),
            Some(DebugEvent::HardwareBreakpoint { pc: 0x10 })
        );
        assert_eq!(debug_event(&exit(14, 0), 0), None);
    }

    #[test]
    fn registers_round_trip() {
        let mut r = Registers::default();
        for (i, g) in Gpr::ALL.iter().enumerate() {
            r.set(*g, i as u64 * 0x101);
        }
        r.rip = 0xffff_ffff_8100_0000;
        r.rflags = 0x246;
        let back = registers_from_kvm(&registers_to_kvm(&r), &kvm_sregs::default());
        assert_eq!(back, r);
    }
}
