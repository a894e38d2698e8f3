//! x86_64 specifics of the VMM: memory layout, boot protocol, MP table and ACPI, the VM and
//! vCPU set-up, guest debugging and the vCPU's registers as probe-core sees them.

pub mod acpi;
pub mod boot;
pub mod debug;
pub mod hostcheck;
pub mod kernel;
pub mod layout;
pub mod machine;
pub mod mptable;
pub mod selftest;
pub mod vcpu;

/// The probe engine's architecture for x86_64 guests.
pub type Guest = probe_core::arch::x86_64::X86_64;
