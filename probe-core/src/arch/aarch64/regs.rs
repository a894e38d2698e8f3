//! The aarch64 register file as the engine and handlers see it: x0-x30, SP, PC, PSTATE, and the
//! system registers a hit needs (SP_EL0 holds `current` in the kernel; TTBR0/1 and TCR select
//! the page tables).

use crate::arch::RegisterFile;

/// PSTATE.BTYPE (bits 11:10): the branch type a BTI landing pad checks, cleared when the host
/// moves the PC itself.
pub const PSTATE_BTYPE: u64 = 3 << 10;
/// PSTATE.{D,A,I,F} (bits 9:6): the exception masks a trapped step sets, as Linux kprobes do.
pub const PSTATE_DAIF: u64 = 0xf << 6;

/// Bits of a register-use mask ([`crate::arch::HostEmulation::registers_used`],
/// [`crate::vm::VcpuAccess::complete_registers_in`]) beyond x0-x30's (bit n: xn): arm64 KVM
/// reads each register with its own ioctl, so a hit asks for the groups it needs and no more.
pub mod uses {
    /// x0-x30.
    pub const GENERAL: u64 = (1 << 31) - 1;
    /// The stack pointer of the current mode (SP_EL1 or SP_EL0, by PSTATE.SPSel; PSTATE and
    /// SP_EL0 come with it).
    pub const SP: u64 = 1 << 31;
    /// PSTATE.
    pub const PSTATE: u64 = 1 << 32;
    /// What translating a kernel (upper half) address needs: TTBR1_EL1 and TCR_EL1.
    pub const KERNEL_SPACE: u64 = 1 << 33;
    /// What translating a user (lower half) address needs: TTBR0_EL1 and TCR_EL1.
    pub const USER_SPACE: u64 = 1 << 34;
    /// SP_EL0 (`current` in the kernel).
    pub const SP_EL0: u64 = 1 << 35;
    /// Every register.
    pub const ALL: u64 = u64::MAX;
}

/// What a vCPU reports for a page-table root it did not read: no guest RAM is there, so a walk
/// through it fails instead of reading some other table.
pub const UNREAD_TABLE: u64 = u64::MAX;

/// x0-x30, sp, pc, pstate and the system registers of one hit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registers {
    /// x0-x30 (x29 is the frame pointer, x30 the link register).
    pub x: [u64; 31],
    /// The stack pointer of the exception level the vCPU is at (SP_EL1 in the kernel).
    pub sp: u64,
    /// Program counter.
    pub pc: u64,
    /// PSTATE (SPSR layout).
    pub pstate: u64,
    /// SP_EL0: in kernel mode, the current `task_struct`.
    pub sp_el0: u64,
    /// TTBR0_EL1: the user half's page-table root.
    pub ttbr0: u64,
    /// TTBR1_EL1: the kernel half's page-table root (`swapper_pg_dir`).
    pub ttbr1: u64,
    /// TCR_EL1: the translation regime (granule, address sizes).
    pub tcr: u64,
}

/// Arguments the AAPCS64 passes in registers (x0-x7).
const REGISTER_ARGS: usize = 8;

impl RegisterFile for Registers {
    const PC_NAME: &'static str = "pc";
    const ARG_NAMES: &'static [&'static str] = &["x0", "x1", "x2", "x3", "x4", "x5", "x6", "x7"];

    fn general_purpose(&self) -> &[u64] {
        &self.x
    }

    fn general_purpose_mut(&mut self) -> &mut [u64] {
        &mut self.x
    }

    fn pc(&self) -> u64 {
        self.pc
    }

    fn set_pc(&mut self, pc: u64) {
        self.pc = pc;
    }

    fn sp(&self) -> u64 {
        self.sp
    }

    fn arg(&self, n: usize) -> Option<u64> {
        (n < REGISTER_ARGS).then(|| self.x[n])
    }

    fn register_args(&self) -> usize {
        REGISTER_ARGS
    }

    fn return_value(&self) -> u64 {
        self.x[0]
    }

    /// The kernel's arm64 names (`x0`-`x30`, `sp`, `pc`, `pstate`), and `lr`/`fp`.
    fn by_name(&self, name: &str) -> Option<u64> {
        match name {
            "sp" => Some(self.sp),
            "pc" => Some(self.pc),
            "pstate" => Some(self.pstate),
            "lr" => Some(self.x[30]),
            "fp" => Some(self.x[29]),
            _ => name
                .strip_prefix('x')
                .filter(|n| !n.starts_with('0') || *n == "0")
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| self.x.get(n).copied()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_follow_the_aapcs_and_the_kernels_names() {
        let mut r = Registers::default();
        r.x[0] = 7;
        r.x[7] = 8;
        r.x[30] = 0x1234;
        assert_eq!(r.arg(0), Some(7));
        assert_eq!(r.arg(7), Some(8));
        assert_eq!(r.arg(8), None);
        assert_eq!(r.return_value(), 7);
        assert_eq!(r.by_name("lr"), Some(0x1234));
        assert_eq!(r.by_name("x30"), Some(0x1234));
        assert_eq!(r.by_name("x0"), Some(7));
        assert_eq!(r.by_name("x31"), None);
        assert_eq!(r.by_name("x07"), None);
        assert_eq!(r.by_name("di"), None);
    }
}
