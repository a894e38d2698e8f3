//! aarch64 specifics of the VMM, behind the same names as x86_64's (see [`crate::arch`]): the
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
pub mod vcpu;

use kvm_ioctls::Kvm;

pub use debug::{
    GuestDebugSetup, HW_BREAKPOINTS, SLOT_EXCEPTION_WATCH, decode_debug_exit, describe_debug_exit,
};
pub use layout::XOL_GPA_BASE;
pub use machine::create_vm;
pub use selftest::probe_traps;
pub use vcpu::{
    KASLR_ANCHOR, KvmVcpu, enable_register_sync, flush_register_sync, paused_state, read_pc,
};

/// The probe engine's architecture for arm64 guests.
pub type Guest = probe_core::arch::aarch64::Aarch64;

/// How many hardware breakpoints a vCPU of this KVM has (`KVM_CAP_GUEST_DEBUG_HW_BPS`).
pub fn hw_breakpoint_count(kvm: &Kvm) -> usize {
    let n = kvm.check_extension_raw(kvm_bindings::KVM_CAP_GUEST_DEBUG_HW_BPS.into());
    usize::try_from(n).unwrap_or(0).min(HW_BREAKPOINTS)
}

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
