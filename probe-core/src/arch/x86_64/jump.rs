//! The x86_64 jump plan: one instruction of 5 bytes or more (the fentry site first) replaced by
//! `jmp rel32` into a trampoline in the XOL code pages (PUD 509: within rel32 reach of all
//! kernel text at any KASLR slide). With every vCPU out of `KVM_RUN` the swap is safe without
//! Linux's int3 dance: no saved RIP can point inside one instruction.
//!
//! The trampoline, generated per site from a fixed template (a handful of instruction forms,
//! encoded by [`Emitter`] and disassembled back with capstone in the tests; a runtime assembler
//! crate would add a proc-macro dependency for about twenty forms):
//!
//! ```text
//!   push %rbp; mov %rsp,%rbp       a frame the guest's ORC unwinder falls back on
//!   pushfq; cli                    interrupts off while recording (NMIs may still nest)
//!   push the 14 other GPRs
//!   ring = rings + %gs:cpu_number * stride     (no ring for that CPU: counted, skipped)
//!   ++nesting == 1 and the ring not full, else count the hit as missed and skip
//!   record: tag, rdtsc, the GPRs, RIP = the site, RFLAGS at the hit, %gs:current_task and
//!           its pid/tgid/comm, stack words from RSP up to the end of the task's stack (or of
//!           RSP's page on another stack), each word's bit in the flags
//!   ++head; --nesting
//!   pop the GPRs; popfq; pop %rbp
//!   the displaced instruction (nothing for a nop; else its boosted copy, which jumps back)
//!   jmp site+len
//! ```
//!
//! No guest function is called and no `ret` is executed (RETHUNK, SRSO and ITS stay whole:
//! the trampoline leaves with a direct jump). Every read is of the current CPU's per-CPU area,
//! the current task, or the current stack within bounds: none can fault.

use crate::arch::StepPlan;
use crate::arch::x86_64::{Emulation, Instruction, OutOfLine};
use crate::definition::TaskFilter;
use crate::jump::{
    FLAG_TASK, FilterTest, JumpPatch, RING_HEADER, RingLayout, STACK_WORDS, TrampolineSpec, header,
    record,
};

const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;
const RBX: u8 = 3;
const RSP: u8 = 4;
const RBP: u8 = 5;
const RSI: u8 = 6;
const RDI: u8 = 7;

/// The GPRs the trampoline pushes after RFLAGS, in order (all but RSP and RBP).
const SAVED: [u8; 14] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// Where register `r` was saved, from RBP.
fn saved_at(r: u8) -> i32 {
    let i = SAVED
        .iter()
        .position(|s| *s == r)
        .expect("a saved register") as i32;
    -16 - 8 * i
}

/// A label: where it is once bound, and the rel32 fields that jump to it.
#[derive(Default)]
struct Label {
    at: Option<usize>,
    uses: Vec<usize>,
}

/// A small x86_64 encoder for the trampoline's instruction forms (64-bit operands, memory as
/// `[base + disp32]`; RSP and R12 are never a base).
#[derive(Default)]
struct Emitter {
    code: Vec<u8>,
    labels: Vec<Label>,
}

impl Emitter {
    fn label(&mut self) -> usize {
        self.labels.push(Label::default());
        self.labels.len() - 1
    }

    fn bind(&mut self, l: usize) {
        self.labels[l].at = Some(self.code.len());
    }

    fn rex(&mut self, w: bool, reg: u8, base: u8) {
        let rex = 0x40 | (u8::from(w) << 3) | ((reg >> 3) << 2) | (base >> 3);
        if rex != 0x40 {
            self.code.push(rex);
        }
    }

    /// `op reg, [base + disp32]` (or the reverse direction, by opcode).
    fn mem(&mut self, w: bool, op: &[u8], reg: u8, base: u8, disp: i32) {
        debug_assert!(base & 7 != RSP, "no SIB forms");
        self.rex(w, reg, base);
        self.code.extend_from_slice(op);
        self.code.push(0x80 | ((reg & 7) << 3) | (base & 7));
        self.code.extend_from_slice(&disp.to_le_bytes());
    }

    fn load(&mut self, reg: u8, base: u8, disp: i32) {
        self.mem(true, &[0x8b], reg, base, disp);
    }

    fn store(&mut self, base: u8, disp: i32, reg: u8) {
        self.mem(true, &[0x89], reg, base, disp);
    }

    fn load32(&mut self, reg: u8, base: u8, disp: i32) {
        self.mem(false, &[0x8b], reg, base, disp);
    }

    fn store32(&mut self, base: u8, disp: i32, reg: u8) {
        self.mem(false, &[0x89], reg, base, disp);
    }

    fn lea(&mut self, reg: u8, base: u8, disp: i32) {
        self.mem(true, &[0x8d], reg, base, disp);
    }

    /// `op dword/qword [base + disp32], imm` with the `/ext` opcode extension.
    fn mem_imm(&mut self, w: bool, op: u8, ext: u8, base: u8, disp: i32, imm: &[u8]) {
        self.mem(w, &[op], ext, base, disp);
        self.code.extend_from_slice(imm);
    }

    /// `mov reg, %gs:[disp32]` (64- or 32-bit).
    fn load_gs(&mut self, w: bool, reg: u8, disp: i32) {
        self.code.push(0x65);
        self.rex(w, reg, 0);
        self.code
            .extend_from_slice(&[0x8b, 0x04 | ((reg & 7) << 3), 0x25]);
        self.code.extend_from_slice(&disp.to_le_bytes());
    }

    fn movabs(&mut self, reg: u8, imm: u64) {
        self.rex(true, 0, reg);
        self.code.push(0xb8 + (reg & 7));
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `op rm, reg` between registers (add 01, sub 29, cmp 39, or 09, mov 89, test 85).
    fn rr(&mut self, op: u8, rm: u8, reg: u8) {
        self.rex(true, reg, rm);
        self.code
            .extend_from_slice(&[op, 0xc0 | ((reg & 7) << 3) | (rm & 7)]);
    }

    /// `op rm, imm32` on a register (`81 /ext`), 64- or 32-bit.
    fn ri(&mut self, w: bool, ext: u8, rm: u8, imm: u32) {
        self.rex(w, 0, rm);
        self.code
            .extend_from_slice(&[0x81, 0xc0 | (ext << 3) | (rm & 7)]);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    fn push(&mut self, r: u8) {
        self.rex(false, 0, r);
        self.code.push(0x50 + (r & 7));
    }

    fn pop(&mut self, r: u8) {
        self.rex(false, 0, r);
        self.code.push(0x58 + (r & 7));
    }

    /// `jmp`/`jcc rel32` to a label (`cc` None: jmp).
    fn jump(&mut self, cc: Option<u8>, l: usize) {
        match cc {
            Some(c) => self.code.extend_from_slice(&[0x0f, 0x80 | c]),
            None => self.code.push(0xe9),
        }
        self.labels[l].uses.push(self.code.len());
        self.code.extend_from_slice(&[0; 4]);
    }

    /// `lock add qword [abs], 1` through RAX.
    fn count(&mut self, va: u64) {
        self.movabs(RAX, va);
        self.code.push(0xf0);
        self.mem_imm(true, 0x83, 0, RAX, 0, &[1]);
    }

    fn finish(mut self) -> Vec<u8> {
        for l in &self.labels {
            let at = l.at.expect("every used label is bound");
            for &u in &l.uses {
                let rel = at as i64 - (u as i64 + 4);
                self.code[u..u + 4].copy_from_slice(&(rel as i32).to_le_bytes());
            }
        }
        self.code
    }
}

const JB: u8 = 0x2;
const JAE: u8 = 0x3;
const JE: u8 = 0x4;
const JNE: u8 = 0x5;
const JA: u8 = 0x7;

/// Why a site cannot take the jump plan, or its patch.
pub fn patch(
    plan: &StepPlan<Emulation, OutOfLine>,
    insn: &Instruction,
    spec: &TrampolineSpec,
) -> Result<JumpPatch, &'static str> {
    let len = insn.bytes.len() as u64;
    if len < 5 {
        return Err("the instruction is shorter than the 5-byte jmp that would replace it");
    }
    let a = &spec.anchors;
    let cpu_number = a
        .cpu_number
        .ok_or("System.map has no per-CPU cpu_number to find this CPU's ring")?;
    let rel_site = spec.at as i64 - (spec.site as i64 + 5);
    if i32::try_from(rel_site).is_err() {
        return Err("the trampoline is beyond rel32 reach of the site");
    }
    let disp = |v: u64| i32::try_from(v).map_err(|_| "a per-CPU offset beyond 2 GiB");
    let r = &spec.rings;
    let mut e = Emitter::default();
    let (restore, nested, publish) = (e.label(), e.label(), e.label());
    e.push(RBP);
    e.rr(0x89, RBP, RSP);
    e.code.extend_from_slice(&[0x9c, 0xfa]);
    for reg in SAVED {
        e.push(reg);
    }
    // This CPU's ring.
    let has_ring = e.label();
    e.load_gs(false, RAX, disp(cpu_number)?);
    e.ri(false, 7, RAX, r.cpus);
    e.jump(Some(JB), has_ring);
    e.count(r.va + RingLayout::NO_RING_OFFSET);
    e.jump(None, restore);
    e.bind(has_ring);
    // imul eax, eax, stride
    e.code.push(0x69);
    e.code.push(0xc0);
    e.code.extend_from_slice(&(r.stride() as u32).to_le_bytes());
    e.movabs(RBX, r.va + r.ring_offset(0));
    e.rr(0x01, RBX, RAX);
    e.mem_imm(false, 0x83, 0, RBX, header::NESTING as i32, &[1]);
    e.mem_imm(false, 0x83, 7, RBX, header::NESTING as i32, &[1]);
    e.jump(Some(JNE), nested);
    e.load(RAX, RBX, header::HEAD as i32);
    e.rr(0x89, RCX, RAX);
    e.mem(true, &[0x2b], RCX, RBX, header::TAIL as i32);
    e.ri(true, 7, RCX, r.records as u32);
    e.jump(Some(JAE), nested);
    e.ri(false, 4, RAX, (r.records - 1) as u32);
    // shl eax, 9: the record's offset
    e.code.extend_from_slice(&[0xc1, 0xe0, 9]);
    e.rr(0x01, RAX, RBX);
    e.lea(RCX, RAX, RING_HEADER as i32);
    e.mem_imm(
        false,
        0xc7,
        0,
        RCX,
        record::TAG as i32,
        &spec.tag.to_le_bytes(),
    );
    e.mem_imm(false, 0xc7, 0, RCX, record::FLAGS as i32, &[0; 4]);
    // rdtsc; shl rdx, 32; or rax, rdx
    e.code
        .extend_from_slice(&[0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20]);
    e.rr(0x09, RAX, RDX);
    e.store(RCX, record::TIME as i32, RAX);
    for reg in 0..16u8 {
        match reg {
            RSP => e.lea(RAX, RBP, 8),
            RBP => e.load(RAX, RBP, 0),
            _ => e.load(RAX, RBP, saved_at(reg)),
        }
        e.store(RCX, record::REGS as i32 + 8 * i32::from(reg), RAX);
    }
    e.movabs(RAX, spec.site);
    e.store(RCX, record::REGS as i32 + 8 * 16, RAX);
    e.load(RAX, RBP, -8);
    e.store(RCX, record::REGS as i32 + 8 * 17, RAX);
    // The task, and the end of the stack the words may be read up to (in RDX; RSI = RSP).
    let page_limit = e.label();
    let have_limit = e.label();
    let filtered = e.label();
    e.lea(RSI, RBP, 8);
    let task = match (a.current_task, a.this_cpu_off, a.task) {
        (Some(current), Some(base), Some(t)) => Some((current, base, t)),
        _ if spec.filter.is_some() => {
            return Err(
                "a task filter needs the task's layout (BTF, current_task) in the trampoline",
            );
        }
        _ => None,
    };
    if let Some((current, base, t)) = task {
        e.load_gs(true, RAX, disp(current)?);
        e.store(RCX, record::TASK as i32, RAX);
        e.load_gs(true, RDX, disp(base)?);
        e.store(RCX, record::TASK_FROM as i32, RDX);
        e.rr(0x85, RAX, RAX);
        // No task: a filter cannot pass (as on the host, where the task cannot be read).
        e.jump(
            Some(JE),
            if spec.filter.is_some() {
                filtered
            } else {
                page_limit
            },
        );
        if let Some(f) = &spec.filter {
            emit_filter(&mut e, f, &t, filtered)?;
        }
        e.load32(RDX, RAX, disp(t.pid)?);
        e.store32(RCX, record::PID as i32, RDX);
        e.load32(RDX, RAX, disp(t.tgid)?);
        e.store32(RCX, record::TGID as i32, RDX);
        e.load(RDX, RAX, disp(t.comm)?);
        e.store(RCX, record::COMM as i32, RDX);
        e.load(RDX, RAX, disp(t.comm)? + 8);
        e.store(RCX, record::COMM as i32 + 8, RDX);
        e.mem_imm(
            false,
            0x81,
            1,
            RCX,
            record::FLAGS as i32,
            &FLAG_TASK.to_le_bytes(),
        );
        // On the task's own stack: up to its end.
        e.load(RDX, RAX, disp(t.stack)?);
        e.rr(0x89, RDI, RSI);
        e.rr(0x29, RDI, RDX);
        e.ri(true, 7, RDI, a.thread_size as u32);
        e.jump(Some(JAE), page_limit);
        e.ri(true, 0, RDX, a.thread_size as u32);
        e.jump(None, have_limit);
    }
    // Elsewhere (IRQ, exception stacks): up to the end of RSP's page.
    e.bind(page_limit);
    e.rr(0x89, RDX, RSI);
    e.ri(true, 1, RDX, 0xfff);
    e.code.extend_from_slice(&[0x48, 0x83, 0xc2, 0x01]);
    e.bind(have_limit);
    for k in 0..STACK_WORDS as i32 {
        let skip = e.label();
        e.lea(RDI, RSI, 8 * k + 8);
        e.rr(0x39, RDI, RDX);
        e.jump(Some(JA), skip);
        e.load(RDI, RSI, 8 * k);
        e.store(RCX, record::STACK as i32 + 8 * k, RDI);
        e.mem_imm(
            false,
            0x81,
            1,
            RCX,
            record::FLAGS as i32,
            &(1u32 << k).to_le_bytes(),
        );
        e.bind(skip);
    }
    e.bind(publish);
    e.mem_imm(true, 0x83, 0, RBX, header::HEAD as i32, &[1]);
    e.mem_imm(false, 0x83, 5, RBX, header::NESTING as i32, &[1]);
    e.jump(None, restore);
    // Nested in another trampoline on this CPU (an NMI), or the ring full: counted, dropped.
    e.bind(nested);
    e.mem_imm(false, 0x83, 5, RBX, header::NESTING as i32, &[1]);
    e.mem_imm(true, 0x83, 0, RBX, header::MISSED as i32, &[1]);
    e.count(r.va + RingLayout::site_missed_offset(spec.tag));
    e.jump(None, restore);
    // Left out by the task filter: a hit all the same, counted, not recorded.
    e.bind(filtered);
    e.mem_imm(false, 0x83, 5, RBX, header::NESTING as i32, &[1]);
    e.count(r.va + RingLayout::site_filtered_offset(spec.tag));
    e.bind(restore);
    for reg in SAVED.iter().rev() {
        e.pop(*reg);
    }
    e.code.extend_from_slice(&[0x9d]);
    e.pop(RBP);
    let mut code = e.finish();
    let here = spec.at + code.len() as u64;
    // `jmp rel32` from the end of the code to `to`.
    let jump_to = |code: &mut Vec<u8>, to: u64| -> Result<(), &'static str> {
        let from = spec.at + code.len() as u64 + 5;
        let rel = i32::try_from(to as i64 - from as i64)
            .map_err(|_| "a branch target is beyond rel32 reach of the trampoline")?;
        code.push(0xe9);
        code.extend_from_slice(&rel.to_le_bytes());
        Ok(())
    };
    match plan {
        StepPlan::Emulate(Emulation::Nop { .. }) => jump_to(&mut code, spec.site + len)?,
        // Branches run from the trampoline as they would have from the text: a call pushes
        // the return address in the text (so the callee returns there and stack traces
        // stay right), then every branch goes to its own target.
        StepPlan::Emulate(Emulation::Jmp { target }) => jump_to(&mut code, *target)?,
        StepPlan::Emulate(Emulation::Call { target, ret }) => {
            // push %rax; movabs $ret,%rax; xchg %rax,(%rsp); jmp target
            code.push(0x50);
            code.extend_from_slice(&[0x48, 0xb8]);
            code.extend_from_slice(&ret.to_le_bytes());
            code.extend_from_slice(&[0x48, 0x87, 0x04, 0x24]);
            jump_to(&mut code, *target)?;
        }
        StepPlan::Emulate(Emulation::Jcc { cond, target, next }) => {
            let from = spec.at + code.len() as u64 + 6;
            let rel = i32::try_from(*target as i64 - from as i64)
                .map_err(|_| "a branch target is beyond rel32 reach of the trampoline")?;
            code.extend_from_slice(&[0x0f, 0x80 | (cond & 0xf)]);
            code.extend_from_slice(&rel.to_le_bytes());
            jump_to(&mut code, *next)?;
        }
        StepPlan::Emulate(_) => {
            return Err(
                "the instruction is emulated by the host (a jump displaces only a nop, a branch or an instruction copied out of line)",
            );
        }
        StepPlan::StepOutOfLine(ool) => {
            let copy = ool
                .boosted_slot(spec.site, here)
                .ok_or("the displaced instruction's copy cannot reach its operand")?;
            code.extend_from_slice(&copy);
        }
    }
    let mut site = vec![0xe9];
    site.extend_from_slice(&(rel_site as i32).to_le_bytes());
    Ok(JumpPatch {
        trampoline: code,
        site,
    })
}

/// The task filter's test, with RAX the task: on to the recording if it passes, else to
/// `filtered`. `comm` compares all 16 bytes (the kernel pads the name with NULs, as
/// `strscpy_pad` leaves it); pid and tgid one `u32`.
fn emit_filter(
    e: &mut Emitter,
    f: &TaskFilter,
    t: &crate::jump::TaskOffsets,
    filtered: usize,
) -> Result<(), &'static str> {
    let disp = |v: u64| i32::try_from(v).map_err(|_| "a task_struct offset beyond 2 GiB");
    let (test, equal) = FilterTest::of(f, t)?;
    let pass = e.label();
    // Where a mismatch goes, and where a match goes.
    let (on_mismatch, on_match) = if equal {
        (filtered, pass)
    } else {
        (pass, filtered)
    };
    match test {
        FilterTest::NeverEqual => e.jump(None, on_mismatch),
        FilterTest::Comm { at, halves } => {
            for (half, v) in halves.into_iter().enumerate() {
                e.movabs(RDX, v);
                // cmp rdx, [rax + comm + 8 * half]
                e.mem(true, &[0x3b], RDX, RAX, disp(at)? + 8 * half as i32);
                e.jump(Some(JNE), on_mismatch);
            }
            e.jump(None, on_match);
        }
        FilterTest::Word { at, value } => {
            e.mem_imm(false, 0x81, 7, RAX, disp(at)?, &value.to_le_bytes());
            e.jump(Some(JNE), on_mismatch);
            e.jump(None, on_match);
        }
    }
    e.bind(pass);
    Ok(())
}

/// The registers a record holds: the GPRs in encoding order, RIP, RFLAGS; GS base is where
/// the task pointer was read.
pub fn registers(rec: &crate::jump::JumpRecord) -> super::Registers {
    let mut regs = super::Registers::default();
    regs.gpr.copy_from_slice(&rec.regs[..16]);
    regs.rip = rec.regs[16];
    regs.rflags = rec.regs[17];
    regs.gs_base = rec.task_from;
    regs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::InstructionDecoder;
    use crate::arch::x86_64::decode::Decoder;
    use crate::jump::{GuestAnchors, TaskOffsets};
    use capstone::prelude::*;

    const SITE: u64 = 0xffff_ffff_8120_0000;
    const AT: u64 = 0xffff_ffff_7fe0_0100;

    fn spec() -> TrampolineSpec {
        TrampolineSpec {
            tag: 3,
            site: SITE,
            at: AT,
            rings: RingLayout::new(0xffff_ffff_7ff0_0000, 0x10_0000_0000, 2, 128).unwrap(),
            anchors: GuestAnchors {
                cpu_number: Some(0x1f0a0),
                current_task: Some(0x1fbc0),
                this_cpu_off: Some(0x1f0a8),
                task: Some(TaskOffsets {
                    pid: 0x5a8,
                    tgid: 0x5ac,
                    comm: 0x7a8,
                    stack: 0x18,
                }),
                thread_size: 16384,
            },
            filter: None,
        }
    }

    fn disassemble(code: &[u8], at: u64) -> Vec<String> {
        let cs = Capstone::new()
            .x86()
            .mode(arch::x86::ArchMode::Mode64)
            .build()
            .unwrap();
        let insns = cs.disasm_all(code, at).unwrap();
        let total: usize = insns.iter().map(|i| i.bytes().len()).sum();
        assert_eq!(total, code.len(), "every byte is an instruction");
        insns
            .iter()
            .map(|i| format!("{} {}", i.mnemonic().unwrap(), i.op_str().unwrap()))
            .collect()
    }

    fn plan_of(bytes: &[u8]) -> (Instruction, StepPlan<Emulation, OutOfLine>) {
        let d = Decoder::new().unwrap();
        let insn =
            InstructionDecoder::<crate::arch::x86_64::X86_64>::decode(&d, bytes, SITE).unwrap();
        let plan = InstructionDecoder::<crate::arch::x86_64::X86_64>::plan(&d, &insn).unwrap();
        (insn, plan)
    }

    #[test]
    fn the_fentry_nop_trampoline_disassembles_to_the_template() {
        let (insn, plan) = plan_of(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
        let p = patch(&plan, &insn, &spec()).unwrap();
        let text = disassemble(&p.trampoline, AT);
        let expect_prefix = [
            "push rbp",
            "mov rbp, rsp",
            "pushfq ",
            "cli ",
            "push rax",
            "push rcx",
        ];
        assert_eq!(&text[..6], &expect_prefix);
        assert!(text.contains(&"mov eax, dword ptr gs:[0x1f0a0]".to_string()));
        assert!(text.contains(&"mov rax, qword ptr gs:[0x1fbc0]".to_string()));
        assert!(text.contains(&"rdtsc ".to_string()));
        assert!(text.contains(&"cmp rcx, 0x80".to_string()));
        assert!(text.contains(&"lock add qword ptr [rax], 1".to_string()));
        assert!(
            !text
                .iter()
                .any(|t| t.starts_with("ret") || t.starts_with("call"))
        );
        let n = text.len();
        assert_eq!(&text[n - 4..n - 1], &["pop rax", "popfq ", "pop rbp"]);
        assert_eq!(text[n - 1], format!("jmp {:#x}", SITE + 5));
        // Pushes and pops balance.
        let pushes = text.iter().filter(|t| t.starts_with("push")).count();
        let pops = text.iter().filter(|t| t.starts_with("pop")).count();
        assert_eq!(pushes, pops);
        let site = disassemble(&p.site, SITE);
        assert_eq!(site, vec![format!("jmp {AT:#x}")]);
    }

    #[test]
    fn a_copied_instruction_runs_after_the_recording_and_jumps_back() {
        // mov rax, qword ptr [rip + 0x1000]: relocated for the trampoline's address.
        let (insn, plan) = plan_of(&[0x48, 0x8b, 0x05, 0x00, 0x10, 0x00, 0x00]);
        let p = patch(&plan, &insn, &spec()).unwrap();
        let text = disassemble(&p.trampoline, AT);
        let n = text.len();
        assert_eq!(text[n - 1], format!("jmp {:#x}", SITE + 7));
        assert!(
            text[n - 2].starts_with("mov rax, qword ptr"),
            "{:?}",
            &text[n - 3..]
        );
        // Too short, emulated: refused with a reason.
        let (insn, plan) = plan_of(&[0x55]);
        assert!(
            patch(&plan, &insn, &spec())
                .unwrap_err()
                .contains("shorter")
        );
        let (insn, plan) = plan_of(&[0x48, 0x81, 0xec, 0, 1, 0, 0]);
        assert!(
            patch(&plan, &insn, &spec())
                .unwrap_err()
                .contains("emulated")
        );
    }

    #[test]
    fn displaced_branches_go_to_their_targets_and_a_call_returns_to_the_text() {
        let tail = |bytes: &[u8], n: usize| {
            let (insn, plan) = plan_of(bytes);
            let p = patch(&plan, &insn, &spec()).unwrap();
            let text = disassemble(&p.trampoline, AT);
            text[text.len() - n..].to_vec()
        };
        // call SITE+0x105: the return address pushed is SITE+5, in the text.
        assert_eq!(
            tail(&[0xe8, 0, 1, 0, 0], 4),
            [
                "push rax".to_string(),
                format!("movabs rax, {:#x}", SITE + 5),
                "xchg qword ptr [rsp], rax".to_string(),
                format!("jmp {:#x}", SITE + 0x105)
            ]
        );
        assert_eq!(
            tail(&[0xe9, 0, 1, 0, 0], 1),
            [format!("jmp {:#x}", SITE + 0x105)]
        );
        // jne rel32 (6 bytes): taken to its target, else on after it.
        assert_eq!(
            tail(&[0x0f, 0x85, 0, 1, 0, 0], 2),
            [
                format!("jne {:#x}", SITE + 0x106),
                format!("jmp {:#x}", SITE + 6)
            ]
        );
    }

    #[test]
    fn a_task_filter_is_tested_in_the_trampoline_and_counts_what_it_leaves_out() {
        let (insn, plan) = plan_of(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
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
        // "getpid-l", "oop\0..." against the two halves of comm, before the pid is read.
        let first = at("movabs rdx, 0x6c2d646970746567");
        assert_eq!(text[first + 1], "cmp rdx, qword ptr [rax + 0x7a8]");
        assert_eq!(text[first + 3], "movabs rdx, 0x706f6f");
        assert_eq!(text[first + 4], "cmp rdx, qword ptr [rax + 0x7b0]");
        assert!(first < at("mov edx, dword ptr [rax + 0x5a8]"));
        // The filtered-out count is a counters-page word of its own.
        let filtered = s.rings.va + RingLayout::site_filtered_offset(3);
        at(&format!("movabs rax, {filtered:#x}"));
        s.filter = crate::definition::ProbeDefinition::parse("p f if pid != 7")
            .unwrap()
            .filter;
        let text = disassemble(&patch(&plan, &insn, &s).unwrap().trampoline, AT);
        assert!(text.contains(&"cmp dword ptr [rax + 0x5a8], 7".to_string()));
        s.anchors.task = None;
        assert!(patch(&plan, &insn, &s).unwrap_err().contains("filter"));
    }

    #[test]
    fn without_a_cpu_number_there_is_no_trampoline() {
        let (insn, plan) = plan_of(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
        let mut s = spec();
        s.anchors.cpu_number = None;
        assert!(patch(&plan, &insn, &s).unwrap_err().contains("cpu_number"));
    }
}
