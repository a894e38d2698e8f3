//! The aarch64 back end: the register file and the breakpoint encoding. It builds and is
//! unit-tested; the KVM side for arm64 is not wired up yet.

use crate::arch::{Arch, RegisterFile};

/// Marker type of the aarch64 architecture.
#[derive(Debug, Clone, Copy, Default)]
pub struct Aarch64;

/// `BRK #imm16` encoding.
pub const fn brk(imm: u16) -> u32 {
    0xd420_0000 | ((imm as u32) << 5)
}

/// The immediate hvprobe's probe breakpoints carry (kprobes uses 0x004, uprobes 0x005).
pub const PROBE_BRK_IMM: u16 = 0x0a5;

const PROBE_BRK: [u8; 4] = brk(PROBE_BRK_IMM).to_le_bytes();

impl Arch for Aarch64 {
    type Registers = Registers;
    type Plan = StepPlan;
    const NAME: &'static str = "aarch64";
    const BREAKPOINT: &'static [u8] = &PROBE_BRK;
    const MAX_INSN_LEN: usize = 4;
}

/// How a displaced aarch64 instruction runs: emulated (`nop`) or stepped in a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepPlan {
    /// `nop`: advance the PC.
    Nop,
    /// Step a copy out of line.
    StepOutOfLine(u32),
}

/// Classifies one instruction word.
pub fn plan(word: u32) -> StepPlan {
    if word == 0xd503_201f {
        StepPlan::Nop
    } else {
        StepPlan::StepOutOfLine(word)
    }
}

/// x0-x30, sp, pc and pstate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registers {
    /// x0-x30.
    pub x: [u64; 31],
    /// Stack pointer.
    pub sp: u64,
    /// Program counter.
    pub pc: u64,
    /// PSTATE.
    pub pstate: u64,
}

impl RegisterFile for Registers {
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
        (n < 8).then(|| self.x[n])
    }

    fn by_name(&self, name: &str) -> Option<u64> {
        match name {
            "sp" => Some(self.sp),
            "pc" => Some(self.pc),
            "lr" => Some(self.x[30]),
            "fp" => Some(self.x[29]),
            _ => name
                .strip_prefix('x')
                .and_then(|n| n.parse::<usize>().ok())
                .and_then(|n| self.x.get(n).copied()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakpoint_is_a_brk_with_the_probe_immediate() {
        assert_eq!(brk(0), 0xd420_0000);
        assert_eq!(brk(0x004), 0xd420_0080); // the kprobes BRK
        assert_eq!(u32::from_le_bytes(PROBE_BRK), 0xd420_14a0);
        assert_eq!(<Aarch64 as Arch>::BREAKPOINT.len(), 4);
    }

    #[test]
    fn registers_follow_the_aapcs() {
        let mut r = Registers::default();
        r.x[0] = 7;
        r.x[30] = 0x1234;
        assert_eq!(r.arg(0), Some(7));
        assert_eq!(r.arg(8), None);
        assert_eq!(r.by_name("lr"), Some(0x1234));
        assert_eq!(r.by_name("x0"), Some(7));
        assert_eq!(r.by_name("x31"), None);
        assert_eq!(plan(0xd503_201f), StepPlan::Nop);
    }
}
