//! aarch64 specifics of the VMM, its [`VmmArch`] implementation ([`Aarch64Vmm`]): the
//! vCPU's registers through `KVM_GET/SET_ONE_REG` with a dirty-tracked cache, the
//! `kvm_guest_debug` layout (BCR/BVR pairs), decoding `KVM_EXIT_DEBUG` by exception class, the
//! KASLR anchor (VBAR_EL1), the Image, and the machine (`machine.rs`: GICv3, PSCI, timer,
//! UART, device tree).

pub mod debug;
pub mod fdt;
pub mod kernel;
pub mod layout;
pub mod machine;
pub mod selftest;
pub mod store;
pub mod vcpu;

use std::io::Write;

use kvm_bindings::kvm_debug_exit_arch;
use kvm_ioctls::{Kvm, VcpuFd};
use probe_core::vm::DebugEvent;

use crate::arch::{KaslrAnchor, VmmArch};
use crate::probing::{PausedState, ProbingError};
use crate::selftest::TrapSupport;
use crate::vm::{BootInputs, Vm, VmConfig, VmError};

/// The probe engine's architecture for arm64 guests.
pub type Guest = probe_core::arch::aarch64::Aarch64;

/// The KVM capabilities the arm64 VMM needs, each with the name the host check reports.
pub const REQUIRED_CAPS: &[(kvm_ioctls::Cap, &str)] = &[
    (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
    (kvm_ioctls::Cap::OneReg, "KVM_CAP_ONE_REG"),
    (kvm_ioctls::Cap::ArmPsci02, "KVM_CAP_ARM_PSCI_0_2"),
    (kvm_ioctls::Cap::DeviceCtrl, "KVM_CAP_DEVICE_CTRL"),
    (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (
        kvm_ioctls::Cap::SetGuestDebug,
        "KVM_CAP_SET_GUEST_DEBUG (guest debugging)",
    ),
];

/// The arm64 VMM: KVM's arm64 API (`KVM_GET/SET_ONE_REG`, BCR/BVR pairs, exception entry
/// emulated for hand-backs).
pub struct Aarch64Vmm;

impl VmmArch for Aarch64Vmm {
    type Guest = Guest;
    type Debug = debug::GuestDebugSetup;
    type Vcpu<'a> = vcpu::KvmVcpu<'a>;

    const ARCH: hvprobe_guest::GuestArch = hvprobe_guest::GuestArch::Aarch64;
    const REQUIRED_CAPS: &'static [(kvm_ioctls::Cap, &'static str)] = REQUIRED_CAPS;
    const XOL_GPA_BASE: u64 = layout::XOL_GPA_BASE;
    const KASLR_ANCHOR: KaslrAnchor = vcpu::KASLR_ANCHOR;
    const USER_RETURN_SYMBOL: Option<&'static str> = Some("ret_to_user");
    const KERNEL_ROOT_SYMBOL: Option<&'static str> = None;
    const BREAKPOINT_NAME: &'static str = "brk";
    const STORE_EXIT_AT_WRITER: bool = true;

    fn create_vm(
        kvm: Kvm,
        config: &VmConfig,
        inputs: BootInputs,
        console_out: Box<dyn Write + Send>,
    ) -> Result<Vm, VmError> {
        machine::create_vm(kvm, config, inputs, console_out)
    }

    fn probe_traps(kvm: &Kvm) -> Result<TrapSupport, String> {
        selftest::probe_traps(kvm)
    }

    /// `KVM_CAP_GUEST_DEBUG_HW_BPS`.
    fn hw_breakpoint_count(kvm: &Kvm) -> usize {
        let n = kvm.check_extension_raw(kvm_bindings::KVM_CAP_GUEST_DEBUG_HW_BPS.into());
        usize::try_from(n).unwrap_or(0).min(debug::HW_BREAKPOINTS)
    }

    /// `KVM_CAP_GUEST_DEBUG_HW_WPS`.
    fn hw_watchpoint_count(kvm: &Kvm) -> usize {
        let n = kvm.check_extension_raw(kvm_bindings::KVM_CAP_GUEST_DEBUG_HW_WPS.into());
        usize::try_from(n).unwrap_or(0).min(debug::HW_WATCHPOINTS)
    }

    /// arm64 KVM has no sync regs: `sync_regs` is unused.
    fn exit_vcpu(id: u32, fd: &mut VcpuFd, _sync_regs: bool, pc: u64) -> vcpu::KvmVcpu<'_> {
        vcpu::KvmVcpu::new(id, fd, pc)
    }

    fn register_ioctls(vcpu: &vcpu::KvmVcpu<'_>) -> (u64, u64) {
        (vcpu.reads, vcpu.writes)
    }

    /// arm64 KVM has no sync regs: nothing to turn on.
    fn enable_register_sync(_: &mut VcpuFd) {}

    /// arm64 KVM has no sync regs: nothing to flush.
    fn flush_register_sync(_: &mut VcpuFd) -> Result<(), ProbingError> {
        Ok(())
    }

    fn paused_state(fd: &mut VcpuFd) -> Result<PausedState, ProbingError> {
        vcpu::paused_state(fd)
    }

    fn read_pc(fd: &VcpuFd) -> Result<u64, kvm_ioctls::Error> {
        vcpu::read_pc(fd)
    }

    fn decode_debug_exit(
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
        _watch_slots: u32,
    ) -> Option<DebugEvent> {
        debug::decode_debug_exit(fd, exit)
    }

    fn arch_exit(
        id: u32,
        fd: &mut VcpuFd,
        reason: u32,
        engine: &crate::probing::Engine,
    ) -> Result<Option<(u64, u64)>, ProbingError> {
        if reason != kvm_bindings::KVM_EXIT_ARM_NISV {
            return Ok(None);
        }
        // SAFETY: KVM filled the `arm_nisv` member of the exit union for KVM_EXIT_ARM_NISV.
        let fault_ipa = unsafe { fd.get_kvm_run().__bindgen_anon_1.arm_nisv.fault_ipa };
        store::emulate(id, fd, fault_ipa, engine).map(Some)
    }

    fn describe_debug_exit(exit: &kvm_debug_exit_arch) -> String {
        debug::describe_debug_exit(exit)
    }
}
