//! The aarch64 jump plan: one instruction replaced by `b` into a trampoline that runs from an
//! alias of the XOL code pages inside the kernel image's freed init range
//! (`[__init_begin, __init_end)`: unmapped by `free_initmem`, its virtual range never reused,
//! within `b`'s 128 MiB of all core kernel text; see [`super::xol::map_jump_code`]). Every
//! instruction is 4 bytes, so a branch over one is always whole and, with every vCPU out of
//! `KVM_RUN`, no saved PC can be inside it.
//!
//! The trampoline, generated per site from a fixed template (about thirty A64 forms, encoded
//! by [`Emitter`] and disassembled back with capstone in the tests):
//!
//! ```text
//!   stp x29, x30, [sp, #-16]!; mov x29, sp     a frame record the guest's unwinder walks
//!   sub sp, sp, #256; x0-x28, NZCV and DAIF saved below it
//!   msr daifset, #3                            IRQ and FIQ off while recording
//!   ring = rings + [TPIDR_EL1 + cpu_number] * stride   (no ring for that CPU: counted)
//!   ++nesting == 1 and the ring not full, else count the hit as missed and skip
//!   record: tag, CNTVCT_EL0, x0-x30, SP, PC = the site, NZCV|DAIF|EL1h, SP_EL0 (current)
//!           and its pid/tgid/comm, stack words from SP up to the end of the task's stack
//!           (or of SP's page on another stack), each word's bit in the flags
//!   head published with a store-release; --nesting
//!   NZCV, DAIF, x0-x28 restored; add sp, sp, #256; ldp x29, x30, [sp], #16
//!   the displaced instruction (copied, or re-expressed if PC-relative); b site+4
//! ```
//!
//! No guest function is called. Every read is of the current CPU's per-CPU area, the current
//! task, or the current stack within bounds: none can fault. The shared per-site counters are
//! bumped with a load/store-exclusive loop (no LSE needed); the plan never puts a jump inside a
//! guest exclusive-monitor window (the decoder refuses those sites for every plan).

use crate::arch::StepPlan;
use crate::arch::aarch64::{Emulation, Instruction, OutOfLine};
use crate::definition::TaskFilter;
use crate::jump::{
    FLAG_TASK, FilterTest, JumpPatch, RECORD_SIZE, RING_HEADER, RingLayout, STACK_WORDS,
    TrampolineSpec, header, record,
};

/// Bytes below the frame record where x0-x28, NZCV and DAIF are saved.
const SAVE_AREA: u32 = 256;
/// Where NZCV and DAIF are saved, from SP.
const SAVED_FLAGS: i32 = 232;
/// PSTATE.M for EL1 with SP_EL1: the mode a hit in the kernel is in.
const EL1H: u64 = 0b0101;

/// Register roles in the template (all saved first).
const TMP0: u8 = 0;
const TMP1: u8 = 1;
const TMP2: u8 = 2;
const RING: u8 = 3;
const REC: u8 = 4;
const LIMIT: u8 = 5;
const HIT_SP: u8 = 6;
const INDEX: u8 = 7;
const FLAGS: u8 = 9;
const T10: u8 = 10;
const T11: u8 = 11;
const T12: u8 = 12;
const FP: u8 = 29;
const LR: u8 = 30;
/// Register 31 as a base: SP; as an operand: the zero register.
const SP: u8 = 31;
const ZR: u8 = 31;

/// Condition codes.
const NE: u8 = 1;
const HS: u8 = 2;
const LO: u8 = 3;
const HI: u8 = 8;

/// System registers, as MRS/MSR encode them (op0 bit, op1, CRn, CRm, op2 in bits 19:5).
const NZCV: u32 = 0x1b_4200;
const DAIF: u32 = 0x1b_4220;
const TPIDR_EL1: u32 = 0x18_d080;
const SP_EL0: u32 = 0x18_4100;
const CNTVCT_EL0: u32 = 0x1b_e040;

/// A branch waiting for its label: the word's index and how its offset is encoded.
#[derive(Clone, Copy)]
enum Field {
    /// `b`/`bl`: imm26 at bits 25:0.
    Imm26,
    /// `b.cond`, `cbz`, `cbnz`: imm19 at bits 23:5.
    Imm19,
}

/// A small A64 encoder for the trampoline's instruction forms.
#[derive(Default)]
struct Emitter {
    words: Vec<u32>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, usize, Field)>,
}

impl Emitter {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    fn bind(&mut self, l: usize) {
        self.labels[l] = Some(self.words.len());
    }

    fn put(&mut self, w: u32) {
        self.words.push(w);
    }

    /// `movz`/`movk` loading `value` into `xd` (as few halfwords as it needs).
    fn mov64(&mut self, rd: u8, value: u64) {
        let halves: Vec<(u32, u32)> = (0..4u32)
            .map(|hw| (hw, ((value >> (16 * hw)) & 0xffff) as u32))
            .filter(|&(_, half)| half != 0)
            .collect();
        if halves.is_empty() {
            self.put(0xd280_0000 | u32::from(rd));
        }
        for (i, (hw, half)) in halves.into_iter().enumerate() {
            let op = if i == 0 { 0xd280_0000 } else { 0xf280_0000 };
            self.put(op | (hw << 21) | (half << 5) | u32::from(rd));
        }
    }

    /// `add`/`sub` (immediate, 64-bit, no flags) `xd|sp, xn|sp, #imm` (imm < 4096).
    fn add_imm(&mut self, rd: u8, rn: u8, imm: i32) {
        let (op, v) = if imm < 0 {
            (0xd100_0000, (-imm) as u32)
        } else {
            (0x9100_0000, imm as u32)
        };
        debug_assert!(v < 4096);
        self.put(op | (v << 10) | (u32::from(rn) << 5) | u32::from(rd));
    }

    /// `add`/`sub` (immediate, 32-bit) `wd, wn, #imm`.
    fn add_imm32(&mut self, rd: u8, rn: u8, imm: i32) {
        let (op, v) = if imm < 0 {
            (0x5100_0000, (-imm) as u32)
        } else {
            (0x1100_0000, imm as u32)
        };
        self.put(op | (v << 10) | (u32::from(rn) << 5) | u32::from(rd));
    }

    /// `cmp xn, #imm` / `cmp wn, #imm` (imm < 4096).
    fn cmp_imm(&mut self, wide: bool, rn: u8, imm: u32) {
        let op = if wide { 0xf100_0000 } else { 0x7100_0000 };
        self.put(op | (imm << 10) | (u32::from(rn) << 5) | u32::from(ZR));
    }

    /// `cmp xn, xm` / `cmp wn, wm`.
    fn cmp(&mut self, wide: bool, rn: u8, rm: u8) {
        let op = if wide { 0xeb00_0000 } else { 0x6b00_0000 };
        self.put(op | (u32::from(rm) << 16) | (u32::from(rn) << 5) | u32::from(ZR));
    }

    /// Three-register data processing: `op xd, xn, xm` with `op` its base word.
    fn rrr(&mut self, op: u32, rd: u8, rn: u8, rm: u8) {
        self.put(op | (u32::from(rm) << 16) | (u32::from(rn) << 5) | u32::from(rd));
    }

    /// `add xd, xn, xm, lsl #shift`.
    fn add_shifted(&mut self, rd: u8, rn: u8, rm: u8, shift: u32) {
        self.rrr(0x8b00_0000 | (shift << 10), rd, rn, rm);
    }

    /// `ldr`/`str` of `size` bytes (4 or 8) at `[xn|sp, #off]`, through a scratch register
    /// holding the offset where it does not fit the scaled immediate.
    fn mem(&mut self, load: bool, size: u32, rt: u8, rn: u8, off: u64, scratch: u8) {
        let (base, scale) = match size {
            8 => (0xf900_0000u32, 3),
            _ => (0xb900_0000u32, 2),
        };
        let load_bit = if load { 0x40_0000 } else { 0 };
        if off.is_multiple_of(u64::from(size)) && off >> scale < 4096 {
            self.put(
                base | load_bit
                    | (((off >> scale) as u32) << 10)
                    | (u32::from(rn) << 5)
                    | u32::from(rt),
            );
        } else {
            debug_assert!(scratch != rn && scratch != rt);
            self.mov64(scratch, off);
            // Register offset (LSL #0): `ldr rt, [xn, x_scratch]`.
            let reg = if size == 8 { 0xf820_6800 } else { 0xb820_6800 };
            self.put(
                reg | load_bit | (u32::from(scratch) << 16) | (u32::from(rn) << 5) | u32::from(rt),
            );
        }
    }

    fn ldr(&mut self, rt: u8, rn: u8, off: u64) {
        self.mem(true, 8, rt, rn, off, T12);
    }

    fn str(&mut self, rt: u8, rn: u8, off: u64) {
        self.mem(false, 8, rt, rn, off, T12);
    }

    fn ldr32(&mut self, rt: u8, rn: u8, off: u64) {
        self.mem(true, 4, rt, rn, off, T12);
    }

    fn str32(&mut self, rt: u8, rn: u8, off: u64) {
        self.mem(false, 4, rt, rn, off, T12);
    }

    /// `stp`/`ldp` of two X registers: `mode` 0b10 signed offset, 0b11 pre-index, 0b01
    /// post-index.
    fn pair(&mut self, load: bool, mode: u32, rt: u8, rt2: u8, rn: u8, off: i32) {
        debug_assert!(off % 8 == 0 && (-512..=504).contains(&off));
        let imm7 = ((off / 8) as u32) & 0x7f;
        self.put(
            0xa800_0000
                | (mode << 23)
                | (u32::from(load) << 22)
                | (imm7 << 15)
                | (u32::from(rt2) << 10)
                | (u32::from(rn) << 5)
                | u32::from(rt),
        );
    }

    fn mrs(&mut self, rt: u8, sysreg: u32) {
        self.put(0xd520_0000 | sysreg | u32::from(rt) | 0x10_0000);
    }

    fn msr(&mut self, sysreg: u32, rt: u8) {
        self.put(0xd500_0000 | sysreg | u32::from(rt) | 0x10_0000);
    }

    /// A branch to `label`: `b` (cond None) or `b.cond`.
    fn branch(&mut self, cond: Option<u8>, label: usize) {
        let (word, field) = match cond {
            None => (0x1400_0000, Field::Imm26),
            Some(c) => (0x5400_0000 | u32::from(c), Field::Imm19),
        };
        self.branch_word(word, field, label);
    }

    /// `cbz`/`cbnz` (64-bit) to `label`.
    fn cbz(&mut self, nonzero: bool, rt: u8, label: usize) {
        let word = 0xb400_0000 | (u32::from(nonzero) << 24) | u32::from(rt);
        self.branch_word(word, Field::Imm19, label);
    }

    fn branch_word(&mut self, word: u32, field: Field, label: usize) {
        self.fixups.push((self.words.len(), label, field));
        self.put(word);
    }

    /// `lock add [va], 1` as a load/store-exclusive loop (x1 the address, x0 and w2 scratch).
    fn count(&mut self, va: u64) {
        self.mov64(TMP1, va);
        let again = self.label();
        self.bind(again);
        // ldxr x0, [x1]; add x0, x0, #1; stxr w2, x0, [x1]; cbnz w2, again
        self.put(0xc85f_7c00 | (u32::from(TMP1) << 5) | u32::from(TMP0));
        self.add_imm(TMP0, TMP0, 1);
        self.put(0xc800_7c00 | (u32::from(TMP2) << 16) | (u32::from(TMP1) << 5) | u32::from(TMP0));
        let w = 0x3500_0000 | u32::from(TMP2);
        self.branch_word(w, Field::Imm19, again);
    }

    fn finish(mut self) -> Vec<u32> {
        for &(at, l, field) in &self.fixups {
            let to = self.labels[l].expect("every used label is bound");
            let rel = to as i64 - at as i64;
            self.words[at] |= match field {
                Field::Imm26 => (rel as u32) & 0x03ff_ffff,
                Field::Imm19 => ((rel as u32) & 0x7_ffff) << 5,
            };
        }
        self.words
    }
}

/// `b` from `from` to `to`, if within reach.
fn b_to(from: u64, to: u64) -> Result<u32, &'static str> {
    let rel = (to as i64).wrapping_sub(from as i64);
    if rel % 4 != 0 || !(-(1 << 27)..(1 << 27)).contains(&rel) {
        return Err("a branch target is beyond b's 128 MiB reach of the trampoline");
    }
    Ok(0x1400_0000 | (((rel / 4) as u32) & 0x03ff_ffff))
}

/// The words after the recording that run the displaced instruction and go on: its copy and
/// a branch back, or, for a PC-relative instruction, the same effect from the trampoline.
/// `at` is the address of the first of them.
fn displaced(
    plan: &StepPlan<Emulation, OutOfLine>,
    insn: &Instruction,
    at: u64,
) -> Result<Vec<u32>, &'static str> {
    let mut e = Emitter::default();
    // Branches to absolute addresses, encoded once each word's address is known.
    let mut to: Vec<(usize, u64)> = Vec::new();
    fn b_abs(e: &mut Emitter, to: &mut Vec<(usize, u64)>, target: u64) {
        to.push((e.words.len(), target));
        e.put(0);
    }
    // A conditional form whose taken branch skips the next word to a `b target`.
    fn skip_then(e: &mut Emitter, to: &mut Vec<(usize, u64)>, word: u32, next: u64, target: u64) {
        e.put(word | (2 << 5));
        b_abs(e, to, next);
        b_abs(e, to, target);
    }
    let next = insn.va + 4;
    match plan {
        StepPlan::StepOutOfLine(ool) => {
            e.put(ool.word);
            b_abs(&mut e, &mut to, next);
        }
        StepPlan::Emulate(em) => match *em {
            Emulation::Nop { next } => b_abs(&mut e, &mut to, next),
            // Not PC-relative: the instruction itself runs, after every register is back.
            Emulation::MovRegister { next, .. }
            | Emulation::AddImmediate { next, .. }
            | Emulation::StorePairPreIndex { next, .. }
            | Emulation::ReadDaif { next, .. } => {
                e.put(insn.word);
                b_abs(&mut e, &mut to, next);
            }
            Emulation::Branch { target } => b_abs(&mut e, &mut to, target),
            // The return address is in the text, so the callee returns there.
            Emulation::BranchLink { target, ret } => {
                e.mov64(LR, ret);
                b_abs(&mut e, &mut to, target);
            }
            Emulation::BranchConditional { cond, target, next } => {
                skip_then(&mut e, &mut to, 0x5400_0000 | u32::from(cond), next, target);
            }
            Emulation::CompareBranch {
                rt,
                wide,
                nonzero,
                target,
                next,
            } => {
                let word = if wide { 0xb400_0000 } else { 0x3400_0000 }
                    | (u32::from(nonzero) << 24)
                    | u32::from(rt);
                skip_then(&mut e, &mut to, word, next, target);
            }
            Emulation::TestBranch {
                rt,
                bit,
                set,
                target,
                next,
            } => {
                let word = 0x3600_0000
                    | (u32::from(set) << 24)
                    | (u32::from(bit >> 5) << 31)
                    | (u32::from(bit & 31) << 19)
                    | u32::from(rt);
                skip_then(&mut e, &mut to, word, next, target);
            }
            Emulation::BranchRegister { link: false, .. } => e.put(insn.word),
            Emulation::BranchRegister {
                rn,
                link: true,
                ret,
                ..
            } => {
                if rn == LR {
                    return Err("blr x30 needs its target and its return address in one register");
                }
                // mov x30, ret; br xn
                e.mov64(LR, ret);
                e.put(0xd61f_0000 | (u32::from(rn) << 5));
            }
            Emulation::LoadLiteral {
                rt,
                address,
                size,
                signed,
                next,
            } => {
                if rt != ZR {
                    e.mov64(rt, address);
                    let load = match (size, signed) {
                        (8, _) => 0xf940_0000,
                        (_, true) => 0xb980_0000,
                        _ => 0xb940_0000,
                    };
                    e.put(load | (u32::from(rt) << 5) | u32::from(rt));
                }
                b_abs(&mut e, &mut to, next);
            }
            Emulation::SetRegister { rd, value, next } => {
                if rd != ZR {
                    e.mov64(rd, value);
                }
                b_abs(&mut e, &mut to, next);
            }
        },
    }
    let mut words = e.finish();
    for (i, target) in to {
        words[i] = b_to(at + 4 * i as u64, target)?;
    }
    Ok(words)
}

/// Why a site cannot take the jump plan, or its patch.
pub fn patch(
    plan: &StepPlan<Emulation, OutOfLine>,
    insn: &Instruction,
    spec: &TrampolineSpec,
) -> Result<JumpPatch, &'static str> {
    let a = &spec.anchors;
    let cpu_number = a
        .cpu_number
        .ok_or("System.map has no per-CPU cpu_number to find this CPU's ring")?;
    if spec.filter.is_some() && a.task.is_none() {
        return Err("a task filter needs the task's layout (BTF) in the trampoline");
    }
    let site = b_to(spec.site, spec.at)
        .map_err(|_| "the trampoline is beyond b's 128 MiB reach of the site")?;
    let r = &spec.rings;
    let mut e = Emitter::default();
    let restore = e.label();
    let nested = e.label();
    let filtered = e.label();
    e.pair(false, 0b11, FP, LR, SP, -16);
    e.add_imm(FP, SP, 0);
    e.add_imm(SP, SP, -(SAVE_AREA as i32));
    for k in (0..28u8).step_by(2) {
        e.pair(false, 0b10, k, k + 1, SP, 8 * i32::from(k));
    }
    e.str(28, SP, 224);
    e.mrs(TMP0, NZCV);
    e.mrs(TMP1, DAIF);
    e.pair(false, 0b10, TMP0, TMP1, SP, SAVED_FLAGS);
    // msr daifset, #3
    e.put(0xd503_43df);
    // This CPU's ring.
    let has_ring = e.label();
    e.mrs(TMP0, TPIDR_EL1);
    e.mov64(TMP1, cpu_number);
    // ldr w0, [x0, x1]
    e.put(0xb860_6800 | (u32::from(TMP1) << 16) | (u32::from(TMP0) << 5) | u32::from(TMP0));
    if r.cpus < 4096 {
        e.cmp_imm(false, TMP0, r.cpus);
    } else {
        e.mov64(TMP1, u64::from(r.cpus));
        e.cmp(false, TMP0, TMP1);
    }
    e.branch(Some(LO), has_ring);
    e.count(r.va + RingLayout::NO_RING_OFFSET);
    e.branch(None, restore);
    e.bind(has_ring);
    e.mov64(TMP2, r.stride());
    e.mov64(RING, r.va + r.ring_offset(0));
    // madd x3, x0, x2, x3
    e.put(
        0x9b00_0000
            | (u32::from(TMP2) << 16)
            | (u32::from(RING) << 10)
            | (u32::from(TMP0) << 5)
            | u32::from(RING),
    );
    e.ldr32(TMP0, RING, header::NESTING);
    e.add_imm32(TMP0, TMP0, 1);
    e.str32(TMP0, RING, header::NESTING);
    e.cmp_imm(false, TMP0, 1);
    e.branch(Some(NE), nested);
    e.ldr(TMP0, RING, header::HEAD);
    e.ldr(TMP1, RING, header::TAIL);
    e.rrr(0xcb00_0000, TMP1, TMP0, TMP1);
    e.mov64(TMP2, r.records);
    e.cmp(true, TMP1, TMP2);
    e.branch(Some(HS), nested);
    e.mov64(TMP2, r.records - 1);
    e.rrr(0x8a00_0000, TMP0, TMP0, TMP2);
    e.add_shifted(REC, RING, TMP0, RECORD_SIZE.trailing_zeros());
    e.add_imm(REC, REC, RING_HEADER as i32);
    e.mov64(TMP0, u64::from(spec.tag));
    e.str32(TMP0, REC, record::TAG);
    e.mov64(FLAGS, 0);
    e.mrs(TMP0, CNTVCT_EL0);
    e.str(TMP0, REC, record::TIME);
    // x0-x27 from the save area, x28, x29 and x30 from the frame record, SP at the hit.
    for k in (0..28u8).step_by(2) {
        e.pair(true, 0b10, TMP0, TMP1, SP, 8 * i32::from(k));
        e.pair(
            false,
            0b10,
            TMP0,
            TMP1,
            REC,
            (record::REGS + 8 * u64::from(k)) as i32,
        );
    }
    e.ldr(TMP0, SP, 224);
    e.ldr(TMP1, FP, 0);
    e.pair(false, 0b10, TMP0, TMP1, REC, (record::REGS + 8 * 28) as i32);
    e.ldr(TMP0, FP, 8);
    e.add_imm(HIT_SP, FP, 16);
    e.pair(
        false,
        0b10,
        TMP0,
        HIT_SP,
        REC,
        (record::REGS + 8 * 30) as i32,
    );
    e.mov64(TMP0, spec.site);
    e.pair(true, 0b10, TMP1, TMP2, SP, SAVED_FLAGS);
    e.rrr(0xaa00_0000, TMP1, TMP1, TMP2);
    e.mov64(TMP2, EL1H);
    e.rrr(0xaa00_0000, TMP1, TMP1, TMP2);
    e.pair(false, 0b10, TMP0, TMP1, REC, (record::REGS + 8 * 32) as i32);
    // The task (SP_EL0 in the kernel), and the end of the stack the words may be read up to.
    let page_limit = e.label();
    let have_limit = e.label();
    e.mrs(TMP0, SP_EL0);
    e.str(TMP0, REC, record::TASK);
    e.mrs(TMP1, TPIDR_EL1);
    e.str(TMP1, REC, record::TASK_FROM);
    if let Some(t) = a.task {
        // No task: a filter cannot pass (as on the host, where the task cannot be read).
        let none = if spec.filter.is_some() {
            filtered
        } else {
            page_limit
        };
        e.cbz(false, TMP0, none);
        if let Some(f) = &spec.filter {
            emit_filter(&mut e, f, &t, filtered)?;
        }
        e.ldr32(TMP1, TMP0, t.pid);
        e.str32(TMP1, REC, record::PID);
        e.ldr32(TMP1, TMP0, t.tgid);
        e.str32(TMP1, REC, record::TGID);
        e.ldr(TMP1, TMP0, t.comm);
        e.str(TMP1, REC, record::COMM);
        e.ldr(TMP1, TMP0, t.comm + 8);
        e.str(TMP1, REC, record::COMM + 8);
        e.mov64(TMP1, u64::from(FLAG_TASK));
        e.rrr(0x2a00_0000, FLAGS, FLAGS, TMP1);
        // On the task's own stack: up to its end.
        e.ldr(LIMIT, TMP0, t.stack);
        e.rrr(0xcb00_0000, INDEX, HIT_SP, LIMIT);
        e.mov64(TMP1, a.thread_size);
        e.cmp(true, INDEX, TMP1);
        e.branch(Some(HS), page_limit);
        e.add_shifted(LIMIT, LIMIT, TMP1, 0);
        e.branch(None, have_limit);
    }
    // Elsewhere (IRQ, overflow, SDEI stacks): up to the end of SP's page.
    e.bind(page_limit);
    // orr x5, x6, #0xfff; add x5, x5, #1
    e.put(0xb240_2c00 | (u32::from(HIT_SP) << 5) | u32::from(LIMIT));
    e.add_imm(LIMIT, LIMIT, 1);
    e.bind(have_limit);
    // All sixteen words when they end within the limit (nearly always: eight pairs), else
    // word by word from SP up while they do; each word's bit in the flags.
    let (each, done, one_by_one) = (e.label(), e.label(), e.label());
    e.add_imm(T11, HIT_SP, 8 * STACK_WORDS as i32);
    e.cmp(true, T11, LIMIT);
    e.branch(Some(HI), one_by_one);
    for j in 0..(STACK_WORDS / 2) as i32 {
        e.pair(true, 0b10, T10, T11, HIT_SP, 16 * j);
        e.pair(false, 0b10, T10, T11, REC, record::STACK as i32 + 16 * j);
    }
    e.mov64(T12, (1 << STACK_WORDS) - 1);
    e.rrr(0x2a00_0000, FLAGS, FLAGS, T12);
    e.branch(None, done);
    e.bind(one_by_one);
    e.mov64(INDEX, 0);
    e.bind(each);
    e.add_shifted(T10, HIT_SP, INDEX, 3);
    e.add_imm(T11, T10, 8);
    e.cmp(true, T11, LIMIT);
    e.branch(Some(HI), done);
    e.ldr(T11, T10, 0);
    e.add_imm(T12, REC, record::STACK as i32);
    // str x11, [x12, x7, lsl #3]
    e.put(0xf820_7800 | (u32::from(INDEX) << 16) | (u32::from(T12) << 5) | u32::from(T11));
    e.mov64(T12, 1);
    // lslv w12, w12, w7; orr w9, w9, w12
    e.rrr(0x1ac0_2000, T12, T12, INDEX);
    e.rrr(0x2a00_0000, FLAGS, FLAGS, T12);
    e.add_imm(INDEX, INDEX, 1);
    e.cmp_imm(true, INDEX, STACK_WORDS as u32);
    e.branch(Some(LO), each);
    e.bind(done);
    e.str32(FLAGS, REC, record::FLAGS);
    // Publish: the record's bytes before the head (stlr x0, [x3]; HEAD is at offset 0).
    const _: () = assert!(header::HEAD == 0);
    e.ldr(TMP0, RING, header::HEAD);
    e.add_imm(TMP0, TMP0, 1);
    e.put(0xc89f_fc00 | (u32::from(RING) << 5) | u32::from(TMP0));
    let unnest = |e: &mut Emitter| {
        e.ldr32(TMP0, RING, header::NESTING);
        e.add_imm32(TMP0, TMP0, -1);
        e.str32(TMP0, RING, header::NESTING);
    };
    unnest(&mut e);
    e.branch(None, restore);
    // Nested in another trampoline on this CPU, or the ring full: counted, dropped.
    e.bind(nested);
    unnest(&mut e);
    e.ldr(TMP0, RING, header::MISSED);
    e.add_imm(TMP0, TMP0, 1);
    e.str(TMP0, RING, header::MISSED);
    e.count(r.va + RingLayout::site_missed_offset(spec.tag));
    e.branch(None, restore);
    // Left out by the task filter: a hit all the same, counted, not recorded.
    e.bind(filtered);
    unnest(&mut e);
    e.count(r.va + RingLayout::site_filtered_offset(spec.tag));
    e.bind(restore);
    e.pair(true, 0b10, TMP0, TMP1, SP, SAVED_FLAGS);
    e.msr(NZCV, TMP0);
    e.msr(DAIF, TMP1);
    for k in (0..28u8).step_by(2) {
        e.pair(true, 0b10, k, k + 1, SP, 8 * i32::from(k));
    }
    e.ldr(28, SP, 224);
    e.add_imm(SP, SP, SAVE_AREA as i32);
    e.pair(true, 0b01, FP, LR, SP, 16);
    let mut words = e.finish();
    let tail = displaced(plan, insn, spec.at + 4 * words.len() as u64)?;
    words.extend(tail);
    Ok(JumpPatch {
        trampoline: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
        site: site.to_le_bytes().to_vec(),
    })
}

/// The task filter's test, with x0 the task: on to the recording if it passes, else to
/// `filtered`. `comm` compares all 16 bytes (the kernel pads the name with NULs); pid and tgid
/// one `u32`.
fn emit_filter(
    e: &mut Emitter,
    f: &TaskFilter,
    t: &crate::jump::TaskOffsets,
    filtered: usize,
) -> Result<(), &'static str> {
    let (test, equal) = FilterTest::of(f, t)?;
    let pass = e.label();
    let (on_mismatch, on_match) = if equal {
        (filtered, pass)
    } else {
        (pass, filtered)
    };
    match test {
        FilterTest::NeverEqual => e.branch(None, on_mismatch),
        FilterTest::Comm { at, halves } => {
            for (half, v) in (0u64..).zip(halves) {
                e.ldr(TMP1, TMP0, at + 8 * half);
                e.mov64(TMP2, v);
                e.cmp(true, TMP1, TMP2);
                e.branch(Some(NE), on_mismatch);
            }
            e.branch(None, on_match);
        }
        FilterTest::Word { at, value } => {
            e.ldr32(TMP1, TMP0, at);
            e.mov64(TMP2, u64::from(value));
            e.cmp(false, TMP1, TMP2);
            e.branch(Some(NE), on_mismatch);
            e.branch(None, on_match);
        }
    }
    e.bind(pass);
    Ok(())
}

/// The registers a record holds: x0-x30, SP, PC, PSTATE (NZCV, DAIF and the mode; not PAN,
/// SSBS or the other bits a trampoline cannot read on every CPU); SP_EL0 is the task.
pub fn registers(rec: &crate::jump::JumpRecord) -> super::Registers {
    let mut regs = super::Registers::default();
    regs.x.copy_from_slice(&rec.regs[..31]);
    regs.sp = rec.regs[31];
    regs.pc = rec.regs[32];
    regs.pstate = rec.regs[33];
    regs.sp_el0 = rec.task;
    regs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::aarch64::{CpuFeatures, Decoder};
    use crate::arch::{InstructionDecoder, PlanOf};
    use crate::jump::{GuestAnchors, TaskOffsets};
    use capstone::prelude::*;

    const SITE: u64 = 0xffff_8000_0820_0000;
    const AT: u64 = 0xffff_8000_0960_0000;

    fn spec() -> TrampolineSpec {
        TrampolineSpec {
            tag: 3,
            site: SITE,
            at: AT,
            rings: RingLayout::new(0xffff_ff80_0030_0000, 0x10_0000_0000, 2, 128).unwrap(),
            anchors: GuestAnchors {
                cpu_number: Some(0xffff_8000_0a0b_c018),
                current_task: None,
                this_cpu_off: None,
                task: Some(TaskOffsets {
                    pid: 0x5a8,
                    tgid: 0x5ac,
                    comm: 0x73e,
                    stack: 0x20,
                }),
                thread_size: 16384,
            },
            filter: None,
        }
    }

    fn disassemble(code: &[u8], at: u64) -> Vec<String> {
        let cs = Capstone::new()
            .arm64()
            .mode(arch::arm64::ArchMode::Arm)
            .build()
            .unwrap();
        let insns = cs.disasm_all(code, at).unwrap();
        assert_eq!(insns.len() * 4, code.len(), "every word is an instruction");
        insns
            .iter()
            .map(|i| format!("{} {}", i.mnemonic().unwrap(), i.op_str().unwrap()))
            .map(|t| t.trim_end().to_string())
            .collect()
    }

    fn plan_of(word: u32) -> (Instruction, PlanOf<crate::arch::aarch64::Aarch64>) {
        let d = Decoder::new(CpuFeatures::WITHOUT_PAC).unwrap();
        let insn = InstructionDecoder::<crate::arch::aarch64::Aarch64>::decode(
            &d,
            &word.to_le_bytes(),
            SITE,
        )
        .unwrap();
        let plan = InstructionDecoder::<crate::arch::aarch64::Aarch64>::plan(&d, &insn).unwrap();
        (insn, plan)
    }

    fn tail(word: u32, n: usize) -> Vec<String> {
        let (insn, plan) = plan_of(word);
        let p = patch(&plan, &insn, &spec()).unwrap();
        let text = disassemble(&p.trampoline, AT);
        text[text.len() - n..].to_vec()
    }

    #[test]
    fn the_nop_trampoline_disassembles_to_the_template() {
        let (insn, plan) = plan_of(0xd503_201f);
        let p = patch(&plan, &insn, &spec()).unwrap();
        let text = disassemble(&p.trampoline, AT);
        assert_eq!(
            &text[..4],
            [
                "stp x29, x30, [sp, #-0x10]!",
                "mov x29, sp",
                "sub sp, sp, #0x100",
                "stp x0, x1, [sp]"
            ]
        );
        let has = |want: &str| assert!(text.iter().any(|t| t == want), "no `{want}` in {text:#?}");
        has("str x28, [sp, #0xe0]");
        has("mrs x0, nzcv");
        has("mrs x1, daif");
        has("msr daifset, #3");
        has("mrs x0, tpidr_el1");
        has("ldr w0, [x0, x1]");
        has("cmp w0, #2");
        has("madd x3, x0, x2, x3");
        has("mrs x0, cntvct_el0");
        has("mrs x0, sp_el0");
        has("ldxr x0, [x1]");
        has("stxr w2, x0, [x1]");
        has("stlr x0, [x3]");
        has("ldr w1, [x0, #0x5a8]");
        // comm at an offset that is no multiple of 8: through a register.
        has("ldr x1, [x0, x12]");
        // The stack words: eight pairs when all sixteen end within the limit.
        has("ldp x10, x11, [x6, #0x70]");
        has("stp x10, x11, [x4, #0x1c8]");
        has("msr nzcv, x0");
        has("msr daif, x1");
        assert!(
            !text
                .iter()
                .any(|t| t.starts_with("bl") || t.starts_with("ret"))
        );
        let n = text.len();
        assert_eq!(
            &text[n - 4..],
            [
                "ldr x28, [sp, #0xe0]".to_string(),
                "add sp, sp, #0x100".to_string(),
                "ldp x29, x30, [sp], #0x10".to_string(),
                format!("b #{:#x}", SITE + 4)
            ]
        );
        // x0/x1's pair at 0x40: saved, copied into the record, restored.
        let stores = text.iter().filter(|t| t.ends_with("[sp, #0x40]")).count();
        assert_eq!(stores, 3, "{text:#?}");
        assert_eq!(disassemble(&p.site, SITE), [format!("b #{AT:#x}")]);
    }

    #[test]
    fn displaced_instructions_run_from_the_trampoline_as_from_the_text() {
        // mov x9, x30 (ftrace's first entry word) and ldr x0, [x1]: themselves, then back.
        assert_eq!(
            tail(0xaa1e_03e9, 2),
            ["mov x9, x30".to_string(), format!("b #{:#x}", SITE + 4)]
        );
        assert_eq!(
            tail(0xf940_0020, 2),
            ["ldr x0, [x1]".to_string(), format!("b #{:#x}", SITE + 4)]
        );
        // bl SITE+0x100: x30 is the return address in the text.
        let t = tail(0x9400_0040, 5);
        assert_eq!(t[4], format!("b #{:#x}", SITE + 0x100));
        assert!(t[0].starts_with("mov x30, #"), "{t:?}");
        assert!(t[1..4].iter().all(|w| w.starts_with("movk x30")), "{t:?}");
        // b.ne SITE+0x40: taken to its target, else on.
        let t = tail(0x5400_0201, 3);
        assert_eq!(t[0], format!("b.ne #{:#x}", AT + 4 * last_word() as u64));
        assert_eq!(t[1], format!("b #{:#x}", SITE + 4));
        assert_eq!(t[2], format!("b #{:#x}", SITE + 0x40));
        // cbz x3, tbnz w5, #2: the same, re-encoded.
        assert!(tail(0xb400_0203, 3)[0].starts_with("cbz x3, #"));
        assert!(tail(0x3710_0205, 3)[0].starts_with("tbnz w5, #2, #"));
        // adrp x0: the address it computes.
        let t = tail(0x9000_0000, 4);
        assert_eq!(
            t,
            [
                "mov x0, #0x8200000".to_string(),
                "movk x0, #0x8000, lsl #32".to_string(),
                "movk x0, #0xffff, lsl #48".to_string(),
                format!("b #{:#x}", SITE + 4)
            ]
        );
        // ldr x2, SITE+8 (literal): loaded from its address.
        let t = tail(0x5800_0042, 6);
        assert_eq!(t[4], "ldr x2, [x2]");
        // blr x30 cannot be re-expressed; blr x8 can.
        let (insn, plan) = plan_of(0xd63f_03c0);
        assert!(patch(&plan, &insn, &spec()).unwrap_err().contains("x30"));
        let t = tail(0xd63f_0100, 1);
        assert_eq!(t[0], "br x8");
    }

    /// The index of the `b.ne` trampoline's last word (where its skip lands).
    fn last_word() -> usize {
        let (insn, plan) = plan_of(0x5400_0201);
        patch(&plan, &insn, &spec()).unwrap().trampoline.len() / 4 - 1
    }

    #[test]
    fn a_task_filter_is_tested_in_the_trampoline() {
        let (insn, plan) = plan_of(0xd503_201f);
        let mut s = spec();
        s.filter = crate::definition::ProbeDefinition::parse("p f if comm == \"getpid-loop\"")
            .unwrap()
            .filter;
        let text = disassemble(&patch(&plan, &insn, &s).unwrap().trampoline, AT);
        let at = |want: &str| {
            text.iter()
                .position(|t| t == want)
                .unwrap_or_else(|| panic!("no `{want}` in {text:#?}"))
        };
        // "getpid-l" as movz/movk halves, compared before the pid is read.
        let first = at("mov x2, #0x6567");
        assert_eq!(text[first + 1], "movk x2, #0x7074, lsl #16");
        assert_eq!(text[first + 4], "cmp x1, x2");
        assert!(first < at("ldr w1, [x0, #0x5a8]"));
        s.filter = crate::definition::ProbeDefinition::parse("p f if pid != 7")
            .unwrap()
            .filter;
        let text = disassemble(&patch(&plan, &insn, &s).unwrap().trampoline, AT);
        assert!(text.iter().any(|t| t == "cmp w1, w2"));
        s.anchors.task = None;
        assert!(patch(&plan, &insn, &s).unwrap_err().contains("filter"));
    }

    #[test]
    fn out_of_reach_and_unanchored_sites_are_refused() {
        let (insn, plan) = plan_of(0xd503_201f);
        let mut s = spec();
        s.at = SITE + (128 << 20);
        assert!(patch(&plan, &insn, &s).unwrap_err().contains("reach"));
        let mut s = spec();
        s.anchors.cpu_number = None;
        assert!(patch(&plan, &insn, &s).unwrap_err().contains("cpu_number"));
        // The length never depends on where the trampoline goes (it is sized first).
        let a = patch(&plan, &insn, &spec()).unwrap().trampoline.len();
        let mut s = spec();
        s.at = AT + 0x1000;
        assert_eq!(patch(&plan, &insn, &s).unwrap().trampoline.len(), a);
    }
}
