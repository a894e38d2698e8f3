//! Host-side emulation of the simple instructions found under most probes (function
//! prologues, nops, relative branches), so that a hit on them costs one exit instead of two.

use super::regs::{Gpr, Registers};
use crate::arch::{EmulationError, GuestStack, HostEmulation};

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
    /// `pushfq`: the flags as the guest sees them, RF and VM cleared in the image as the CPU
    /// clears them.
    Pushf {
        /// Address of the next instruction.
        next: u64,
    },
    /// `popfq`: the flags the guest may change in ring 0 (IF included), bit 1 kept set.
    Popf {
        /// Address of the next instruction.
        next: u64,
    },
    /// `cli`.
    Cli {
        /// Address of the next instruction.
        next: u64,
    },
    /// `sti`: IF set; the one-instruction interrupt shadow is the VMM's to set (see
    /// [`Emulation::opens_interrupt_shadow`]).
    Sti {
        /// Address of the next instruction.
        next: u64,
    },
    /// `loop`, `loope`, `loopne` with RCX as the counter.
    Loop {
        /// `None` for `loop`, `Some(true)` for `loope` (ZF must be set), `Some(false)` for
        /// `loopne`.
        zf: Option<bool>,
        /// Taken target.
        target: u64,
        /// Not-taken target.
        next: u64,
    },
    /// `jrcxz` (or `jecxz` when `ecx`): branch when the counter is zero.
    Jrcxz {
        /// Test ECX rather than RCX.
        ecx: bool,
        /// Taken target.
        target: u64,
        /// Not-taken target.
        next: u64,
    },
    /// `ret` or `ret imm16`.
    Ret {
        /// Bytes popped after the return address.
        pop: u64,
    },
    /// `call *%reg`.
    CallIndirect {
        /// The register holding the target.
        reg: Gpr,
        /// The return address pushed.
        ret: u64,
    },
    /// `jmp *%reg`.
    JmpIndirect {
        /// The register holding the target.
        reg: Gpr,
    },
}

const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
const TF: u64 = 1 << 8;
const IF: u64 = 1 << 9;
const DF: u64 = 1 << 10;
const IOPL: u64 = 3 << 12;
const NT: u64 = 1 << 14;
const RF: u64 = 1 << 16;
const VM: u64 = 1 << 17;
const AC: u64 = 1 << 18;
const ID: u64 = 1 << 21;
/// The flags `popfq` loads in ring 0 (VM, VIF, VIP and RF are not loaded).
const POPF_MASK: u64 = CF | PF | AF | ZF | SF | TF | IF | DF | OF | IOPL | NT | AC | ID;

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

impl HostEmulation<Registers> for Emulation {
    fn apply(
        &self,
        regs: &mut Registers,
        stack: &mut dyn GuestStack,
    ) -> Result<(), EmulationError> {
        Emulation::apply(self, regs, stack)
    }

    fn touches_stack(&self) -> bool {
        Emulation::touches_stack(self)
    }

    fn opens_interrupt_shadow(&self) -> bool {
        Emulation::opens_interrupt_shadow(self)
    }
}

impl Emulation {
    /// Whether this instruction writes the guest stack (and may fail where the stack is not
    /// writable, which the engine then leaves to the real instruction).
    pub fn writes_stack(&self) -> bool {
        matches!(
            self,
            Emulation::Push { .. }
                | Emulation::Call { .. }
                | Emulation::Pushf { .. }
                | Emulation::CallIndirect { .. }
        )
    }

    /// Whether this instruction reads or writes the guest stack.
    pub fn touches_stack(&self) -> bool {
        self.writes_stack() || matches!(self, Emulation::Popf { .. } | Emulation::Ret { .. })
    }

    /// Whether the real instruction blocks interrupts for one instruction after it (`sti`).
    pub fn opens_interrupt_shadow(&self) -> bool {
        matches!(self, Emulation::Sti { .. })
    }

    /// Applies the instruction to `regs`, reading and writing the guest stack through
    /// `stack`. Nothing is changed in `regs` if a stack access fails.
    pub fn apply(
        &self,
        regs: &mut Registers,
        stack: &mut dyn GuestStack,
    ) -> Result<(), EmulationError> {
        fn push(
            regs: &mut Registers,
            stack: &mut dyn GuestStack,
            value: u64,
        ) -> Result<(), EmulationError> {
            let sp = regs.get(Gpr::Rsp).wrapping_sub(8);
            stack.write_u64(sp, value)?;
            regs.set(Gpr::Rsp, sp);
            Ok(())
        }
        match *self {
            Emulation::Nop { next } => regs.rip = next,
            Emulation::Push { reg, next } => {
                let v = regs.get(reg);
                push(regs, stack, v)?;
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
                push(regs, stack, ret)?;
                regs.rip = target;
            }
            Emulation::Jcc { cond, target, next } => {
                regs.rip = if condition_holds(cond, regs.rflags) {
                    target
                } else {
                    next
                };
            }
            Emulation::Pushf { next } => {
                let image = regs.rflags & !(RF | VM);
                push(regs, stack, image)?;
                regs.rip = next;
            }
            Emulation::Popf { next } => {
                let sp = regs.get(Gpr::Rsp);
                let image = stack.read_u64(sp)?;
                regs.rflags = (regs.rflags & !POPF_MASK & !RF) | (image & POPF_MASK) | 2;
                regs.set(Gpr::Rsp, sp.wrapping_add(8));
                regs.rip = next;
            }
            Emulation::Cli { next } => {
                regs.rflags &= !IF;
                regs.rip = next;
            }
            Emulation::Sti { next } => {
                regs.rflags |= IF;
                regs.rip = next;
            }
            Emulation::Loop { zf, target, next } => {
                let count = regs.get(Gpr::Rcx).wrapping_sub(1);
                regs.set(Gpr::Rcx, count);
                let zf_ok = zf.is_none_or(|want| (regs.rflags & ZF != 0) == want);
                regs.rip = if count != 0 && zf_ok { target } else { next };
            }
            Emulation::Jrcxz { ecx, target, next } => {
                let mut count = regs.get(Gpr::Rcx);
                if ecx {
                    count &= 0xffff_ffff;
                }
                regs.rip = if count == 0 { target } else { next };
            }
            Emulation::Ret { pop } => {
                let sp = regs.get(Gpr::Rsp);
                let target = stack.read_u64(sp)?;
                regs.set(Gpr::Rsp, sp.wrapping_add(8).wrapping_add(pop));
                regs.rip = target;
            }
            Emulation::CallIndirect { reg, ret } => {
                let target = regs.get(reg);
                push(regs, stack, ret)?;
                regs.rip = target;
            }
            Emulation::JmpIndirect { reg } => regs.rip = regs.get(reg),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A guest stack of 8-byte cells; addresses in `faulting` fail.
    #[derive(Default)]
    struct TestStack {
        cells: BTreeMap<u64, u64>,
        faulting: Option<u64>,
    }

    impl GuestStack for TestStack {
        fn read_u64(&mut self, va: u64) -> Result<u64, EmulationError> {
            if self.faulting == Some(va) {
                return Err(EmulationError::Stack {
                    va,
                    why: "not mapped".into(),
                });
            }
            Ok(self.cells.get(&va).copied().unwrap_or(0))
        }
        fn write_u64(&mut self, va: u64, value: u64) -> Result<(), EmulationError> {
            if self.faulting == Some(va) {
                return Err(EmulationError::Stack {
                    va,
                    why: "not mapped".into(),
                });
            }
            self.cells.insert(va, value);
            Ok(())
        }
    }

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

    fn run(e: Emulation, r: &mut Registers, stack: &mut TestStack) {
        e.apply(r, stack).unwrap();
    }

    #[test]
    fn push_and_call_write_the_stack_and_move_rsp() {
        let mut r = regs();
        let mut stack = TestStack::default();
        run(
            Emulation::Push {
                reg: Gpr::Rbp,
                next: 0x1001,
            },
            &mut r,
            &mut stack,
        );
        run(
            Emulation::Call {
                target: 0x2000,
                ret: 0x1006,
            },
            &mut r,
            &mut stack,
        );
        assert_eq!(
            stack.cells.into_iter().collect::<Vec<_>>(),
            vec![(0x7ff0, 0x1006), (0x7ff8, 0xbbbb)]
        );
        assert_eq!(r.get(Gpr::Rsp), 0x7ff0);
        assert_eq!(r.rip, 0x2000);
    }

    #[test]
    fn a_failed_stack_access_changes_nothing() {
        for e in [
            Emulation::Push {
                reg: Gpr::Rbp,
                next: 0x1001,
            },
            Emulation::Pushf { next: 0x1001 },
            Emulation::CallIndirect {
                reg: Gpr::Rax,
                ret: 0x1002,
            },
        ] {
            let mut r = regs();
            let before = r.clone();
            let mut stack = TestStack {
                faulting: Some(0x7ff8),
                ..Default::default()
            };
            assert!(e.apply(&mut r, &mut stack).is_err(), "{e:?}");
            assert_eq!(r, before, "{e:?}");
            assert!(e.writes_stack());
        }
        for e in [Emulation::Popf { next: 0x1001 }, Emulation::Ret { pop: 0 }] {
            let mut r = regs();
            let before = r.clone();
            let mut stack = TestStack {
                faulting: Some(0x8000),
                ..Default::default()
            };
            assert!(e.apply(&mut r, &mut stack).is_err(), "{e:?}");
            assert_eq!(r, before, "{e:?}");
        }
    }

    #[test]
    fn flag_instructions_follow_the_cpu() {
        let mut r = regs();
        r.rflags = 0x2 | IF | ZF | RF | TF;
        let mut stack = TestStack::default();
        run(Emulation::Pushf { next: 0x1001 }, &mut r, &mut stack);
        // RF is cleared in the image; TF and IF are the guest's own.
        assert_eq!(stack.cells[&0x7ff8], 0x2 | IF | ZF | TF);
        run(Emulation::Cli { next: 0x1002 }, &mut r, &mut stack);
        assert_eq!(r.rflags & IF, 0);
        stack.cells.insert(0x7ff8, CF | IF | VM | RF | 0x8000_0000);
        run(Emulation::Popf { next: 0x1003 }, &mut r, &mut stack);
        assert_eq!(r.rflags, 0x2 | CF | IF);
        assert_eq!(r.get(Gpr::Rsp), 0x8000);
        run(Emulation::Cli { next: 0x1004 }, &mut r, &mut stack);
        run(Emulation::Sti { next: 0x1005 }, &mut r, &mut stack);
        assert_eq!(r.rflags & IF, IF);
        assert_eq!(r.rip, 0x1005);
        assert!(Emulation::Sti { next: 0 }.opens_interrupt_shadow());
        assert!(!Emulation::Cli { next: 0 }.opens_interrupt_shadow());
    }

    #[test]
    fn loops_and_counter_branches() {
        let mut stack = TestStack::default();
        let lp = |zf| Emulation::Loop {
            zf,
            target: 0x900,
            next: 0x1002,
        };
        // (rcx, ZF set, kind) -> taken
        for (rcx, zf_set, kind, taken) in [
            (2u64, false, None, true),
            (1, false, None, false),
            (0, false, None, true), // wraps to u64::MAX
            (2, true, Some(true), true),
            (2, false, Some(true), false),
            (2, false, Some(false), true),
            (2, true, Some(false), false),
        ] {
            let mut r = regs();
            r.set(Gpr::Rcx, rcx);
            if zf_set {
                r.rflags |= ZF;
            }
            let flags = r.rflags;
            run(lp(kind), &mut r, &mut stack);
            assert_eq!(r.get(Gpr::Rcx), rcx.wrapping_sub(1));
            assert_eq!(r.rip == 0x900, taken, "rcx {rcx} zf {zf_set} {kind:?}");
            assert_eq!(r.rflags, flags);
        }
        for (rcx, ecx, taken) in [
            (0u64, false, true),
            (1 << 32, false, false),
            (1 << 32, true, true),
            (5, true, false),
        ] {
            let mut r = regs();
            r.set(Gpr::Rcx, rcx);
            run(
                Emulation::Jrcxz {
                    ecx,
                    target: 0x900,
                    next: 0x1002,
                },
                &mut r,
                &mut stack,
            );
            assert_eq!(r.rip == 0x900, taken, "rcx {rcx:#x} ecx {ecx}");
        }
    }

    #[test]
    fn returns_and_indirect_branches() {
        let mut stack = TestStack::default();
        stack.cells.insert(0x8000, 0xffff_ffff_8123_4567);
        let mut r = regs();
        run(Emulation::Ret { pop: 0x10 }, &mut r, &mut stack);
        assert_eq!(r.rip, 0xffff_ffff_8123_4567);
        assert_eq!(r.get(Gpr::Rsp), 0x8018);
        let mut r = regs();
        r.set(Gpr::R11, 0x4000);
        run(
            Emulation::CallIndirect {
                reg: Gpr::R11,
                ret: 0x1003,
            },
            &mut r,
            &mut stack,
        );
        assert_eq!((r.rip, r.get(Gpr::Rsp)), (0x4000, 0x7ff8));
        assert_eq!(stack.cells[&0x7ff8], 0x1003);
        // call *%rsp pushes after reading the target.
        let mut r = regs();
        run(
            Emulation::CallIndirect {
                reg: Gpr::Rsp,
                ret: 0x1002,
            },
            &mut r,
            &mut stack,
        );
        assert_eq!(r.rip, 0x8000);
        run(Emulation::JmpIndirect { reg: Gpr::Rbp }, &mut r, &mut stack);
        assert_eq!(r.rip, 0xbbbb);
    }

    #[test]
    fn sub_sets_flags_like_the_cpu() {
        let mut stack = TestStack::default();
        let mut r = regs();
        run(
            Emulation::SubRspImm {
                imm: 0x8000,
                next: 0x1004,
            },
            &mut r,
            &mut stack,
        );
        assert_eq!(r.get(Gpr::Rsp), 0);
        assert_eq!(r.rflags & (ZF | CF | SF), ZF);
        assert_eq!(r.rflags & PF, PF);
        let mut r = regs();
        run(
            Emulation::SubRspImm {
                imm: 0x8001,
                next: 0x1004,
            },
            &mut r,
            &mut stack,
        );
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
        run(
            Emulation::Jcc {
                cond: 4,
                target: 0x3000,
                next: 0x1002,
            },
            &mut r,
            &mut TestStack::default(),
        );
        assert_eq!(r.rip, 0x3000);
    }
}
