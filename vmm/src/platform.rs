//! What the VMM knows of each guest architecture on any host, in one record per architecture:
//! the facts that the host-side layers (job parsing, the emulated runner) need about a guest
//! whose architecture may not be the host's. The KVM side of an architecture is its
//! [`crate::arch::VmmArch`], built only on that architecture's hosts; this record is built
//! everywhere. [`platform`] is the one `match` on the architecture.

use hvprobe_guest::GuestArch;
use probe_core::arch::Arch;
use probe_core::definition::ProbeDefinition;

use crate::runner::RunnerPlatform;

/// One guest architecture's facts for the host-side layers.
#[derive(Debug)]
pub struct Platform {
    /// The architecture.
    pub arch: GuestArch,
    /// The most hardware breakpoints its vCPUs can have (probe-core's
    /// [`Arch::MAX_HW_BREAKPOINTS`]); KVM may give fewer, which planting finds out.
    pub max_hw_breakpoints: usize,
    /// The kernel command line every default-guest boot starts from.
    pub default_cmdline: &'static str,
    /// The first register a probe definition names that this architecture does not have.
    pub unknown_register: fn(&ProbeDefinition) -> Option<&str>,
    /// Its emulated runner.
    pub runner: &'static RunnerPlatform,
}

/// The command line of x86_64 default guests: console on COM1, reset through the i8042 on
/// reboot and at once on panic, no KASLR, and only messages of KERN_CRIT and worse (panics,
/// oopses) on the console.
pub const DEFAULT_CMDLINE_X86_64: &str = "console=ttyS0 reboot=k panic=-1 pci=off nokaslr i8042.noaux i8042.nomux i8042.dumbkbd quiet loglevel=3";

/// The command line of arm64 default guests: the ns16550a console; the guest resets through
/// PSCI.
pub const DEFAULT_CMDLINE_AARCH64: &str = "console=ttyS0 panic=-1 nokaslr quiet loglevel=3";

static X86_64: Platform = Platform {
    arch: GuestArch::X86_64,
    max_hw_breakpoints: probe_core::arch::x86_64::X86_64::MAX_HW_BREAKPOINTS,
    default_cmdline: DEFAULT_CMDLINE_X86_64,
    unknown_register: probe_core::fetch::unknown_register::<probe_core::arch::x86_64::X86_64>,
    runner: &crate::runner::x86_64::RUNNER,
};

static AARCH64: Platform = Platform {
    arch: GuestArch::Aarch64,
    max_hw_breakpoints: probe_core::arch::aarch64::Aarch64::MAX_HW_BREAKPOINTS,
    default_cmdline: DEFAULT_CMDLINE_AARCH64,
    unknown_register: probe_core::fetch::unknown_register::<probe_core::arch::aarch64::Aarch64>,
    runner: &crate::runner::aarch64::RUNNER,
};

/// The record of `arch`.
pub fn platform(arch: GuestArch) -> &'static Platform {
    match arch {
        GuestArch::X86_64 => &X86_64,
        GuestArch::Aarch64 => &AARCH64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_record_is_its_architectures() {
        for arch in [GuestArch::X86_64, GuestArch::Aarch64] {
            assert_eq!(platform(arch).arch, arch);
        }
        // An arm64 guest has arm64's breakpoints whatever the host (16 architectural, not x86's
        // four).
        assert_eq!(platform(GuestArch::Aarch64).max_hw_breakpoints, 16);
        assert_eq!(platform(GuestArch::X86_64).max_hw_breakpoints, 4);
    }
}
