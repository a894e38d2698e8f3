//! probe-core: hvprobe's probe engine, independent of KVM. It reaches the VM only through a
//! small trait (registers, guest memory, stepping), so everything here is testable without
//! /dev/kvm.
//!
//! The engine ([`engine`]: probe table, per-vCPU hit state machine, return probes) sits on the
//! arch back ends ([`arch`]: decoding, step plans, emulation), the XOL area ([`xol`]), the page
//! walker ([`pagewalk`]) and the guest kernel's symbols and BTF ([`symbols`], [`btf`]); the
//! probe language ([`definition`], [`fetch`], [`histogram`]) turns hits into values.

pub mod arch;
pub mod btf;
pub mod catalog;
pub mod definition;
pub mod elf;
pub mod engine;
pub mod extable;
pub mod fake;
pub mod fetch;
pub mod guest_kprobes;
pub mod guest_memory;
pub mod histogram;
pub mod integrity;
pub mod jump;
pub mod pagewalk;
pub mod patched_text;
pub mod probe;
pub mod protect;
pub mod retprobe;
pub mod symbols;
pub mod task;
pub mod unwind;
pub mod vm;
pub mod xol;

#[cfg(test)]
mod layering;
