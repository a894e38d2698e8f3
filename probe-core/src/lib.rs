//! probe-core: hvprobe's probe engine, independent of KVM. It reaches the VM only through a
//! small trait (registers, guest memory, stepping), so everything here is testable without
//! /dev/kvm.
//!
//! Today it holds the guest kernel's symbol table ([`symbols`]) and the x86_64 page-table walker
//! ([`pagewalk`]); the instruction decoder, the probe table and the XOL planner follow.

pub mod arch;
pub mod btf;
pub mod definition;
pub mod elf;
pub mod engine;
pub mod fake;
pub mod fetch;
pub mod pagewalk;
pub mod probe;
pub mod retprobe;
pub mod symbols;
pub mod task;
pub mod vm;
pub mod xol;
