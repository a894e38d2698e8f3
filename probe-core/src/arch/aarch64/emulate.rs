//! Host-side emulation of the aarch64 instructions found at function entries and in
//! prologues, so that a hit on them costs one exit and needs no out-of-line slot: the hints
//! (`nop`, `bti`), register moves, `add`/`sub` of an immediate (with SP), the prologue's
//! `stp x29, x30, [sp, #-N]!`, and the PC-relative `b`, `bl`, `adr`, `adrp`. Addresses are
//! absolute, computed when the probe is planted.

use super::regs::Registers;
use crate::arch::{EmulationError, GuestStack, HostEmulation};

/// An instruction the host emulates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emulation {
    /// `nop` or a BTI landing pad: the PC moves on.
    Nop {
        /// Address of the next instruction.
        next: u64,
    },
    /// `mov Xd, Xm` / `mov Wd, Wm` (ORR with the zero register); register 31 is XZR.
    MovRegister {
        /// Destination.
        rd: u8,
        /// Source.
        rm: u8,
        /// 64-bit (else the 32-bit result is zero-extended).
        wide: bool,
        /// Address of the next instruction.
        next: u64,
    },
    /// `add`/`sub` of an immediate, not setting flags; register 31 is SP.
    AddImmediate {
        /// Destination.
        rd: u8,
        /// Source.
        rn: u8,
        /// The immediate, negative for `sub`.
        imm: i64,
        /// 64-bit.
        wide: bool,
        /// Address of the next instruction.
        next: u64,
    },
    /// `stp Xt, Xt2, [Xn|SP, #imm]!` (64-bit, pre-index with write-back).
    StorePairPreIndex {
        /// First register (31 is XZR).
        rt: u8,
        /// Second register (31 is XZR).
        rt2: u8,
        /// Base (31 is SP).
        rn: u8,
        /// Byte offset.
        offset: i64,
        /// Address of the next instruction.
        next: u64,
    },
    /// `b target`.
    Branch {
        /// The target.
        target: u64,
    },
    /// `bl target`: x30 gets the return address.
    BranchLink {
        /// The target.
        target: u64,
        /// The return address (the next instruction).
        ret: u64,
    },
    /// `adr`/`adrp`: a register gets an address computed at planting.
    SetRegister {
        /// Destination (31 is XZR: nothing is written).
        rd: u8,
        /// The value.
        value: u64,
        /// Address of the next instruction.
        next: u64,
    },
}

impl Registers {
    /// Register `n`, 31 reading as zero (XZR).
    fn x_or_zr(&self, n: u8) -> u64 {
        self.x.get(usize::from(n)).copied().unwrap_or(0)
    }

    /// Register `n`, 31 reading as SP.
    fn x_or_sp(&self, n: u8) -> u64 {
        if n == 31 { self.sp } else { self.x_or_zr(n) }
    }

    /// Writes register `n`, 31 discarding (XZR).
    fn set_x_or_zr(&mut self, n: u8, v: u64) {
        if let Some(r) = self.x.get_mut(usize::from(n)) {
            *r = v;
        }
    }

    /// Writes register `n`, 31 writing SP.
    fn set_x_or_sp(&mut self, n: u8, v: u64) {
        if n == 31 {
            self.sp = v;
        } else {
            self.set_x_or_zr(n, v);
        }
    }
}

impl Emulation {
    /// Applies the instruction to `regs`, writing the guest stack through `stack`. Nothing is
    /// changed in `regs` if a stack access fails.
    pub fn apply(
        &self,
        regs: &mut Registers,
        stack: &mut dyn GuestStack,
    ) -> Result<(), EmulationError> {
        match *self {
            Emulation::Nop { next } => regs.pc = next,
            Emulation::MovRegister { rd, rm, wide, next } => {
                let v = regs.x_or_zr(rm);
                regs.set_x_or_zr(rd, if wide { v } else { v & 0xffff_ffff });
                regs.pc = next;
            }
            Emulation::AddImmediate {
                rd,
                rn,
                imm,
                wide,
                next,
            } => {
                let v = regs.x_or_sp(rn).wrapping_add(imm as u64);
                regs.set_x_or_sp(rd, if wide { v } else { v & 0xffff_ffff });
                regs.pc = next;
            }
            Emulation::StorePairPreIndex {
                rt,
                rt2,
                rn,
                offset,
                next,
            } => {
                let addr = regs.x_or_sp(rn).wrapping_add(offset as u64);
                let (a, b) = (regs.x_or_zr(rt), regs.x_or_zr(rt2));
                stack.write_u64(addr, a)?;
                stack.write_u64(addr.wrapping_add(8), b)?;
                regs.set_x_or_sp(rn, addr);
                regs.pc = next;
            }
            Emulation::Branch { target } => regs.pc = target,
            Emulation::BranchLink { target, ret } => {
                regs.x[30] = ret;
                regs.pc = target;
            }
            Emulation::SetRegister { rd, value, next } => {
                regs.set_x_or_zr(rd, value);
                regs.pc = next;
            }
        }
        Ok(())
    }
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
        matches!(self, Emulation::StorePairPreIndex { .. })
    }
}

fn sign_extend(v: u64, bits: u32) -> i64 {
    ((v << (64 - bits)) as i64) >> (64 - bits)
}

/// The emulation of `word` at `pc`, if it is one of the emulated instructions.
pub fn classify(word: u32, pc: u64) -> Option<Emulation> {
    let next = pc.wrapping_add(4);
    let w = u64::from(word);
    let rd = (word & 0x1f) as u8;
    let rn = ((word >> 5) & 0x1f) as u8;
    // Hints: nop, and the BTI landing pads (bti, bti c, bti j, bti jc).
    if word == 0xd503_201f || word & 0xffff_ff3f == 0xd503_241f {
        return Some(Emulation::Nop { next });
    }
    // The pointer-authentication hints on the return address (paciasp, pacibsp, autiasp,
    // autibsp, xpaclri): NOPs to a CPU without pointer authentication, which hvprobe's VMM
    // gives its guests (it never asks KVM for KVM_ARM_VCPU_PTRAUTH_*).
    if matches!(
        word,
        0xd503_233f | 0xd503_237f | 0xd503_23bf | 0xd503_23ff | 0xd503_20ff
    ) {
        return Some(Emulation::Nop { next });
    }
    // mov Xd, Xm = orr Xd, xzr, Xm (no shift); the 32-bit form too.
    if word & 0x7fe0_ffe0 == 0x2a00_03e0 {
        return Some(Emulation::MovRegister {
            rd,
            rm: ((word >> 16) & 0x1f) as u8,
            wide: word >> 31 == 1,
            next,
        });
    }
    // add/sub (immediate), not setting flags: sf op 0 100010 sh imm12 Rn Rd.
    if word & 0x3f80_0000 == 0x1100_0000 {
        let shift = if word & (1 << 22) != 0 { 12 } else { 0 };
        let imm = (((word >> 10) & 0xfff) as i64) << shift;
        return Some(Emulation::AddImmediate {
            rd,
            rn,
            imm: if word & (1 << 30) != 0 { -imm } else { imm },
            wide: word >> 31 == 1,
            next,
        });
    }
    // stp (64-bit, pre-index): 10 101 0 011 0 imm7 Rt2 Rn Rt.
    if word & 0xffc0_0000 == 0xa980_0000 {
        return Some(Emulation::StorePairPreIndex {
            rt: rd,
            rt2: ((word >> 10) & 0x1f) as u8,
            rn,
            offset: sign_extend((w >> 15) & 0x7f, 7) * 8,
            next,
        });
    }
    // b / bl imm26.
    if word & 0x7c00_0000 == 0x1400_0000 {
        let target = pc.wrapping_add((sign_extend(w & 0x03ff_ffff, 26) * 4) as u64);
        return Some(if word >> 31 == 1 {
            Emulation::BranchLink { target, ret: next }
        } else {
            Emulation::Branch { target }
        });
    }
    // adr / adrp: op immlo 10000 immhi Rd.
    if word & 0x1f00_0000 == 0x1000_0000 {
        let imm = sign_extend(((w >> 5) & 0x7_ffff) << 2 | ((w >> 29) & 3), 21);
        let value = if word >> 31 == 1 {
            (pc & !0xfff).wrapping_add((imm << 12) as u64)
        } else {
            pc.wrapping_add(imm as u64)
        };
        return Some(Emulation::SetRegister { rd, value, next });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const PC: u64 = 0xffff_8000_080b_44f0;

    struct Stack(HashMap<u64, u64>, Option<u64>);
    impl GuestStack for Stack {
        fn read_u64(&mut self, va: u64) -> Result<u64, EmulationError> {
            Ok(*self.0.get(&va).unwrap_or(&0))
        }
        fn write_u64(&mut self, va: u64, value: u64) -> Result<(), EmulationError> {
            if Some(va) == self.1 {
                return Err(EmulationError::Stack {
                    va,
                    why: "guard".into(),
                });
            }
            self.0.insert(va, value);
            Ok(())
        }
    }

    fn run(word: u32, regs: &mut Registers) -> Stack {
        let mut s = Stack(HashMap::new(), None);
        classify(word, PC)
            .unwrap_or_else(|| panic!("{word:#x} not emulated"))
            .apply(regs, &mut s)
            .unwrap();
        s
    }

    #[test]
    fn prologue_instructions_run_on_the_host() {
        let mut r = Registers {
            sp: 0x8000,
            pc: PC,
            ..Default::default()
        };
        r.x[30] = 0xabcd;
        r.x[29] = 0x1111;
        // mov x9, x30 (ftrace's patchable entry)
        run(0xaa1e_03e9, &mut r);
        assert_eq!((r.x[9], r.pc), (0xabcd, PC + 4));
        // stp x29, x30, [sp, #-16]!
        r.pc = PC;
        let s = run(0xa9bf_7bfd, &mut r);
        assert_eq!(r.sp, 0x7ff0);
        assert_eq!((s.0[&0x7ff0], s.0[&0x7ff8]), (0x1111, 0xabcd));
        // mov x29, sp (add x29, sp, #0)
        run(0x9100_03fd, &mut r);
        assert_eq!(r.x[29], 0x7ff0);
        // sub sp, sp, #0x20 ; add sp, sp, #1, lsl #12
        run(0xd100_83ff, &mut r);
        assert_eq!(r.sp, 0x7fd0);
        run(0x9140_07ff, &mut r);
        assert_eq!(r.sp, 0x8fd0);
        // mov w0, w1 zero-extends; a write to xzr is dropped.
        r.x[1] = 0xffff_ffff_1234_5678;
        run(0x2a01_03e0, &mut r);
        assert_eq!(r.x[0], 0x1234_5678);
        run(0xaa01_03ff, &mut r);
        // bl +0x100 / b -8
        r.pc = PC;
        run(0x9400_0040, &mut r);
        assert_eq!((r.pc, r.x[30]), (PC + 0x100, PC + 4));
        let mut r2 = Registers::default();
        classify(0x17ff_fffe, PC)
            .unwrap()
            .apply(&mut r2, &mut Stack(HashMap::new(), None))
            .unwrap();
        assert_eq!(r2.pc, PC - 8);
        // adrp x0, #0x1000 ; adr x1, #-4
        let mut r3 = Registers::default();
        let mut st = Stack(HashMap::new(), None);
        classify(0xb000_0000, PC)
            .unwrap()
            .apply(&mut r3, &mut st)
            .unwrap();
        assert_eq!(r3.x[0], (PC & !0xfff) + 0x1000);
        classify(0x10ff_ffe1, PC)
            .unwrap()
            .apply(&mut r3, &mut st)
            .unwrap();
        assert_eq!(r3.x[1], PC - 4);
    }

    #[test]
    fn a_failed_stack_write_changes_nothing_and_others_are_not_emulated() {
        let mut r = Registers {
            sp: 0x8000,
            pc: PC,
            ..Default::default()
        };
        let before = r.clone();
        let mut s = Stack(HashMap::new(), Some(0x7ff0));
        let e = classify(0xa9bf_7bfd, PC).unwrap();
        assert!(e.touches_stack());
        assert!(e.apply(&mut r, &mut s).is_err());
        assert_eq!(r, before);
        // paciasp is a NOP here (no pointer authentication in hvprobe's guests).
        assert_eq!(
            classify(0xd503_233f, PC),
            Some(Emulation::Nop { next: PC + 4 })
        );
        // ldr x0, [x1]; adds x0, x0, #1 (sets flags); ret; svc #0
        for w in [0xf940_0020, 0xb100_0400, 0xd65f_03c0, 0xd400_0001] {
            assert_eq!(classify(w, PC), None, "{w:#x}");
        }
    }
}
