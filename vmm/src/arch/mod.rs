//! Architecture-specific VMM code, behind one set of names (Firecracker's `arch/mod.rs` way):
//! the rest of the VMM calls `arch::create_vm`, `arch::KvmVcpu`, `arch::decode_debug_exit`, never an
//! architecture's module. Each architecture implements the same items:
//!
//! - `Guest`: probe-core's [`probe_core::arch::Arch`] for its guests, and `GuestRegisters`;
//! - `REQUIRED_CAPS`: the KVM capabilities the VMM cannot do without (the host check);
//! - `create_vm`: memory, interrupt controller, devices and vCPUs of a bootable VM;
//! - `probe_traps`: the trap self-test's tiny guest;
//! - `KvmVcpu` (probe-core's `VcpuAccess`), `enable_register_sync`, `flush_register_sync`,
//!   `paused_state`, `read_pc`: the vCPU's registers;
//! - `GuestDebugSetup`, `decode_debug_exit`, `describe_debug_exit`: the `kvm_guest_debug`
//!   layout, decoding `KVM_EXIT_DEBUG`, handing a trap back;
//! - `KASLR_ANCHOR`: the register and symbol that give the running kernel's slide;
//! - `HW_BREAKPOINTS`, `hw_breakpoint_count`: the most hardware breakpoints a vCPU can have,
//!   and how many this KVM gives;
//! - `XOL_GPA_BASE`: where the XOL area sits in guest physical memory.
//!
//! Kernel image formats are checked for either architecture on any host (`image.rs`): the
//! emulated runner of another architecture takes the guest's kernel too. The probe engine's
//! arch back ends live in `probe-core`.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub mod image;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use aarch64::{
    Guest, GuestDebugSetup, HW_BREAKPOINTS, KASLR_ANCHOR, KvmVcpu, REQUIRED_CAPS, XOL_GPA_BASE,
    create_vm, decode_debug_exit, describe_debug_exit, enable_register_sync, flush_register_sync,
    hw_breakpoint_count, paused_state, probe_traps, read_pc,
};
#[cfg(target_arch = "x86_64")]
pub use x86_64::{
    Guest,
    debug::{
        GuestDebugSetup, HW_BREAKPOINTS, decode_debug_exit, describe_debug_exit,
        hw_breakpoint_count,
    },
    hostcheck::REQUIRED_CAPS,
    layout::XOL_GPA_BASE,
    machine::create_vm,
    selftest::probe_traps,
    vcpu::{
        KASLR_ANCHOR, KvmVcpu, enable_register_sync, flush_register_sync, paused_state, read_pc,
    },
};

/// What the arch layer needs to tell the guest's own debug exits from hvprobe's, passed to
/// `GuestDebugSetup::take_guest_exit` and `reinject_breakpoint`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestDebugContext {
    /// Whether the set-up of the last entry loaded hvprobe's debug registers (then the guest's
    /// own breakpoints were not loaded, and a breakpoint exit is hvprobe's).
    pub hardware_in_use: bool,
}

/// The software breakpoint's name in output (`int3`, `brk`).
#[cfg(target_arch = "x86_64")]
pub const BREAKPOINT_NAME: &str = "int3";
/// The software breakpoint's name in output (`int3`, `brk`).
#[cfg(target_arch = "aarch64")]
pub const BREAKPOINT_NAME: &str = "brk";

/// The registers of the host architecture's guests, as the engine sees them.
pub type GuestRegisters = <Guest as probe_core::arch::Arch>::Registers;

/// Where the running kernel shows how far KASLR moved it: a register that holds the address
/// of a symbol System.map lists (x86_64: `MSR_LSTAR` = `entry_SYSCALL_64`; arm64:
/// `VBAR_EL1` = `vectors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KaslrAnchor {
    /// The symbol.
    pub symbol: &'static str,
    /// The register that holds its run-time address, for messages.
    pub register: &'static str,
    /// The granule KASLR moves the kernel by.
    pub align: u64,
}
