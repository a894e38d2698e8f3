//! The trap self-test: a tiny guest (a few instructions in one page, the architecture's:
//! [`crate::arch::probe_traps`]) run on this KVM to learn which debug traps it actually
//! delivers: software-breakpoint exits, hardware execute breakpoints and single-steps. Nested
//! or emulated KVMs differ here (QEMU's TCG, for one, hides a nested x86 guest's int3 unless
//! patched), so hvprobe measures instead of assuming. Takes a few milliseconds.

use kvm_ioctls::Kvm;

/// Which traps this KVM delivers; each is `Err(why)` when it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrapSupport {
    /// `int3` reaches the VMM as a #BP debug exit.
    pub software: Result<(), String>,
    /// A hardware execute breakpoint reaches the VMM as a #DB debug exit.
    pub hardware: Result<(), String>,
    /// Single-stepping reaches the VMM as a #DB debug exit after one instruction.
    pub single_step: Result<(), String>,
}

impl TrapSupport {
    /// One line for the user.
    pub fn summary(&self) -> String {
        let f = |r: &Result<(), String>| match r {
            Ok(()) => "yes".to_string(),
            Err(e) => format!("no ({e})"),
        };
        format!(
            "int3 exits {}, hardware breakpoints {}, single-step {}",
            f(&self.software),
            f(&self.hardware),
            f(&self.single_step)
        )
    }
}

/// Runs the self-test on `kvm`.
pub fn probe_traps(kvm: &Kvm) -> Result<TrapSupport, String> {
    crate::arch::probe_traps(kvm)
}
