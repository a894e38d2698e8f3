//! Architecture-specific VMM code behind the seam of [`seam`]: each architecture's module
//! implements [`VmmArch`] (and its [`GuestDebug`]), and the rest of the VMM reaches it only
//! through [`Host`], the implementation for the architecture this VMM is built for. To add an
//! architecture: a module here implementing both traits (the compiler lists what is missing),
//! its probe-core back end, its arm of `hvprobe_guest::GuestArch`, its record in
//! [`crate::platform`] (with its runner under `crate::runner`), and one `cfg` line for `Host`
//! below.
//!
//! Kernel image formats are checked for either architecture on any host (`image.rs`): the
//! emulated runner of another architecture takes the guest's kernel too. The probe engine's
//! arch back ends live in `probe-core`.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub mod image;
pub mod seam;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

pub use seam::{ExitRoute, GuestDebug, GuestDebugContext, HandBack, VmmArch};

/// The architecture this VMM is built for: the only place that picks one.
#[cfg(target_arch = "x86_64")]
pub type Host = x86_64::X86_64Vmm;
/// The architecture this VMM is built for: the only place that picks one.
#[cfg(target_arch = "aarch64")]
pub type Host = aarch64::Aarch64Vmm;

/// The probe engine's back end for this VMM's guests.
pub type Guest = <Host as VmmArch>::Guest;
/// One vCPU's guest-debug set-up on this VMM.
pub type GuestDebugSetup = <Host as VmmArch>::Debug;
/// The registers of this VMM's guests, as the engine sees them.
pub type GuestRegisters = <Guest as probe_core::arch::Arch>::Registers;

/// Where the running kernel shows how far KASLR moved it: a register that holds the address
/// of a symbol System.map lists (x86_64: `MSR_LSTAR` = `entry_SYSCALL_64`; arm64:
/// `VBAR_EL1` = `vectors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KaslrAnchor {
    /// The symbol.
    pub symbol: &'static str,
    /// The register that holds its run-time address, for messages.
    pub register: &'static str,
    /// The granule KASLR moves the kernel by.
    pub align: u64,
    /// Other tables the register may hold instead, on some CPUs (arm64's Spectre-BHB vectors).
    pub alternates: &'static [AnchorTable],
}

/// A table of `count` entries `stride` bytes apart from `symbol`, any of which the anchor
/// register may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnchorTable {
    /// The table's symbol.
    pub symbol: &'static str,
    /// Bytes between entries.
    pub stride: u64,
    /// Entries.
    pub count: u64,
}

impl KaslrAnchor {
    /// The linked addresses the anchor register may hold, from System.map (`lookup` gives a
    /// symbol's address), each with its name: the symbol's, then every alternate table
    /// entry's (`__bp_harden_el1_vectors+0x800`).
    pub fn linked_addresses(&self, lookup: impl Fn(&str) -> Option<u64>) -> Vec<(u64, String)> {
        let mut out: Vec<(u64, String)> = lookup(self.symbol)
            .map(|a| (a, self.symbol.to_string()))
            .into_iter()
            .collect();
        for t in self.alternates {
            if let Some(base) = lookup(t.symbol) {
                out.extend((0..t.count).map(|i| {
                    let name = match i {
                        0 => t.symbol.to_string(),
                        _ => format!("{}+{:#x}", t.symbol, i * t.stride),
                    };
                    (base + i * t.stride, name)
                }));
            }
        }
        out
    }

    /// The KASLR slide from the anchor register's value `running`, against the `linked`
    /// addresses it may hold: the one slide that is a multiple of the granule, with the name
    /// of the address it came from. An error names the register when none fits or several do
    /// (System.map does not match the kernel).
    pub fn slide<'a>(
        &self,
        running: u64,
        linked: &'a [(u64, String)],
    ) -> Result<(u64, &'a str), String> {
        if running == 0 {
            return Err(format!("cannot read the guest's {}", self.register));
        }
        let mut slides: Vec<(u64, &str)> = linked
            .iter()
            .map(|(l, name)| (running.wrapping_sub(*l), name.as_str()))
            .filter(|(s, _)| s % self.align == 0)
            .collect();
        slides.sort_unstable();
        slides.dedup_by_key(|(s, _)| *s);
        match slides[..] {
            [one] => Ok(one),
            [] => Err(format!(
                "the guest's {} {running:#x} is not {} (or a table the CPU may use instead) moved by a multiple of {} KiB: System.map does not match the running kernel",
                self.register,
                self.symbol,
                self.align >> 10
            )),
            _ => Err(format!(
                "the guest's {} {running:#x} fits more than one of {}'s tables ({} slides)",
                self.register,
                self.symbol,
                slides.len()
            )),
        }
    }
}

#[cfg(test)]
mod anchor_tests {
    use super::*;

    const ARM64: KaslrAnchor = KaslrAnchor {
        symbol: "vectors",
        register: "VBAR_EL1",
        align: 64 << 10,
        alternates: &[AnchorTable {
            symbol: "__bp_harden_el1_vectors",
            stride: 0x800,
            count: 4,
        }],
    };

    #[test]
    fn the_slide_comes_from_whichever_table_the_register_holds() {
        // The default guest's System.map: vectors and the Spectre-BHB vectors.
        let lookup = |s: &str| match s {
            "vectors" => Some(0xffff_8000_0801_0800),
            "__bp_harden_el1_vectors" => Some(0xffff_8000_0801_3000),
            _ => None,
        };
        let linked = ARM64.linked_addresses(lookup);
        assert_eq!(linked.len(), 5);
        let slide = 0x2a_0000u64 << 16;
        // Plain vectors, and the BHB loop slot (the second) a Neoverse N1 uses.
        assert_eq!(
            ARM64.slide(0xffff_8000_0801_0800 + slide, &linked),
            Ok((slide, "vectors"))
        );
        assert_eq!(
            ARM64.slide(0xffff_8000_0801_3800 + slide, &linked),
            Ok((slide, "__bp_harden_el1_vectors+0x800"))
        );
        assert_eq!(
            ARM64.slide(0xffff_8000_0801_3800, &linked),
            Ok((0, "__bp_harden_el1_vectors+0x800"))
        );
        // Neither: System.map does not match, named; zero: unreadable.
        let err = ARM64.slide(0xffff_8000_0801_0900, &linked).unwrap_err();
        assert!(
            err.contains("VBAR_EL1") && err.contains("System.map"),
            "{err}"
        );
        assert!(ARM64.slide(0, &linked).unwrap_err().contains("cannot read"));
        // A kernel without the BHB table has the plain anchor only.
        let old = ARM64.linked_addresses(|s| (s == "vectors").then_some(0xffff_8000_0801_0800));
        assert_eq!(old, vec![(0xffff_8000_0801_0800, "vectors".to_string())]);
    }
}
