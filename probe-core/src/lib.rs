//! probe-core: hvprobe's probe engine, independent of KVM. It reaches the VM only through a
//! small trait (registers, guest memory, stepping), so everything here is testable without
//! /dev/kvm.
//!
//! Today it holds the guest kernel's symbol table ([`symbols`]); the instruction decoder, the
//! probe table, the page-table walker and the XOL planner follow (issue "x86_64 probes").

pub mod symbols;
