//! Architecture-specific VMM code. Only x86_64 boots guests today; the probe engine's arch
//! back ends live in `probe-core`.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
