//! Architecture-specific VMM code. Only x86_64 boots guests today; the probe engine's arch
//! back ends live in `probe-core`.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

// The host architecture's items under one set of names (Firecracker's `arch/mod.rs` way): the
// rest of the VMM calls `arch::load_kernel`, not an architecture's module.
#[cfg(target_arch = "x86_64")]
pub use x86_64::kernel::{check_kernel_image, load_kernel};
