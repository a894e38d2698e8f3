//! Architecture-specific VMM code, behind one set of names (Firecracker's `arch/mod.rs` way):
//! the rest of the VMM calls `arch::create_vm`, `arch::KvmVcpu`, `arch::decode_debug_exit`, never an
//! architecture's module. Each architecture implements the same items:
//!
//! - `Guest`: probe-core's [`probe_core::arch::Arch`] for its guests, and `GuestRegisters`;
//! - `REQUIRED_CAPS`: the KVM capabilities the VMM cannot do without (the host check);
//! - `create_vm`: memory, interrupt controller, devices and vCPUs of a bootable VM;
//! - `probe_traps`: the trap self-test's tiny guest;
//! - `KvmVcpu` (probe-core's `VcpuAccess`), `enable_register_sync`, `flush_register_sync`,
//!   `paused_state`, `read_pc`: the vCPU's registers;
//! - `GuestDebugSetup`, `decode_debug_exit`, `describe_debug_exit`: the `kvm_guest_debug`
//!   layout, decoding `KVM_EXIT_DEBUG`, handing a trap back;
//! - `KASLR_ANCHOR`: the register and symbol that give the running kernel's slide;
//! - `HW_BREAKPOINTS`, `hw_breakpoint_count`: the most hardware breakpoints a vCPU can have,
//!   and how many this KVM gives;
//! - `SLOT_EXCEPTION_WATCH`: whether `GuestDebugSetup` can watch the kernel's exception
//!   vector for exceptions taken inside trapped slots (and rewind them);
//! - `XOL_GPA_BASE`: where the XOL area sits in guest physical memory.
//!
//! Kernel image formats are checked for either architecture on any host (`image.rs`): the
//! emulated runner of another architecture takes the guest's kernel too. The probe engine's
//! arch back ends live in `probe-core`.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub mod image;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use aarch64::{
    Guest, GuestDebugSetup, HW_BREAKPOINTS, KASLR_ANCHOR, KvmVcpu, REQUIRED_CAPS,
    SLOT_EXCEPTION_WATCH, XOL_GPA_BASE, create_vm, decode_debug_exit, describe_debug_exit,
    enable_register_sync, flush_register_sync, hw_breakpoint_count, paused_state, probe_traps,
    read_pc,
};
#[cfg(target_arch = "x86_64")]
pub use x86_64::{
    Guest,
    debug::{
        GuestDebugSetup, HW_BREAKPOINTS, SLOT_EXCEPTION_WATCH, decode_debug_exit,
        describe_debug_exit, hw_breakpoint_count,
    },
    hostcheck::REQUIRED_CAPS,
    layout::XOL_GPA_BASE,
    machine::create_vm,
    selftest::probe_traps,
    vcpu::{
        KASLR_ANCHOR, KvmVcpu, enable_register_sync, flush_register_sync, paused_state, read_pc,
    },
};

/// What the arch layer needs to tell the guest's own debug exits from hvprobe's, passed to
/// `GuestDebugSetup::take_guest_exit` and `reinject_breakpoint`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestDebugContext {
    /// The running kernel's return path to user mode ([`USER_RETURN_SYMBOL`], KASLR applied).
    pub user_return: Option<u64>,
    /// Hardware breakpoints this vCPU has.
    pub hw_count: usize,
    /// Whether the set-up of the last entry loaded hvprobe's debug registers (then the guest's
    /// own breakpoints were not loaded, and a breakpoint exit is hvprobe's).
    pub hardware_in_use: bool,
    /// The hardware breakpoint kept for the slot-exception watch, when there is one (arm64:
    /// the vCPUs' last; the engine is told of one fewer).
    pub exception_watch_slot: Option<usize>,
}

/// Where `GuestDebugSetup::take_guest_exit` sends a debug exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitRoute {
    /// The guest's own (or a step made on its behalf): handled in the arch layer.
    Taken,
    /// hvprobe's: decoded for the engine.
    Engine,
    /// The slot-exception watch fired: the guest is entering its exception vector from the
    /// kernel, to return to `return_pc`; the engine says whether that is a trapped slot's copy
    /// ([`probe_core::engine::ProbeEngine::rewind_slot_exception`]).
    ExceptionEntry {
        /// The exception's return address (ELR_EL1).
        return_pc: u64,
    },
}

/// The kernel symbol of the return path to user mode, where a guest's own software step is
/// carried through while KVM debugs the guest (arm64: `ret_to_user`); `None` where the
/// architecture needs none (x86_64's TF single-step is the guest's own while hvprobe does not
/// single-step).
#[cfg(target_arch = "x86_64")]
pub const USER_RETURN_SYMBOL: Option<&str> = None;
/// The kernel symbol of the return path to user mode (see the x86_64 twin).
#[cfg(target_arch = "aarch64")]
pub const USER_RETURN_SYMBOL: Option<&str> = Some("ret_to_user");

/// The software breakpoint's name in output (`int3`, `brk`).
#[cfg(target_arch = "x86_64")]
pub const BREAKPOINT_NAME: &str = "int3";
/// The software breakpoint's name in output (`int3`, `brk`).
#[cfg(target_arch = "aarch64")]
pub const BREAKPOINT_NAME: &str = "brk";

/// The registers of the host architecture's guests, as the engine sees them.
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
