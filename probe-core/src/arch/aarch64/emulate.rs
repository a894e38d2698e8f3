//! Host-side emulation of the aarch64 instructions found at function entries and in
//! prologues, so that a hit on them costs one exit and needs no out-of-line slot: the hints
//! (`nop`, `bti`), register moves, `add`/`sub` of an immediate (with SP), the prologue's
//! `stp x29, x30, [sp, #-N]!`, and the PC-relative `b`, `bl`, `adr`, `adrp`. Addresses are
//! absolute, computed when the probe is planted.

use super::regs::{PSTATE_BTYPE, PSTATE_DAIF, Registers, uses};
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
    /// `b.cond target`: taken when `cond` holds for PSTATE.NZCV.
    BranchConditional {
        /// The condition (ARM encoding).
        cond: u8,
        /// The target.
        target: u64,
        /// Address of the next instruction.
        next: u64,
    },
    /// `cbz`/`cbnz Rt, target`.
    CompareBranch {
        /// The register (31 is XZR).
        rt: u8,
        /// 64-bit (else the low 32 bits are compared).
        wide: bool,
        /// Branch when non-zero (`cbnz`).
        nonzero: bool,
        /// The target.
        target: u64,
        /// Address of the next instruction.
        next: u64,
    },
    /// `tbz`/`tbnz Rt, #bit, target`.
    TestBranch {
        /// The register (31 is XZR).
        rt: u8,
        /// The bit tested.
        bit: u8,
        /// Branch when the bit is set (`tbnz`).
        set: bool,
        /// The target.
        target: u64,
        /// Address of the next instruction.
        next: u64,
    },
    /// `br Xn` / `blr Xn` / `ret {Xn}`: to the address in a register; `blr` links. `br` and
    /// `blr` set PSTATE.BTYPE as the hardware would for a BTI landing pad.
    BranchRegister {
        /// The register holding the target.
        rn: u8,
        /// Links (`blr`).
        link: bool,
        /// The BTYPE the branch leaves (0 for `ret`).
        btype: u8,
        /// The return address, for `blr`.
        ret: u64,
    },
    /// `ldr Wt|Xt, label` / `ldrsw Xt, label`: a load from an address computed at planting.
    LoadLiteral {
        /// The destination (31 is XZR).
        rt: u8,
        /// The address.
        address: u64,
        /// Bytes: 4 or 8.
        size: u8,
        /// Sign-extend a 4-byte load (`ldrsw`).
        signed: bool,
        /// Address of the next instruction.
        next: u64,
    },
    /// `mrs Xt, daif`: the interrupt mask as the guest has it at the hit. A slot runs with
    /// D, A, I and F masked, so a copy would read them all set (the first instruction of every
    /// inlined `local_irq_save`): Linux refuses to step it (`aarch64_insn_is_steppable`).
    ReadDaif {
        /// The destination (31 is XZR: nothing is written).
        rt: u8,
        /// Address of the next instruction.
        next: u64,
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
            Emulation::ReadDaif { rt, next } => {
                regs.set_x_or_zr(rt, regs.pstate & PSTATE_DAIF);
                regs.pc = next;
            }
            Emulation::BranchConditional { cond, target, next } => {
                regs.pc = if condition_holds(cond, regs.pstate) {
                    target
                } else {
                    next
                };
            }
            Emulation::CompareBranch {
                rt,
                wide,
                nonzero,
                target,
                next,
            } => {
                let v = regs.x_or_zr(rt);
                let v = if wide { v } else { v & 0xffff_ffff };
                regs.pc = if (v != 0) == nonzero { target } else { next };
            }
            Emulation::TestBranch {
                rt,
                bit,
                set,
                target,
                next,
            } => {
                let on = regs.x_or_zr(rt) >> bit & 1 == 1;
                regs.pc = if on == set { target } else { next };
            }
            Emulation::BranchRegister {
                rn,
                link,
                btype,
                ret,
            } => {
                let target = regs.x_or_zr(rn);
                if link {
                    regs.x[30] = ret;
                }
                regs.pc = target;
                regs.pstate = (regs.pstate & !PSTATE_BTYPE) | (u64::from(btype) << 10);
            }
            Emulation::LoadLiteral {
                rt,
                address,
                size,
                signed,
                next,
            } => {
                // Aligned 8-byte reads: a 4-byte literal is the half of its word it sits in.
                let word = stack.read_u64(address & !7)?;
                let v = if size == 8 {
                    word
                } else {
                    let half = (word >> ((address & 4) * 8)) & 0xffff_ffff;
                    if signed {
                        half as u32 as i32 as i64 as u64
                    } else {
                        half
                    }
                };
                regs.set_x_or_zr(rt, v);
                regs.pc = next;
            }
        }
        Ok(())
    }
}

/// Whether condition `cond` holds for the NZCV flags in `pstate` (Arm ARM, ConditionHolds).
pub fn condition_holds(cond: u8, pstate: u64) -> bool {
    let (n, z, c, v) = (
        pstate >> 31 & 1 == 1,
        pstate >> 30 & 1 == 1,
        pstate >> 29 & 1 == 1,
        pstate >> 28 & 1 == 1,
    );
    let base = match cond >> 1 {
        0 => z,
        1 => c,
        2 => n,
        3 => v,
        4 => c && !z,
        5 => n == v,
        6 => n == v && !z,
        _ => true,
    };
    // The low bit inverts, except for 0b1111 ("always" too).
    if cond & 1 == 1 && cond != 0xf {
        !base
    } else {
        base
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
        matches!(
            self,
            Emulation::StorePairPreIndex { .. } | Emulation::LoadLiteral { .. }
        )
    }

    /// The hints and the branches on an immediate move only the PC; `b.cond` reads the flags
    /// and `mrs Xt, daif` PSTATE; register 31 is SP for `add`/`sub` and a store's base (and
    /// XZR elsewhere, which is no register); a store pair translates its address (the kernel
    /// half for the stack, both halves for any other base) and a literal load the kernel
    /// half (it reads next to the kernel's own code); x30 where they link.
    fn registers_used(&self) -> u64 {
        let r = |n: u8| if n < 31 { 1u64 << n } else { 0 };
        let r_or_sp = |n: u8| if n < 31 { 1u64 << n } else { uses::SP };
        match *self {
            Emulation::Nop { .. } | Emulation::Branch { .. } => 0,
            Emulation::BranchConditional { .. } => uses::PSTATE,
            Emulation::MovRegister { rd, rm, .. } => r(rd) | r(rm),
            Emulation::AddImmediate { rd, rn, .. } => r_or_sp(rd) | r_or_sp(rn),
            Emulation::StorePairPreIndex { rt, rt2, rn, .. } => {
                let space = if rn == 31 {
                    uses::KERNEL_SPACE
                } else {
                    uses::KERNEL_SPACE | uses::USER_SPACE
                };
                r(rt) | r(rt2) | r_or_sp(rn) | space
            }
            Emulation::BranchLink { .. } => r(30),
            Emulation::CompareBranch { rt, .. } | Emulation::TestBranch { rt, .. } => r(rt),
            // `br`/`blr` leave a branch type in PSTATE for the target's landing pad.
            Emulation::BranchRegister {
                rn, link, btype, ..
            } => r(rn) | if link { r(30) } else { 0 } | if btype != 0 { uses::PSTATE } else { 0 },
            Emulation::LoadLiteral { rt, .. } => r(rt) | uses::KERNEL_SPACE,
            // `mrs xzr, daif` reads nothing anyone sees.
            Emulation::ReadDaif { rt, .. } if rt < 31 => r(rt) | uses::PSTATE,
            Emulation::ReadDaif { .. } => 0,
            Emulation::SetRegister { rd, .. } => r(rd),
        }
    }

    /// The destinations of moves, `add`/`sub`, `adr`/`adrp`, literal loads and `mrs`, and the
    /// link register of `bl`/`blr`, where the instruction does not read them too.
    fn registers_overwritten(&self) -> u64 {
        let r = |n: u8| if n < 31 { 1u64 << n } else { 0 };
        match *self {
            Emulation::MovRegister { rd, rm, .. } => r(rd) & !r(rm),
            Emulation::AddImmediate { rd, rn, .. } if rd != rn => r(rd),
            Emulation::SetRegister { rd, .. } => r(rd),
            Emulation::LoadLiteral { rt, .. } | Emulation::ReadDaif { rt, .. } => r(rt),
            Emulation::BranchLink { .. } => r(30),
            Emulation::BranchRegister { rn, link: true, .. } => r(30) & !r(rn),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // Classification and emulation together: each case decodes a word, then runs it.
    use crate::arch::aarch64::decode::*;
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

    /// Every emulated instruction, applied once with every register and once with only those
    /// it says it uses (the rest, and those it overwrites, garbage as an unread register
    /// would be): the same results in what it uses, the rest untouched.
    #[test]
    fn an_emulation_needs_nothing_beyond_the_registers_it_says_it_uses() {
        const GARBAGE: u64 = 0xdead_beef_dead_beef;
        for word in [
            0xd503_201f, // nop
            0xd503_245f, // bti c
            0x17ff_fffe, // b
            0x5400_0040, // b.eq
            0xd100_83ff, // sub sp, sp, #0x20
            0xaa1e_03e9, // mov x9, x30
            0xaa09_03e9, // mov x9, x9
            0x9400_0040, // bl
            0x35ff_ffe3, // cbnz w3
            0xd65f_03c0, // ret
            0xd63f_0100, // blr x8
            0xb000_0000, // adrp x0
            0x9800_0041, // ldrsw x1, literal
            0xa9bf_7bfd, // stp x29, x30, [sp, #-16]!
            0xa981_0861, // stp x1, x2, [x3, #16]!
            0x9100_03fd, // mov x29, sp
            0x9100_2021, // add x1, x1, #8
            0x9100_2022, // add x2, x1, #8
            MRS_DAIF | 19,
        ] {
            let emu = classify(word, PC).unwrap_or_else(|| panic!("{word:#x} not emulated"));
            let used = emu.registers_used();
            let overwritten = emu.registers_overwritten();
            assert_eq!(overwritten & !used, 0, "{word:#x}: overwrites what it uses");
            let mut full = Registers {
                sp: 0xffff_8000_0000_8000,
                pc: PC,
                pstate: 0x6000_0005,
                ..Default::default()
            };
            for (n, x) in full.x.iter_mut().enumerate() {
                *x = 0xffff_8000_0001_0000 + n as u64 * 0x100;
            }
            let mut partial = full.clone();
            let read = used & !overwritten;
            for (n, x) in partial.x.iter_mut().enumerate() {
                if read & (1 << n) == 0 {
                    *x = GARBAGE;
                }
            }
            if used & uses::SP == 0 {
                partial.sp = GARBAGE;
            }
            if used & uses::PSTATE == 0 {
                partial.pstate = GARBAGE & !PSTATE_BTYPE;
            }
            let (mut a, mut b) = (Stack(HashMap::new(), None), Stack(HashMap::new(), None));
            emu.apply(&mut full, &mut a).unwrap();
            emu.apply(&mut partial, &mut b).unwrap();
            assert_eq!(a.0, b.0, "{word:#x}: memory");
            assert_eq!(full.pc, partial.pc, "{word:#x}: pc");
            for n in 0..31 {
                let want = if used & (1 << n) != 0 {
                    full.x[n]
                } else {
                    GARBAGE
                };
                assert_eq!(partial.x[n], want, "{word:#x}: x{n}");
            }
            if used & uses::SP != 0 {
                assert_eq!(partial.sp, full.sp, "{word:#x}: sp");
            } else {
                assert_eq!(partial.sp, GARBAGE, "{word:#x}: sp");
            }
            if used & uses::PSTATE != 0 {
                assert_eq!(partial.pstate, full.pstate, "{word:#x}: pstate");
            } else {
                assert_eq!(partial.pstate, GARBAGE & !PSTATE_BTYPE, "{word:#x}: pstate");
            }
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
    fn mrs_daif_reads_the_mask_the_guest_had_at_the_hit() {
        // mrs x19, daif with interrupts on (and NZCV set, which DAIF does not show), then with
        // I masked; mrs xzr, daif writes nothing and needs no general register.
        let mut r = Registers {
            pstate: 0xf000_0005,
            pc: PC,
            ..Default::default()
        };
        r.x[19] = 0xdead;
        run(MRS_DAIF | 19, &mut r);
        assert_eq!((r.x[19], r.pc), (0, PC + 4));
        r.pstate |= 0x80;
        r.pc = PC;
        run(MRS_DAIF | 19, &mut r);
        assert_eq!(r.x[19], 0x80);
        let before = r.x;
        let discard = classify(MRS_DAIF | 31, PC).unwrap();
        assert_eq!(discard.registers_used(), 0);
        discard
            .apply(&mut r, &mut Stack(HashMap::new(), None))
            .unwrap();
        assert_eq!(r.x, before);
        // mrs x0, nzcv and mrs x0, tpidr_el1 are not emulated: a slot leaves them unchanged.
        assert_eq!(classify(0xd53b_4200, PC), None);
        assert_eq!(classify(0xd538_d080, PC), None);
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
        // ldr x0, [x1]; adds x0, x0, #1 (sets flags); svc #0; retaa
        for w in [0xf940_0020, 0xb100_0400, 0xd400_0001, 0xd65f_0bff] {
            assert_eq!(classify(w, PC), None, "{w:#x}");
        }
    }

    #[test]
    fn branches_follow_the_flags_and_registers() {
        let st = &mut Stack(HashMap::new(), None);
        // b.eq +8 with Z set, then clear.
        let mut r = Registers {
            pstate: 1 << 30,
            ..Default::default()
        };
        classify(0x5400_0040, PC)
            .unwrap()
            .apply(&mut r, st)
            .unwrap();
        assert_eq!(r.pc, PC + 8);
        r.pstate = 0;
        classify(0x5400_0040, PC)
            .unwrap()
            .apply(&mut r, st)
            .unwrap();
        assert_eq!(r.pc, PC + 4);
        // cbnz w3, -4 ; tbz x2, #33, +0x10
        r.x[3] = 0x1_0000_0000;
        classify(0x35ff_ffe3, PC)
            .unwrap()
            .apply(&mut r, st)
            .unwrap();
        assert_eq!(r.pc, PC + 4, "cbnz looks at w3 only");
        r.x[2] = 1 << 33;
        classify(0xb608_0082, PC)
            .unwrap()
            .apply(&mut r, st)
            .unwrap();
        assert_eq!(r.pc, PC + 4, "bit 33 set: tbz falls through");
        // blr x8 links and leaves BTYPE 0b10; ret goes to x30.
        r.x[8] = 0x1234;
        classify(0xd63f_0100, PC)
            .unwrap()
            .apply(&mut r, st)
            .unwrap();
        assert_eq!((r.pc, r.x[30], r.pstate >> 10 & 3), (0x1234, PC + 4, 2));
        classify(0xd65f_03c0, PC)
            .unwrap()
            .apply(&mut r, st)
            .unwrap();
        assert_eq!(r.pc, PC + 4);
        // ldrsw x1, +8 reads the literal's high half sign-extended.
        st.0.insert((PC + 8) & !7, 0xfff0_0000_0000_0000 | 0x8000_0000_0000_0000);
        let ldrsw = classify(0x9800_0041, PC).unwrap();
        assert!(ldrsw.touches_stack());
        ldrsw.apply(&mut r, st).unwrap();
        assert_eq!(
            r.x[1],
            if (PC + 8) & 4 == 4 {
                0xffff_ffff_fff0_0000
            } else {
                0
            }
        );
        // Conditions: ge with N == V, lt otherwise, al always.
        assert!(condition_holds(0b1010, 0));
        assert!(!condition_holds(0b1011, 0));
        assert!(condition_holds(0b1110, 0));
    }

    #[test]
    fn the_exclusive_monitor_window_is_found_looking_back() {
        let code = |ws: &[u32]| ws.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
        // 1: ldaxr x0, [x1]; add x0, x0, #1; stlxr w2, x0, [x1]; cbnz w2, 1b
        let loop_ = [0xc85f_fc20, 0x9100_0400, 0xc802_fc20, 0x3500_0002];
        assert_eq!(exclusive_window(&code(&loop_[..1])), Some(4), "the add");
        assert_eq!(exclusive_window(&code(&loop_[..2])), Some(8), "the stlxr");
        assert_eq!(exclusive_window(&code(&loop_[..3])), None, "the cbnz");
        assert_eq!(exclusive_window(&code(&[0x9100_0400])), None);
        // clrex closes it.
        assert_eq!(exclusive_window(&code(&[0xc85f_fc20, 0xd503_3f5f])), None);
        // try_to_wake_up's smp_cond_load_acquire (__cmpwait): sevl; wfe; ldxr w0, [x20];
        // eor w0, w0, w3; cbnz w0, 1f; wfe; 1: ldar w3, [x20]; cbnz w3, <back>; ...; blr x3.
        // The eor and cbnz are in the window; past the wfe (the monitor only armed it) and
        // past a call, nothing is.
        let wait = [
            0xd503_20bf,
            0xd503_205f,
            0x885f_7e80,
            0x4a03_0000,
            0x3500_0040,
            0xd503_205f,
            0x88df_fe83,
            0x35ff_ff03,
            0xd63f_0060,
        ];
        assert_eq!(exclusive_window(&code(&wait[..3])), Some(4), "the eor");
        assert_eq!(exclusive_window(&code(&wait[..4])), Some(8), "the cbnz");
        assert_eq!(
            exclusive_window(&code(&wait[..6])),
            None,
            "the ldar after wfe"
        );
        assert_eq!(exclusive_window(&code(&wait[..9])), None, "after the blr");
        // b, bl, ret and br close it too; b.cond and cbz do not.
        for closer in [0x1400_0004, 0x9400_0004, 0xd65f_03c0, 0xd61f_0060] {
            assert_eq!(
                exclusive_window(&code(&[0xc85f_fc20, closer])),
                None,
                "{closer:#x}"
            );
        }
        for open in [0x5400_0040u32, 0xb400_0040] {
            assert_eq!(
                exclusive_window(&code(&[0xc85f_fc20, open])),
                Some(8),
                "{open:#x}"
            );
        }
    }

    #[test]
    fn what_may_run_out_of_line_and_what_is_refused() {
        // ldr x0, [x1]; add x0, x1, x2; mrs x0, sp_el0; dmb ish; ldar x0, [x1]
        for w in [
            0xf940_0020,
            0x8b02_0020,
            0xd538_4100,
            0xd503_3bbf,
            0xc8df_fc20,
        ] {
            assert_eq!(out_of_line(w), Ok(()), "{w:#x}");
        }
        // svc #0; eret; wfi; msr daifset, #2; ldxr x0, [x1]; stxr w2, x0, [x1]; clrex; msr
        // sp_el0, x0
        for w in [
            0xd400_0001,
            0xd69f_03e0,
            0xd503_207f,
            0xd503_42df,
            0xc85f_7c20,
            0xc802_7c20,
            0xd503_3f5f,
            0xd518_4100,
        ] {
            assert!(out_of_line(w).is_err(), "{w:#x}");
        }
        // dc civac, x0; ic ivau, x0; tlbi vmalle1is; at s1e1r, x0 (as Linux steps them); casp
        // x0, x1, x2, x3, [x4] and caspal, single atomics that open no exclusive window.
        for w in [
            0xd50b_7e20,
            0xd50b_7520,
            0xd508_831f,
            0xd508_7800,
            0x4820_7c82,
            0x4860_fc82,
        ] {
            assert_eq!(out_of_line(w), Ok(()), "{w:#x}");
        }
        let code = |ws: &[u32]| ws.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(exclusive_window(&code(&[0x4860_fc82])), None);
        // ldr q0, ldr d0 and ldr s0 of a literal: PC-relative FP/SIMD loads, refused by name.
        for w in [0x9c00_0040u32, 0x5c00_0040, 0x1c00_0040] {
            assert!(out_of_line(w).unwrap_err().contains("FP/SIMD"), "{w:#x}");
        }
        // msr tpidr_el1, x0 stays refused.
        assert!(out_of_line(0xd518_d080).unwrap_err().contains("msr"));
        // The PAC hints (with pointer authentication they step); yield and csdb are NOPs.
        for w in [
            0xd503_211f,
            0xd503_215f,
            0xd503_219f,
            0xd503_231f,
            0xd503_23df,
        ] {
            assert!(is_pac_hint(w), "{w:#x}");
            assert_eq!(out_of_line(w), Ok(()), "{w:#x}");
            assert_eq!(classify(w, PC), Some(Emulation::Nop { next: PC + 4 }));
        }
        for w in [0xd503_203f, 0xd503_229f] {
            assert!(!is_pac_hint(w));
            assert_eq!(classify(w, PC), Some(Emulation::Nop { next: PC + 4 }));
        }
        // udf #0, the padding between functions, is named as such.
        assert!(out_of_line(0).unwrap_err().contains("padding"));
        assert!(
            out_of_line(0x0001_0000)
                .unwrap_err()
                .contains("unallocated")
        );
    }

    #[test]
    fn only_hints_plain_branches_and_sp_arithmetic_leave_x0_to_x30_alone() {
        use crate::arch::HostEmulation;
        let used = |w: u32| classify(w, PC).unwrap().registers_used();
        // nop, bti c, paciasp, b: the PC only; b.eq the flags; sub sp, sp, #0x20 the SP.
        for (w, want) in [
            (0xd503_201f, 0),
            (0xd503_245f, 0),
            (0xd503_233f, 0),
            (0x17ff_fffe, 0),
            (0x5400_0040, uses::PSTATE),
            (0xd100_83ff, uses::SP),
        ] {
            assert_eq!(used(w), want, "{w:#x}");
        }
        let bits = |rs: &[u32]| rs.iter().map(|r| 1u64 << r).sum::<u64>();
        // mov x9, x30; bl; cbnz w3; ret; adrp x0; ldrsw x1 literal (kernel half); stp x29,
        // x30, [sp]! (SP, kernel half); stp x1, x2, [x3, #16]! (either half); mov x29, sp;
        // sub wsp, w1 (on the safe side, the 32-bit form, no kernel prologue's).
        for (w, regs) in [
            (0xaa1e_03e9, bits(&[9, 30])),
            (0x9400_0040, bits(&[30])),
            (0x35ff_ffe3, bits(&[3])),
            (0xd65f_03c0, bits(&[30])),
            (0xb000_0000, bits(&[0])),
            (0x9800_0041, bits(&[1]) | uses::KERNEL_SPACE),
            (0xa9bf_7bfd, bits(&[29, 30]) | uses::SP | uses::KERNEL_SPACE),
            (
                0xa981_0861,
                bits(&[1, 2, 3]) | uses::KERNEL_SPACE | uses::USER_SPACE,
            ),
            (0x9100_03fd, bits(&[29]) | uses::SP),
            (0x5100_83ff, uses::SP),
        ] {
            assert_eq!(used(w), regs, "{w:#x}");
        }
    }
}
