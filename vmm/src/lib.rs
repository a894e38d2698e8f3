//! hvprobe's VMM: a small KVM virtual machine monitor built from the rust-vmm crates that boots
//! an unmodified Linux guest, and the emulated runner that provides KVM where the host has none
//! usable. All KVM calls of the project live in this crate.

pub mod api;
pub mod arch;
pub mod cli;
pub mod clients;
pub mod devices;
pub mod handlers;
pub mod hostcheck;
pub mod job;
pub mod l1init;
pub mod machine;
pub mod output;
pub mod platform;
pub mod probing;
pub mod refusal;
pub mod report;
pub mod rootfs;
pub mod runner;
pub mod selftest;
pub mod share;
pub mod stacks;
pub mod summary;
pub mod vcpu;
pub mod vm;
