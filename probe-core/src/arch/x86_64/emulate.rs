//! Host-side emulation of the simple instructions found under most probes (function
//! prologues, nops, relative branches), so that a hit on them costs one exit instead of two.

use super::regs::{Gpr, Registers};

/// Errors of emulation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmulationError {
    /// The stack slot to push to could not be written.
    #[error("cannot write the guest stack at {va:#x}: {why}")]
    Stack {
        /// The stack address.
        va: u64,
        /// Why.
        why: String,
    },
}

/// An instruction the host emulates. Addresses are absolute guest virtual addresses, computed
/// when the probe is planted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emulation {
    /// Any `nop` form or `endbr64`.
    Nop {
        /// Address of the next instruction.
        next: u64,
    },
    /// `push %reg`.
    Push {
        /// The pushed register.
        reg: Gpr,
        /// Address of the next instruction.
        next: u64,
    },
    /// `mov %src,%dst` between 64-bit registers.
    MovRegReg {
        /// Destination.
        dst: Gpr,
        /// Source.
        src: Gpr,
        /// Address of the next instruction.
        next: u64,
    },
    /// `sub $imm,%rsp` (flags included).
    SubRspImm {
        /// The immediate, sign-extended.
        imm: u64,
        /// Address of the next instruction.
        next: u64,
    },
    /// `jmp rel`.
    Jmp {
        /// Branch target.
        target: u64,
    },
    /// `call rel32`.
    Call {
        /// Branch target.
        target: u64,
        /// The return address pushed.
        ret: u64,
    },
    /// `jcc rel`.
    Jcc {
        /// Condition code (the low nibble of the opcode).
        cond: u8,
        /// Taken target.
        target: u64,
        /// Not-taken target.
        next: u64,
    },
}

const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;

/// Whether condition code `cond` holds for `rflags` (Intel SDM vol. 2, "Jcc").
pub fn condition_holds(cond: u8, rflags: u64) -> bool {
    let f = |bit| rflags & bit != 0;
    let base = match cond >> 1 {
        0 => f(OF),
        1 => f(CF),
        2 => f(ZF),
        3 => f(CF) || f(ZF),
        4 => f(SF),
        5 => f(PF),
        6 => f(SF) != f(OF),
        _ => f(ZF) || (f(SF) != f(OF)),
    };
    base != (cond & 1 == 1)
}

/// RFLAGS after `a - b` on 64-bit operands.
fn sub_flags(rflags: u64, a: u64, b: u64) -> u64 {
    let r = a.wrapping_sub(b);
    let mut f = rflags & !(CF | PF | AF | ZF | SF | OF);
    if a < b {
        f |= CF;
    }
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    if r == 0 {
        f |= ZF;
    }
    if r >> 63 == 1 {
        f |= SF;
    }
    if ((a ^ b) & (a ^ r)) >> 63 == 1 {
        f |= OF;
    }
    f
}

impl Emulation {
    /// Applies the instruction to `regs`; `push` writes a 64-bit value at a guest virtual
    /// address on the stack. Nothing is changed in `regs` if the push fails.
    pub fn apply(
        &self,
        regs: &mut Registers,
        push: &mut dyn FnMut(u64, u64) -> Result<(), EmulationError>,
    ) -> Result<(), EmulationError> {
        match *self {
            Emulation::Nop { next } => regs.rip = next,
            Emulation::Push { reg, next } => {
                let sp = regs.get(Gpr::Rsp).wrapping_sub(8);
                push(sp, regs.get(reg))?;
                regs.set(Gpr::Rsp, sp);
                regs.rip = next;
            }
            Emulation::MovRegReg { dst, src, next } => {
                let v = regs.get(src);
                regs.set(dst, v);
                regs.rip = next;
            }
            Emulation::SubRspImm { imm, next } => {
                let sp = regs.get(Gpr::Rsp);
                regs.rflags = sub_flags(regs.rflags, sp, imm);
                regs.set(Gpr::Rsp, sp.wrapping_sub(imm));
                regs.rip = next;
            }
            Emulation::Jmp { target } => regs.rip = target,
            Emulation::Call { target, ret } => {
                let sp = regs.get(Gpr::Rsp).wrapping_sub(8);
                push(sp, ret)?;
                regs.set(Gpr::Rsp, sp);
                regs.rip = target;
            }
            Emulation::Jcc { cond, target, next } => {
                regs.rip = if condition_holds(cond, regs.rflags) {
                    target
                } else {
                    next
                };
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> Registers {
        let mut r = Registers {
            rip: 0x1000,
            rflags: 0x2,
            ..Default::default()
        };
        r.set(Gpr::Rsp, 0x8000);
        r.set(Gpr::Rbp, 0xbbbb);
        r
    }

    #[test]
    fn push_and_call_write_the_stack_and_move_rsp() {
        let mut r = regs();
        let mut stack = Vec::new();
        Emulation::Push {
            reg: Gpr::Rbp,
            next: 0x1001,
        }
        .apply(&mut r, &mut |va, v| {
            stack.push((va, v));
            Ok(())
        })
        .unwrap();
        Emulation::Call {
            target: 0x2000,
            ret: 0x1006,
        }
        .apply(&mut r, &mut |va, v| {
            stack.push((va, v));
            Ok(())
        })
        .unwrap();
        assert_eq!(stack, vec![(0x7ff8, 0xbbbb), (0x7ff0, 0x1006)]);
        assert_eq!(r.get(Gpr::Rsp), 0x7ff0);
        assert_eq!(r.rip, 0x2000);
    }

    #[test]
    fn a_failed_push_changes_nothing() {
        let mut r = regs();
        let before = r.clone();
        let err = Emulation::Push {
            reg: Gpr::Rbp,
            next: 0x1001,
        }
        .apply(&mut r, &mut |va, _| {
            Err(EmulationError::Stack {
                va,
                why: "not mapped".into(),
            })
        });
        assert!(err.is_err());
        assert_eq!(r, before);
    }

    #[test]
    fn sub_sets_flags_like_the_cpu() {
        let mut r = regs();
        Emulation::SubRspImm {
            imm: 0x8000,
            next: 0x1004,
        }
        .apply(&mut r, &mut |_, _| Ok(()))
        .unwrap();
        assert_eq!(r.get(Gpr::Rsp), 0);
        assert_eq!(r.rflags & (ZF | CF | SF), ZF);
        assert_eq!(r.rflags & PF, PF);
        let mut r = regs();
        Emulation::SubRspImm {
            imm: 0x8001,
            next: 0x1004,
        }
        .apply(&mut r, &mut |_, _| Ok(()))
        .unwrap();
        assert_eq!(r.rflags & (ZF | CF | SF), CF | SF);
        // 0x8000000000000000 - 1 overflows.
        assert_eq!(sub_flags(0, 1 << 63, 1) & OF, OF);
        assert_eq!(sub_flags(0, 0x10, 0x1) & AF, AF);
    }

    #[test]
    fn every_condition_code_follows_the_sdm() {
        // (cond, flags that make it true, flags that make it false)
        let cases = [
            (0x0, OF, 0),
            (0x2, CF, 0),
            (0x4, ZF, 0),
            (0x6, ZF, 0),
            (0x7, 0, CF),
            (0x8, SF, 0),
            (0xa, PF, 0),
            (0xc, SF, SF | OF),
            (0xd, SF | OF, SF),
            (0xe, ZF, 0),
            (0xf, 0, ZF),
        ];
        for (cond, yes, no) in cases {
            assert!(condition_holds(cond, yes), "cond {cond:#x} with {yes:#x}");
            assert!(!condition_holds(cond, no), "cond {cond:#x} with {no:#x}");
            assert_eq!(condition_holds(cond ^ 1, yes), !condition_holds(cond, yes));
        }
        let mut r = regs();
        r.rflags |= ZF;
        Emulation::Jcc {
            cond: 4,
            target: 0x3000,
            next: 0x1002,
        }
        .apply(&mut r, &mut |_, _| Ok(()))
        .unwrap();
        assert_eq!(r.rip, 0x3000);
    }
}
