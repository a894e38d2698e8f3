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
use probe_core::definition::WatchAccess;
use probe_core::vm::{DebugEvent, HardwareSlot};

use probe_core::engine::SlotRewind;

use super::vcpu::{
    ELR_EL1, FAR_EL1, MDSCR_EL1, PSTATE_REG, PSTATE_SS, SPSR_EL1, VBAR_EL1, get,
    inject_sync_exception, inject_sync_exception_with, read_pc, set,
};
use crate::arch::{ExitRoute, GuestDebug, GuestDebugContext, HandBack};
use crate::probing::ProbingError;

/// DBGBCR<n>/DBGBVR<n>: at most 16 on arm64.
pub const HW_BREAKPOINTS: usize = Aarch64::MAX_HW_BREAKPOINTS;
/// DBGWCR<n>/DBGWVR<n>: at most 16 on arm64.
pub const HW_WATCHPOINTS: usize = 16;

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
/// DBGBCR: enabled, for EL1 only (PMC = 0b01).
const BCR_EXECUTE_EL1: u64 = 1 | (0b01 << 1) | (0xf << 5);
/// MDSCR_EL1.SS: software step enabled.
const MDSCR_SS: u64 = 1;
/// The vector of a synchronous exception taken from the current EL on SP_ELx (the kernel's
/// own faults: Linux runs EL1 on SP_EL1), from VBAR_EL1.
const VECTOR_SYNC_CURRENT_SPX: u64 = 0x200;

/// What one vCPU's guest debugging should look like.
///
/// Besides hvprobe's own traps it carries the guest's software step through: while KVM debugs
/// a guest it masks the guest's MDSCR_EL1.SS (arch/arm64/kvm/debug.c: "we suppress the guest's
/// ability to do so"), so a guest uprobe, which steps its out-of-line copy at EL0, would run
/// on into whatever follows the copy. After a BRK, watchpoint or breakpoint from EL0 is handed
/// back (a uprobe, a perf watchpoint, a debugger), a hardware breakpoint at EL1 on the
/// kernel's `ret_to_user` (the "return watch") catches the way back to EL0; from there KVM
/// single-steps the vCPU through the exit path. Stepping the `eret` stops at the EL0 target
/// before its first instruction; if the guest asked for a step there (its MDSCR_EL1.SS), one
/// more step runs that instruction, and the step exception KVM reports after it is the one the
/// CPU would have given the guest, and goes to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestDebugSetup {
    /// Trap `BRK` to the VMM.
    pub software_breakpoints: bool,
    /// Hardware execute breakpoints.
    pub hardware: [Option<u64>; HW_BREAKPOINTS],
    /// Single-step.
    pub single_step: bool,
    /// The return watch: its slot in `hardware` and its address (`ret_to_user`).
    pub return_watch: Option<(usize, u64)>,
    /// Single-stepping on the guest's behalf, from the return watch to EL0.
    pub guest_step: GuestStep,
    /// The slot-exception watch: its slot in `hardware` and its address (VBAR_EL1 + 0x200,
    /// the kernel's synchronous vector). Armed only while a trapped step is under way on the
    /// vCPU, so that a fault of the copy (every step runs with D, A, I and F masked: only a
    /// synchronous exception can come) is seen before the guest's handler and rewound to the
    /// probed instruction, as Linux's `kprobe_fault_handler` does. Taken out when the step
    /// ends, and when it fires (a breakpoint under the PC would fire again at once): while it
    /// is in, KVM loads hvprobe's debug registers instead of the guest's.
    pub exception_watch: Option<(usize, u64)>,
    /// hvprobe's data watchpoints, by DBGWVR/DBGWCR slot.
    pub watches: [Option<HardwareSlot>; HW_WATCHPOINTS],
    /// A step over an access that hit watchpoints (arm64 reports them before the access): the
    /// slots are out for the step, and the guest's exception mask is kept here meanwhile.
    pub watch_step: Option<WatchStep>,
}

/// A step over the access that fired hvprobe's watchpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchStep {
    /// The accessing instruction.
    pub writer: u64,
    /// The watchpoint slots that fired (bit n: slot n).
    pub slots: u32,
    /// The guest's PSTATE.{D,A,I,F} before the step masked them.
    pub daif: u64,
}

/// DBGWCR for a watchpoint: enabled, EL1 (PAC 0b01), the accesses (LSC: 0b10 stores, 0b11
/// loads and stores) and the bytes of the doubleword (BAS), as Linux's hw_breakpoint.c builds
/// it (`encode_ctrl_reg`); DBGWVR holds the doubleword's address.
fn watch_control(slot: HardwareSlot) -> (u64, u64) {
    let Some(spec) = slot.watch else {
        return (0, 0);
    };
    let lsc = match spec.access {
        WatchAccess::Write => 0b10,
        WatchAccess::ReadWrite => 0b11,
    };
    let bas = ((1u64 << spec.len) - 1) << (slot.va & 7);
    (1 | 0b01 << 1 | lsc << 3 | (bas & 0xff) << 5, slot.va & !7)
}

/// Of the watchpoints in `watches`, the one whose doubleword is nearest `far` (the address
/// the exception reports, which for an access that covers watched and unwatched bytes need
/// not be a watched one: Linux's `get_distance_from_watchpoint`), as a slot mask.
fn fired_watch(watches: &[Option<HardwareSlot>], far: u64) -> u32 {
    watches
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.map(|w| (i, w.va & !7)))
        .min_by_key(|&(_, dw)| {
            if far < dw {
                dw - far
            } else {
                far.saturating_sub(dw + 7)
            }
        })
        .map_or(0, |(i, _)| 1 << i)
}

/// Where a single step made on the guest's behalf stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GuestStep {
    /// None.
    #[default]
    Idle,
    /// From the return watch through the kernel's exit path to EL0.
    ToUser,
    /// The EL0 instruction the guest asked to step, with IRQs and FIQs masked for it (as x86's
    /// `KVM_GUESTDBG_BLOCKIRQ` does: in the emulated runner a trip through the kernel's exit
    /// path outlasts a tick, so an interrupt would always come first and the step never);
    /// `daif` is what the guest had.
    UserInstruction {
        /// The guest's PSTATE.{D,A,I,F} before the mask.
        daif: u64,
    },
}

/// PSTATE.{I,F}.
const PSTATE_IF: u64 = 0xc0;
/// PSTATE.{D,A,I,F}.
const PSTATE_DAIF: u64 = 0x3c0;

impl GuestDebugSetup {
    /// Arms the return watch in the last hardware slot, if it is free.
    fn arm_return_watch(&mut self, ctx: &GuestDebugContext) {
        let (Some(at), Some(slot)) = (ctx.user_return, ctx.hw_count.checked_sub(1)) else {
            return;
        };
        if self.return_watch.is_none() && self.hardware[slot].is_none() {
            self.hardware[slot] = Some(at);
            self.return_watch = Some((slot, at));
        }
    }

    fn stop_guest_step(&mut self) {
        self.single_step = false;
        self.guest_step = GuestStep::Idle;
    }

    fn disarm_return_watch(&mut self) {
        if let Some((slot, _)) = self.return_watch.take() {
            self.hardware[slot] = None;
        }
    }

    /// Emulates the guest's taking of the debug exception KVM reported (guest debugging
    /// routes them all to KVM); returns whether it came from EL0.
    fn enter_exception(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
    ) -> Result<bool, ProbingError> {
        inject_sync_exception(fd, exit.hsr).map_err(|source| ProbingError::Kvm {
            what: "handing a debug exception back to the guest (KVM_SET_ONE_REG)",
            source,
        })
    }
}

impl GuestDebug for GuestDebugSetup {
    const SLOT_EXCEPTION_WATCH: bool = true;

    /// Loads the engine's hardware breakpoint addresses; the return watch keeps its slot unless
    /// the engine now uses it.
    fn set_hardware(&mut self, addresses: &[Option<u64>]) {
        self.hardware = [None; HW_BREAKPOINTS];
        for (slot, a) in self.hardware.iter_mut().zip(addresses) {
            *slot = *a;
        }
        for watch in [&mut self.return_watch, &mut self.exception_watch] {
            if let Some((slot, at)) = *watch {
                if self.hardware[slot].is_none() {
                    self.hardware[slot] = Some(at);
                } else {
                    *watch = None;
                }
            }
        }
    }

    /// Arms the slot-exception watch on this vCPU's kernel vector while a trapped step is
    /// under way (`stepping`) and the watch has a slot; takes it out otherwise. Reads
    /// VBAR_EL1: the vCPU is at EL1, where it holds the kernel's vectors (under KPTI too; the
    /// Spectre-BHB vectors are per CPU).
    fn watch_slot_exceptions(
        &mut self,
        fd: &VcpuFd,
        stepping: bool,
        ctx: &GuestDebugContext,
    ) -> Result<(), ProbingError> {
        if !stepping {
            if let Some((slot, _)) = self.exception_watch.take() {
                self.hardware[slot] = None;
            }
            return Ok(());
        }
        let Some(slot) = ctx.exception_watch_slot else {
            return Ok(());
        };
        if self.exception_watch.is_some() || self.hardware[slot].is_some() {
            return Ok(());
        }
        let vbar = get(fd, VBAR_EL1).map_err(|source| ProbingError::Kvm {
            what: "KVM_GET_ONE_REG (VBAR_EL1)",
            source,
        })?;
        let at = vbar + VECTOR_SYNC_CURRENT_SPX;
        self.hardware[slot] = Some(at);
        self.exception_watch = Some((slot, at));
        Ok(())
    }

    /// Makes the exception the guest is entering the probed instruction's: its return address
    /// (ELR_EL1) the instruction, its saved interrupt mask (SPSR_EL1.DAIF) the one the step
    /// put aside.
    fn rewind_exception(&mut self, fd: &VcpuFd, rewind: SlotRewind) -> Result<(), ProbingError> {
        let kvm = |what| move |source| ProbingError::Kvm { what, source };
        let spsr = get(fd, SPSR_EL1).map_err(kvm("KVM_GET_ONE_REG (SPSR_EL1)"))?;
        set(fd, ELR_EL1, rewind.resume_at).map_err(kvm("KVM_SET_ONE_REG (ELR_EL1)"))?;
        set(
            fd,
            SPSR_EL1,
            (spsr & !PSTATE_DAIF) | (rewind.interrupts & PSTATE_DAIF),
        )
        .map_err(kvm("KVM_SET_ONE_REG (SPSR_EL1)"))
    }

    /// Takes the debug exits that are the guest's own, before the engine sees any: its
    /// watchpoints and AArch32 BKPTs (hvprobe sets neither), its hardware breakpoints (when
    /// hvprobe's debug registers were not loaded), and the return watch and the steps made on
    /// its behalf; and the slot-exception watch, whose exit goes on with the exception's return
    /// address.
    fn take_guest_exit(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
        ctx: &GuestDebugContext,
    ) -> Result<ExitRoute, ProbingError> {
        let kvm = |what| move |source| ProbingError::Kvm { what, source };
        match exception_class(exit) {
            // hvprobe's (while they are loaded, KVM loads no watchpoint of the guest's): step
            // over the access with the fired slot out and interrupts masked, then report.
            EC_WATCHPOINT_LOWER | EC_WATCHPOINT_CURRENT
                if self.watch_step.is_none() && self.watches.iter().any(Option::is_some) =>
            {
                let slots = fired_watch(&self.watches, exit.far);
                let writer = read_pc(fd).map_err(kvm("KVM_GET_ONE_REG (PC)"))?;
                let pstate = get(fd, PSTATE_REG).map_err(kvm("KVM_GET_ONE_REG (PSTATE)"))?;
                set(fd, PSTATE_REG, pstate | PSTATE_DAIF)
                    .map_err(kvm("KVM_SET_ONE_REG (PSTATE)"))?;
                self.watch_step = Some(WatchStep {
                    writer,
                    slots,
                    daif: pstate & PSTATE_DAIF,
                });
                self.single_step = true;
                Ok(ExitRoute::WatchStep)
            }
            EC_SOFTWARE_STEP_LOWER | EC_SOFTWARE_STEP_CURRENT if self.watch_step.is_some() => {
                let step = self.watch_step.take().expect("guarded");
                if self.guest_step == GuestStep::Idle {
                    self.single_step = false;
                }
                let pc = read_pc(fd).map_err(kvm("KVM_GET_ONE_REG (PC)"))?;
                let pstate = get(fd, PSTATE_REG).map_err(kvm("KVM_GET_ONE_REG (PSTATE)"))?;
                set(fd, PSTATE_REG, (pstate & !PSTATE_DAIF) | step.daif)
                    .map_err(kvm("KVM_SET_ONE_REG (PSTATE)"))?;
                if pc == step.writer.wrapping_add(4) {
                    return Ok(ExitRoute::Watchpoint {
                        writer: step.writer,
                        slots: step.slots,
                    });
                }
                // The access took an exception instead (with the mask on: its saved PSTATE
                // gets the guest's back); it runs again after the handler, and fires again.
                let spsr = get(fd, SPSR_EL1).map_err(kvm("KVM_GET_ONE_REG (SPSR_EL1)"))?;
                set(fd, SPSR_EL1, (spsr & !PSTATE_DAIF) | step.daif)
                    .map_err(kvm("KVM_SET_ONE_REG (SPSR_EL1)"))?;
                Ok(ExitRoute::Taken)
            }
            EC_WATCHPOINT_LOWER | EC_WATCHPOINT_CURRENT => {
                // A watchpoint fires before the store: from EL0 the guest steps over it on its
                // way back.
                set(fd, FAR_EL1, exit.far).map_err(kvm("handing a watchpoint back (FAR_EL1)"))?;
                if self.enter_exception(fd, exit)? {
                    self.arm_return_watch(ctx);
                }
                Ok(ExitRoute::Taken)
            }
            EC_BKPT32 => {
                self.enter_exception(fd, exit)?;
                Ok(ExitRoute::Taken)
            }
            EC_SOFTWARE_STEP_LOWER | EC_SOFTWARE_STEP_CURRENT
                if self.guest_step != GuestStep::Idle =>
            {
                let pstate = get(fd, PSTATE_REG).map_err(kvm("KVM_GET_ONE_REG"))?;
                let at_el0 = pstate & 0xf == 0;
                match self.guest_step {
                    // Still in the kernel on the way out: one more step.
                    GuestStep::ToUser if !at_el0 => {}
                    // At EL0, before its first instruction (stepping the `eret` leaves the
                    // step pending there). The guest asked for a step: run that instruction.
                    GuestStep::ToUser => {
                        let mdscr =
                            get(fd, MDSCR_EL1).map_err(kvm("KVM_GET_ONE_REG (MDSCR_EL1)"))?;
                        if mdscr & MDSCR_SS != 0 {
                            set(fd, PSTATE_REG, pstate | PSTATE_IF)
                                .map_err(kvm("KVM_SET_ONE_REG (PSTATE)"))?;
                            self.guest_step = GuestStep::UserInstruction {
                                daif: pstate & PSTATE_DAIF,
                            };
                        } else {
                            self.stop_guest_step();
                        }
                    }
                    // The guest's instruction ran: its step exception, as the CPU would have
                    // raised it, and the watch again for its next step.
                    GuestStep::UserInstruction { daif } if at_el0 => {
                        self.stop_guest_step();
                        set(fd, PSTATE_REG, (pstate & !PSTATE_DAIF) | daif)
                            .map_err(kvm("KVM_SET_ONE_REG (PSTATE)"))?;
                        inject_sync_exception_with(fd, exit.hsr, PSTATE_SS)
                            .map_err(kvm("handing a software step to the guest"))?;
                        self.arm_return_watch(ctx);
                    }
                    // It took an exception into the kernel instead, which returns to it (and
                    // its step) later: watch for that return.
                    // (Its saved PSTATE gets the guest's mask back.)
                    GuestStep::UserInstruction { daif } => {
                        self.stop_guest_step();
                        let spsr = get(fd, SPSR_EL1).map_err(kvm("KVM_GET_ONE_REG (SPSR_EL1)"))?;
                        set(fd, SPSR_EL1, (spsr & !PSTATE_DAIF) | daif)
                            .map_err(kvm("KVM_SET_ONE_REG (SPSR_EL1)"))?;
                        self.arm_return_watch(ctx);
                    }
                    GuestStep::Idle => unreachable!("guarded"),
                }
                Ok(ExitRoute::Taken)
            }
            EC_HW_BREAKPOINT_LOWER | EC_HW_BREAKPOINT_CURRENT => {
                let pc = read_pc(fd).map_err(kvm("KVM_GET_ONE_REG (PC)"))?;
                if let Some((slot, at)) = self.exception_watch
                    && at == pc
                {
                    self.exception_watch = None;
                    self.hardware[slot] = None;
                    let return_pc = get(fd, ELR_EL1).map_err(kvm("KVM_GET_ONE_REG (ELR_EL1)"))?;
                    return Ok(ExitRoute::ExceptionEntry { return_pc });
                }
                if let Some((_, at)) = self.return_watch
                    && at == pc
                {
                    self.disarm_return_watch();
                    self.single_step = true;
                    self.guest_step = GuestStep::ToUser;
                    return Ok(ExitRoute::Taken);
                }
                if !ctx.hardware_in_use {
                    // The guest's own breakpoint: from EL0 it steps over it on the way back.
                    if self.enter_exception(fd, exit)? {
                        self.arm_return_watch(ctx);
                    }
                    return Ok(ExitRoute::Taken);
                }
                Ok(ExitRoute::Engine)
            }
            _ => Ok(ExitRoute::Engine),
        }
    }

    fn set_watchpoints(&mut self, slots: &[Option<HardwareSlot>]) {
        crate::arch::seam::load_watchpoints(&mut self.watches, slots);
    }

    fn watch_slots(&self) -> u32 {
        crate::arch::seam::watch_mask(&self.watches)
    }

    /// Traps the guest's `BRK` to the VMM.
    fn trap_breakpoints(&mut self, on: bool) {
        self.software_breakpoints = on;
    }

    /// Hands a BRK that was not ours back to the guest now. arm64 KVM has no `INJECT_BP`: the
    /// exception entry is emulated through the vCPU's registers (ESR, ELR, SPSR, PSTATE, PC =
    /// VBAR_EL1 + the vector's offset), with the syndrome KVM reported.
    /// A BRK from EL0 (a uprobe, a debugger's breakpoint) arms the return watch: the guest
    /// may step on its way back.
    fn hand_back_breakpoint(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
        ctx: &GuestDebugContext,
    ) -> Result<HandBack, ProbingError> {
        let from_el0 = inject_sync_exception(fd, exit.hsr).map_err(|source| ProbingError::Kvm {
            what: "handing a BRK back to the guest (KVM_SET_ONE_REG)",
            source,
        })?;
        if from_el0 {
            self.arm_return_watch(ctx);
        }
        Ok(HandBack::Now)
    }

    /// Whether an injection is pending at the next entry (never: arm64 injects at once).
    fn loads_hardware(&self) -> bool {
        self.hardware.iter().any(Option::is_some) || self.watches.iter().any(Option::is_some)
    }

    fn injecting(&self) -> bool {
        false
    }

    /// The set-up as KVM keeps it after the ioctl.
    fn applied(&mut self) {}

    /// The `KVM_SET_GUEST_DEBUG` argument.
    fn to_kvm(&self) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug::default();
        let hw = self.loads_hardware();
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
                    let watch = |w: Option<(usize, u64)>| w.is_some_and(|(slot, _)| slot == i);
                    dbg.arch.dbg_bcr[i] = if watch(self.return_watch) || watch(self.exception_watch)
                    {
                        BCR_EXECUTE_EL1
                    } else {
                        BCR_EXECUTE_EL1_EL0
                    };
                    dbg.arch.dbg_bvr[i] = *a & !3;
                }
            }
            // A slot being stepped over stays out until the step is done.
            let stepping = self.watch_step.map_or(0, |s| s.slots);
            for (i, w) in self.watches.iter().enumerate() {
                if let Some(w) = w
                    && stepping & (1 << i) == 0
                {
                    (dbg.arch.dbg_wcr[i], dbg.arch.dbg_wvr[i]) = watch_control(*w);
                }
            }
        }
        dbg
    }

    /// Hands the guest's own debug exception (its step, its hardware breakpoint) back the way
    /// a BRK goes back.
    fn hand_back_debug(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
        _: &GuestDebugContext,
    ) -> Result<HandBack, ProbingError> {
        self.enter_exception(fd, exit)?;
        Ok(HandBack::Now)
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
    fn watchpoints_fill_wcr_wvr_pairs_and_the_nearest_one_is_the_one_that_fired() {
        let watch = |va, len, access| HardwareSlot {
            va,
            watch: Some(probe_core::definition::WatchSpec { len, access }),
        };
        let mp = watch(0xffff_8000_0984_14b0, 8, WatchAccess::Write);
        // An 8-byte EL1 store watch: E, PAC 01, LSC 10, BAS 0xff (Linux's encoding).
        assert_eq!(watch_control(mp), (0x1ff3, 0xffff_8000_0984_14b0));
        // Two bytes at offset 4 of their doubleword, loads and stores: BAS 0b0011_0000.
        let half = watch(0xffff_8000_0984_14c4, 2, WatchAccess::ReadWrite);
        assert_eq!(
            watch_control(half),
            (1 | 0b01 << 1 | 0b11 << 3 | 0x30 << 5, 0xffff_8000_0984_14c0)
        );
        let mut s = GuestDebugSetup::default();
        s.set_watchpoints(&[None, Some(mp), Some(half)]);
        assert_eq!(s.watch_slots(), 0b110);
        let k = s.to_kvm();
        assert_eq!(k.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW);
        assert_eq!((k.arch.dbg_wcr[1], k.arch.dbg_wvr[1]), watch_control(mp));
        assert_eq!(k.arch.dbg_wcr[0], 0);
        // A store pair that starts 8 bytes below the watched doubleword reports its own
        // start: the nearest watchpoint is the one.
        assert_eq!(fired_watch(&s.watches, 0xffff_8000_0984_14a8), 0b10);
        assert_eq!(fired_watch(&s.watches, 0xffff_8000_0984_14c6), 0b100);
        // While a step over the access is under way, the fired slot is out.
        s.watch_step = Some(WatchStep {
            writer: 0xffff_8000_0800_0000,
            slots: 0b10,
            daif: 0,
        });
        let k = s.to_kvm();
        assert_eq!(k.arch.dbg_wcr[1], 0);
        assert_ne!(k.arch.dbg_wcr[2], 0);
    }

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
    fn the_slot_exception_watch_is_an_el1_breakpoint_that_survives_reloads() {
        let mut s = GuestDebugSetup::default();
        let vector = 0xffff_8000_0801_0800 + VECTOR_SYNC_CURRENT_SPX;
        s.hardware[5] = Some(vector);
        s.exception_watch = Some((5, vector));
        // The engine's own breakpoints are reloaded (it has one fewer than the vCPU).
        s.set_hardware(&[Some(0xffff_8000_0800_0000), None, None, None, None]);
        let k = s.to_kvm();
        assert_eq!(k.arch.dbg_bcr[0], 0x1e7, "a probe: EL1 and EL0");
        assert_eq!(k.arch.dbg_bcr[5], 0x1e3, "the watch: EL1 only");
        assert_eq!(k.arch.dbg_bvr[5], vector);
        assert_eq!(s.exception_watch, Some((5, vector)));
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
