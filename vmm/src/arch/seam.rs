//! The VMM's architecture seam: what an architecture must give the rest of the VMM, as two
//! traits the compiler checks (Cloud Hypervisor's `hypervisor` crate and Firecracker's `arch/`
//! are the models). [`VmmArch`] is the architecture itself (its probe-core back end, the KVM
//! capabilities it needs, VM creation, the vCPU during a debug exit, the KASLR anchor);
//! [`GuestDebug`] is one vCPU's `KVM_SET_GUEST_DEBUG` set-up and what it does with the debug
//! exits that are not the engine's. A new architecture implements both and adds its arm to
//! `hvprobe_guest::GuestArch`; nothing else in the VMM names an architecture.

use std::io::Write;

use kvm_bindings::{kvm_debug_exit_arch, kvm_guest_debug};
use kvm_ioctls::{Kvm, VcpuFd};
use probe_core::arch::Arch;
use probe_core::engine::SlotRewind;
use probe_core::vm::{DebugEvent, HardwareSlot, VcpuAccess};

use super::KaslrAnchor;
use crate::probing::{PausedState, ProbingError};
use crate::selftest::TrapSupport;
use crate::vm::{BootInputs, Vm, VmConfig, VmError};

/// One guest architecture as the VMM drives it on a host of the same architecture.
pub trait VmmArch: 'static {
    /// The probe engine's back end for these guests.
    type Guest: Arch;
    /// One vCPU's guest-debug set-up.
    type Debug: GuestDebug;
    /// A vCPU as the engine reads and writes it while handling one debug exit.
    type Vcpu<'a>: VcpuAccess<Self::Guest>;

    /// Which architecture this is.
    const ARCH: hvprobe_guest::GuestArch;
    /// The KVM capabilities the VMM cannot do without, each with the name the host check
    /// reports.
    const REQUIRED_CAPS: &'static [(kvm_ioctls::Cap, &'static str)];
    /// Where the XOL area sits in guest physical memory.
    const XOL_GPA_BASE: u64;
    /// The register and symbol that give the running kernel's KASLR slide.
    const KASLR_ANCHOR: KaslrAnchor;
    /// The kernel symbol of the return path to user mode, where a guest's own software step
    /// is carried through while KVM debugs the guest (arm64: `ret_to_user`); `None` where the
    /// architecture needs none.
    const USER_RETURN_SYMBOL: Option<&'static str>;
    /// The kernel's own top-level page table (x86_64 `init_top_pgt`, `init_mm`'s), which
    /// lives as long as the kernel: the session reads the kernel through it for the whole run,
    /// as the page tables of the process it attached in are freed when that process ends or
    /// execs. `None` where every process reaches the kernel through its own root already
    /// (arm64's TTBR1 holds `swapper_pg_dir`).
    const KERNEL_ROOT_SYMBOL: Option<&'static str>;
    /// The software breakpoint's name in output (`int3`, `brk`).
    const BREAKPOINT_NAME: &'static str;
    /// Whether a vCPU that exits on a store to read-only memory is still at the storing
    /// instruction (arm64: KVM moves the PC on at the next entry) rather than past it (x86:
    /// KVM's emulator has already moved RIP).
    const STORE_EXIT_AT_WRITER: bool;

    /// Builds a bootable VM of `config` (its initrd read and its disk opened): memory,
    /// interrupt controller, devices and vCPUs.
    fn create_vm(
        kvm: Kvm,
        config: &VmConfig,
        inputs: BootInputs,
        console_out: Box<dyn Write + Send>,
    ) -> Result<Vm, VmError>;
    /// Runs the trap self-test's tiny guest on `kvm`.
    fn probe_traps(kvm: &Kvm) -> Result<TrapSupport, String>;
    /// How many hardware breakpoints a vCPU of this KVM has.
    fn hw_breakpoint_count(kvm: &Kvm) -> usize;
    /// How many data watchpoints a vCPU of this KVM has (x86: the same four debug registers
    /// as the breakpoints).
    fn hw_watchpoint_count(kvm: &Kvm) -> usize;
    /// vCPU `id` out of `KVM_RUN` at `pc` (read when its exit was decoded), for the engine;
    /// `sync_regs` if KVM syncs registers through `kvm_run` and they were turned on.
    fn exit_vcpu(id: u32, fd: &mut VcpuFd, sync_regs: bool, pc: u64) -> Self::Vcpu<'_>;
    /// The register ioctls (reads, writes) `vcpu` made, for figures.
    fn register_ioctls(vcpu: &Self::Vcpu<'_>) -> (u64, u64);
    /// Turns on register syncing through `kvm_run` where KVM has it.
    fn enable_register_sync(fd: &mut VcpuFd);
    /// Hands registers left in the sync area to KVM before a call that reads KVM's own copy.
    fn flush_register_sync(fd: &mut VcpuFd) -> Result<(), ProbingError>;
    /// Reads what planting needs from a vCPU out of `KVM_RUN`.
    fn paused_state(fd: &mut VcpuFd) -> Result<PausedState, ProbingError>;
    /// The PC of a vCPU out of `KVM_RUN`.
    fn read_pc(fd: &VcpuFd) -> Result<u64, kvm_ioctls::Error>;
    /// What a `KVM_EXIT_DEBUG` reported, or `None` for an exit hvprobe never asks for;
    /// `watch_slots` are the hardware slots loaded with data watchpoints (bit n: slot n).
    fn decode_debug_exit(
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
        watch_slots: u32,
    ) -> Option<DebugEvent>;
    /// Handles an exit only this architecture has (`reason`; arm64: `KVM_EXIT_ARM_NISV`, a
    /// store to a protected page that KVM could not decode) on vCPU `id`, for a run probing
    /// with `engine`: the register ioctls (reads, writes) it made, or `None` for an exit that
    /// is not one.
    fn arch_exit(
        id: u32,
        fd: &mut VcpuFd,
        reason: u32,
        engine: &crate::probing::Engine,
    ) -> Result<Option<(u64, u64)>, ProbingError>;
    /// What a `KVM_EXIT_DEBUG` reported, for an error about an exit hvprobe did not ask for.
    fn describe_debug_exit(exit: &kvm_debug_exit_arch) -> String;
}

/// Loads the watchpoints of `slots` into `watches`, by slot (a slot holding an execute
/// breakpoint, or nothing, is `None` there): what both architectures' `set_watchpoints` do.
pub fn load_watchpoints(watches: &mut [Option<HardwareSlot>], slots: &[Option<HardwareSlot>]) {
    watches.fill(None);
    for (slot, w) in watches.iter_mut().zip(slots) {
        *slot = w.filter(|w| w.watch.is_some());
    }
}

/// The slots of `watches` that hold a watchpoint (bit n: slot n).
pub fn watch_mask(watches: &[Option<HardwareSlot>]) -> u32 {
    watches
        .iter()
        .enumerate()
        .filter(|(_, w)| w.is_some())
        .fold(0, |m, (i, _)| m | 1 << i)
}

/// When a trap handed back to the guest takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandBack {
    /// Already: the exception entry was made through the vCPU's registers (arm64).
    Now,
    /// At the next `KVM_SET_GUEST_DEBUG` before `KVM_RUN` (x86's `KVM_GUESTDBG_INJECT_*`).
    AtNextEntry,
}

/// One vCPU's guest debugging: the `kvm_guest_debug` argument, and the debug exits that are
/// the guest's own, handled before the engine sees any.
pub trait GuestDebug: Default + Copy + PartialEq + Send {
    /// Whether this architecture watches the kernel's exception vector for exceptions taken
    /// inside trapped slots (and rewinds them), with one hardware breakpoint kept for it.
    const SLOT_EXCEPTION_WATCH: bool;

    /// Loads the engine's hardware breakpoint addresses (the set-up's own watches keep their
    /// slots unless the engine now uses them).
    fn set_hardware(&mut self, addresses: &[Option<u64>]);
    /// Loads the engine's data watchpoints, by hardware slot (`None` for a slot that holds an
    /// execute breakpoint or nothing).
    fn set_watchpoints(&mut self, slots: &[Option<HardwareSlot>]);
    /// The hardware slots loaded with data watchpoints (bit n: slot n).
    fn watch_slots(&self) -> u32;
    /// Traps the guest's software breakpoint instruction to the VMM.
    fn trap_breakpoints(&mut self, on: bool);
    /// Takes the debug exits that are the guest's own (or steps made on its behalf) and
    /// says where any other goes.
    fn take_guest_exit(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
        ctx: &GuestDebugContext,
    ) -> Result<ExitRoute, ProbingError>;
    /// Hands a software breakpoint that was not hvprobe's back to the guest.
    fn hand_back_breakpoint(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
        ctx: &GuestDebugContext,
    ) -> Result<HandBack, ProbingError>;
    /// Hands the guest's own debug exception (its step, its hardware breakpoint) back.
    fn hand_back_debug(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
        ctx: &GuestDebugContext,
    ) -> Result<HandBack, ProbingError>;
    /// Arms the slot-exception watch while a trapped step is under way on the vCPU
    /// (`stepping`), takes it out otherwise; nothing where the architecture has no watch.
    fn watch_slot_exceptions(
        &mut self,
        fd: &VcpuFd,
        stepping: bool,
        ctx: &GuestDebugContext,
    ) -> Result<(), ProbingError>;
    /// Makes the exception the guest is entering the probed instruction's
    /// ([`ExitRoute::ExceptionEntry`] answered by the engine).
    fn rewind_exception(&mut self, fd: &VcpuFd, rewind: SlotRewind) -> Result<(), ProbingError>;
    /// Whether the set-up loads any hardware breakpoint of hvprobe's (then KVM loads these in
    /// place of the guest's own debug registers).
    fn loads_hardware(&self) -> bool;
    /// Whether a hand-back waits for the next `KVM_SET_GUEST_DEBUG` (it acts once, at the
    /// ioctl, so the set-up must be applied again even if it looks unchanged).
    fn injecting(&self) -> bool;
    /// The set-up as KVM keeps it after the ioctl (hand-backs done).
    fn applied(&mut self);
    /// The `KVM_SET_GUEST_DEBUG` argument.
    fn to_kvm(&self) -> kvm_guest_debug;
}

/// What the arch layer needs to tell the guest's own debug exits from hvprobe's.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestDebugContext {
    /// The running kernel's return path to user mode ([`VmmArch::USER_RETURN_SYMBOL`], KASLR
    /// applied).
    pub user_return: Option<u64>,
    /// Hardware breakpoints the engine has (the vCPU's, less the one kept for the
    /// slot-exception watch).
    pub hw_count: usize,
    /// Whether the set-up of the last entry loaded hvprobe's debug registers (then the guest's
    /// own breakpoints were not loaded, and a breakpoint exit is hvprobe's).
    pub hardware_in_use: bool,
    /// The hardware breakpoint kept for the slot-exception watch, when there is one (arm64:
    /// the vCPUs' last).
    pub exception_watch_slot: Option<usize>,
}

/// Where [`GuestDebug::take_guest_exit`] sends a debug exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitRoute {
    /// The guest's own (or a step made on its behalf): handled in the arch layer.
    Taken,
    /// hvprobe's: decoded for the engine.
    Engine,
    /// The slot-exception watch fired: the guest is entering its exception vector from the
    /// kernel, to return to `return_pc`; the engine says whether that is a trapped slot's copy
    /// ([`probe_core::engine::ProbeEngine::rewind_slot_exception`]).
    ExceptionEntry {
        /// The exception's return address (ELR_EL1).
        return_pc: u64,
    },
    /// hvprobe's watchpoint fired before the access (arm64): the vCPU steps over it, and the
    /// step's exit reports the hit.
    WatchStep,
    /// hvprobe's watchpoints in `slots` fired before the access of the instruction at
    /// `writer`, and the vCPU stepped over it (arm64): for the engine, as a watchpoint hit.
    Watchpoint {
        /// The accessing instruction.
        writer: u64,
        /// The watchpoint slots that fired.
        slots: u32,
    },
}
