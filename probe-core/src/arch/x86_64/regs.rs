//! The x86_64 register file as the engine and the handlers see it.

use crate::arch::RegisterFile;

/// A 64-bit general-purpose register, numbered as the instruction encoding numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Gpr {
    /// `rax`.
    Rax = 0,
    /// `rcx`.
    Rcx,
    /// `rdx`.
    Rdx,
    /// `rbx`.
    Rbx,
    /// `rsp`.
    Rsp,
    /// `rbp`.
    Rbp,
    /// `rsi`.
    Rsi,
    /// `rdi`.
    Rdi,
    /// `r8`.
    R8,
    /// `r9`.
    R9,
    /// `r10`.
    R10,
    /// `r11`.
    R11,
    /// `r12`.
    R12,
    /// `r13`.
    R13,
    /// `r14`.
    R14,
    /// `r15`.
    R15,
}

impl Gpr {
    /// All registers in encoding order.
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];

    /// The register with encoding number `n` (0..16).
    pub fn from_number(n: u8) -> Option<Gpr> {
        Gpr::ALL.get(usize::from(n)).copied()
    }

    /// The encoding number.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The AT&T-less conventional name (`rax`, `r8`).
    pub fn name(self) -> &'static str {
        [
            "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15",
        ][usize::from(self.number())]
    }

    /// The register named `name` (64-bit names only).
    pub fn from_name(name: &str) -> Option<Gpr> {
        Gpr::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// The x86_64 state one probe hit needs: general-purpose registers, RIP, RFLAGS, and the
/// control registers that select the page tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registers {
    /// General-purpose registers, indexed by [`Gpr`].
    pub gpr: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags.
    pub rflags: u64,
    /// Page-table root.
    pub cr3: u64,
    /// CR4 (LA57 selects 5-level paging).
    pub cr4: u64,
    /// GS base: in kernel mode, this CPU's per-CPU area (Linux's `%gs:` variables).
    pub gs_base: u64,
}

impl Registers {
    /// Value of `r`.
    pub fn get(&self, r: Gpr) -> u64 {
        self.gpr[usize::from(r.number())]
    }

    /// Sets `r` to `v`.
    pub fn set(&mut self, r: Gpr, v: u64) {
        self.gpr[usize::from(r.number())] = v;
    }
}

/// The System V / Linux kernel argument registers, in order.
pub const ARG_REGS: [Gpr; 6] = [Gpr::Rdi, Gpr::Rsi, Gpr::Rdx, Gpr::Rcx, Gpr::R8, Gpr::R9];

impl RegisterFile for Registers {
    fn general_purpose(&self) -> &[u64] {
        &self.gpr
    }

    fn general_purpose_mut(&mut self) -> &mut [u64] {
        &mut self.gpr
    }

    const PC_NAME: &'static str = "rip";
    const ARG_NAMES: &'static [&'static str] = &["rdi", "rsi", "rdx", "rcx", "r8", "r9"];

    fn pc(&self) -> u64 {
        self.rip
    }

    fn set_pc(&mut self, pc: u64) {
        self.rip = pc;
    }

    fn sp(&self) -> u64 {
        self.get(Gpr::Rsp)
    }

    fn arg(&self, n: usize) -> Option<u64> {
        ARG_REGS.get(n).map(|r| self.get(*r))
    }

    fn register_args(&self) -> usize {
        ARG_REGS.len()
    }

    fn return_value(&self) -> u64 {
        self.get(Gpr::Rax)
    }

    /// The kernel's names for x86_64 registers in fetch args (`%di`, `%ax`, `%r8`, `%ip`,
    /// `%flags`), also with the `r` prefix (`%rdi`), and `cr3`.
    fn by_name(&self, name: &str) -> Option<u64> {
        const LEGACY: [&str; 8] = ["ax", "bx", "cx", "dx", "si", "di", "bp", "sp"];
        match name {
            "rip" | "ip" => Some(self.rip),
            "rflags" | "flags" => Some(self.rflags),
            "cr3" => Some(self.cr3),
            n if LEGACY.contains(&n) => Gpr::from_name(&format!("r{n}")).map(|r| self.get(r)),
            _ => Gpr::from_name(name).map(|r| self.get(r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_args_follow_the_abi() {
        for r in Gpr::ALL {
            assert_eq!(Gpr::from_name(r.name()), Some(r));
            assert_eq!(Gpr::from_number(r.number()), Some(r));
        }
        let mut regs = Registers::default();
        regs.set(Gpr::Rdi, 1);
        regs.set(Gpr::Rsi, 2);
        regs.set(Gpr::R9, 6);
        assert_eq!(regs.arg(0), Some(1));
        assert_eq!(regs.arg(1), Some(2));
        assert_eq!(regs.arg(5), Some(6));
        assert_eq!(regs.arg(6), None);
        assert_eq!(regs.by_name("rsi"), Some(2));
        assert_eq!(regs.by_name("xmm0"), None);
    }
}
