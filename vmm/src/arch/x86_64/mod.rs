//! x86_64 specifics of the VMM: memory layout, boot protocol, MP table.

pub mod acpi;
pub mod boot;
pub mod debug;
pub mod kernel;
pub mod layout;
pub mod mptable;
