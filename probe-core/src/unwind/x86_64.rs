//! The x86_64 walker: Linux's ORC unwinder (`arch/x86/kernel/unwind_orc.c`, 6.1) run from the
//! host. Each step looks up the rule for the current address (the address itself for the hit
//! and for an interrupted frame, the address before a return address otherwise), computes the
//! caller's stack pointer (the CFA) from `%rsp`, `%rbp`, a saved register or a stack slot,
//! and finds the caller's address in the slot below the CFA (a call), in the `pt_regs` at the
//! CFA (an interrupt or exception entry), or in the IRET frame there. The walk ends at the
//! kernel's end-of-stack rule (kernel threads, idle) or at registers saved from user mode.

use crate::arch::x86_64::{Gpr, X86_64};
use crate::btf::Btf;
use crate::probe::ProbeContext;
use crate::symbols::SymbolMap;
use crate::unwind::orc::{OrcLayout, OrcReg, OrcTable, OrcType};
use crate::unwind::{
    KernelUnwinder, MAX_FRAMES, PerCpuStack, StackKind, StackLayout, StackPointerKind,
    StackReader, StackTrace, Stacks, TraceEnd, Unwind, UnwindError, UnwindStop, UnwindTables,
    symbol,
};

/// `THREAD_SIZE` and `IRQ_STACK_SIZE` without KASAN.
const STACK_SIZE: u64 = 16 << 10;
/// `sizeof(struct pt_regs)`.
const PT_REGS_SIZE: u64 = 21 * 8;
/// `offsetof(struct pt_regs, ip)`: where the IRET frame starts.
const IRET_FRAME_OFFSET: u64 = 16 * 8;
/// `sizeof` the IRET frame (ip, cs, flags, sp, ss).
const IRET_FRAME_SIZE: u64 = 5 * 8;

/// `offsetof(struct pt_regs, REG)` for the registers an ORC rule can name.
fn pt_regs_offset(r: Gpr) -> u64 {
    match r {
        Gpr::R13 => 16,
        Gpr::Rbp => 32,
        Gpr::R10 => 56,
        Gpr::Rdx => 96,
        Gpr::Rdi => 112,
        _ => unreachable!("ORC names only r13, rbp, r10, rdx and rdi"),
    }
}

/// Where the registers of the current frame are, for rules that name one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SavedRegs {
    /// None (a call frame: callee-clobbered registers are gone).
    None,
    /// The vCPU's own registers (the hit).
    Vcpu,
    /// A full `pt_regs` in guest memory.
    Full(u64),
    /// Only the IRET frame of a `pt_regs` (the rest is not saved).
    Partial,
}

impl Unwind for X86_64 {
    type Tables = OrcTable;

    fn tables(t: &UnwindTables) -> Result<OrcTable, UnwindError> {
        let orc = t.orc.as_ref().ok_or_else(|| {
            UnwindError::Tables(
                "the vmlinux has no ORC tables (.orc_unwind_ip, .orc_unwind): hvprobe unwinds x86_64 kernels built with CONFIG_UNWINDER_ORC".into(),
            )
        })?;
        let layout = OrcLayout::for_release(t.release.0, t.release.1)
            .map_err(|e| UnwindError::Tables(e.to_string()))?;
        OrcTable::parse(&orc.ip, orc.ip_va, &orc.orc, layout)
            .map_err(|e| UnwindError::Tables(format!("the vmlinux's ORC tables: {e}")))
    }

    fn stack_layout(btf: &Btf, map: &SymbolMap) -> Result<StackLayout, UnwindError> {
        // 6.1 has the per-CPU pointer itself; 6.2 moved it into struct pcpu_hot.
        let irq = match map.lookup("hardirq_stack_ptr") {
            Ok(s) => s.addr,
            Err(_) => {
                symbol(map, "pcpu_hot")? + btf.member_offset("pcpu_hot", "hardirq_stack_ptr")?
            }
        };
        Ok(StackLayout {
            task_stack: btf.member_offset("task_struct", "stack")?,
            thread_size: STACK_SIZE,
            per_cpu: vec![PerCpuStack {
                kind: StackKind::Irq,
                symbol: irq,
                points: StackPointerKind::TopWord,
                size: STACK_SIZE,
            }],
            per_cpu_offset: symbol(map, "__per_cpu_offset")?,
            nr_cpu_ids: symbol(map, "nr_cpu_ids")?,
            per_cpu_slid: false,
            top_regs: None,
        })
    }

    fn walk(
        ctx: &ProbeContext<'_, X86_64>,
        unwinder: &KernelUnwinder<X86_64>,
        reader: &mut StackReader<'_, X86_64>,
        stacks: &Stacks,
        slide: u64,
    ) -> StackTrace {
        let mut walk = OrcWalk {
            ctx,
            orc: &unwinder.tables,
            reader,
            stacks: stacks.clone(),
            slide,
            ip: ctx.address,
            sp: ctx.regs.get(Gpr::Rsp),
            bp: ctx.regs.get(Gpr::Rbp),
            regs: SavedRegs::Vcpu,
            prev_full: None,
            signal: true,
        };
        let mut frames = vec![ctx.address];
        let end = walk.run(&mut frames);
        StackTrace { frames, end }
    }
}

/// The state of one ORC walk (Linux's `struct unwind_state`).
struct OrcWalk<'a, 'r, 'c> {
    ctx: &'a ProbeContext<'c, X86_64>,
    orc: &'a OrcTable,
    reader: &'a mut StackReader<'r, X86_64>,
    stacks: Stacks,
    slide: u64,
    ip: u64,
    sp: u64,
    bp: u64,
    regs: SavedRegs,
    /// The last full register set, for a partial frame after it.
    prev_full: Option<SavedRegs>,
    /// The current address is an interrupted one (not a return address).
    signal: bool,
}

impl OrcWalk<'_, '_, '_> {
    fn run(&mut self, frames: &mut Vec<u64>) -> TraceEnd {
        if let Err(why) = self.stacks.start(self.sp) {
            return TraceEnd::Unreliable(why);
        }
        loop {
            if frames.len() >= MAX_FRAMES {
                return TraceEnd::Unreliable(UnwindStop::TooDeep(MAX_FRAMES));
            }
            match self.step() {
                Ok(Step::Frame) => frames.push(self.ip),
                Ok(Step::End(end)) => return end,
                Err(why) => return TraceEnd::Unreliable(why),
            }
        }
    }

    /// A word on a known stack.
    fn stack_word(&mut self, addr: u64) -> Result<u64, UnwindStop> {
        if self.stacks.find(addr, 8).is_none() {
            return Err(UnwindStop::OffStack(addr));
        }
        self.reader.read_u64(addr)
    }

    /// The value of `r` in the current frame, if it was saved.
    fn reg(&mut self, r: Gpr) -> Option<u64> {
        let regs = match self.regs {
            SavedRegs::Partial => self.prev_full?,
            other => other,
        };
        match regs {
            SavedRegs::Vcpu => Some(self.ctx.regs.get(r)),
            SavedRegs::Full(at) => self.stack_word(at + pt_regs_offset(r)).ok(),
            SavedRegs::None | SavedRegs::Partial => None,
        }
    }

    fn step(&mut self) -> Result<Step, UnwindStop> {
        let ip = self.ip;
        let bad = |why| UnwindStop::BadRule { ip, why };
        let at = if self.signal { ip } else { ip.wrapping_sub(1) };
        let rule = self
            .orc
            .lookup(at.wrapping_sub(self.slide))
            .ok_or(UnwindStop::NoUnwindData(ip))?;
        if rule.sp_reg == OrcReg::Undefined {
            return if rule.end {
                Ok(Step::End(TraceEnd::EndOfStack))
            } else {
                Err(bad("no stack pointer rule"))
            };
        }
        let offset = i64::from(rule.sp_offset);
        let cfa = match rule.sp_reg {
            OrcReg::Sp => self.sp.wrapping_add_signed(offset),
            OrcReg::Bp => self.bp.wrapping_add_signed(offset),
            OrcReg::SpIndirect => self.stack_word(self.sp)?.wrapping_add_signed(offset),
            OrcReg::BpIndirect => self.stack_word(self.bp.wrapping_add_signed(offset))?,
            OrcReg::R10 => self.reg(Gpr::R10).ok_or(bad("r10 not saved"))?,
            OrcReg::R13 => self.reg(Gpr::R13).ok_or(bad("r13 not saved"))?,
            OrcReg::Di => self.reg(Gpr::Rdi).ok_or(bad("rdi not saved"))?,
            OrcReg::Dx => self.reg(Gpr::Rdx).ok_or(bad("rdx not saved"))?,
            _ => return Err(bad("unknown stack pointer base")),
        };
        let cs;
        match rule.kind {
            OrcType::Call => {
                let slot = cfa.wrapping_sub(8);
                let ret = self.stack_word(slot)?;
                self.ip = self.ctx.returns.real(slot, ret);
                self.sp = cfa;
                self.regs = SavedRegs::None;
                self.prev_full = None;
                self.signal = false;
                cs = 0;
            }
            OrcType::Regs => {
                if self.stacks.find(cfa, PT_REGS_SIZE).is_none() {
                    return Err(UnwindStop::OffStack(cfa));
                }
                self.ip = self.stack_word(cfa + IRET_FRAME_OFFSET)?;
                cs = self.stack_word(cfa + IRET_FRAME_OFFSET + 8)?;
                self.sp = self.stack_word(cfa + IRET_FRAME_OFFSET + 24)?;
                self.regs = SavedRegs::Full(cfa);
                self.prev_full = None;
                self.signal = true;
            }
            OrcType::RegsPartial => {
                if self.stacks.find(cfa, IRET_FRAME_SIZE).is_none() {
                    return Err(UnwindStop::OffStack(cfa));
                }
                self.ip = self.stack_word(cfa)?;
                cs = self.stack_word(cfa + 8)?;
                self.sp = self.stack_word(cfa + 24)?;
                if matches!(self.regs, SavedRegs::Vcpu | SavedRegs::Full(_)) {
                    self.prev_full = Some(self.regs);
                }
                self.regs = SavedRegs::Partial;
                self.signal = true;
            }
            OrcType::Other(_) => return Err(bad("unknown frame type")),
        }
        // Registers saved from user mode: the kernel's part of the stack is done.
        if cs & 3 != 0 {
            return Ok(Step::End(TraceEnd::UserMode));
        }
        let bp_offset = i64::from(rule.bp_offset);
        match rule.bp_reg {
            OrcReg::Undefined => {
                if let Some(bp) = self.reg(Gpr::Rbp) {
                    self.bp = bp;
                }
            }
            OrcReg::PrevSp => self.bp = self.stack_word(cfa.wrapping_add_signed(bp_offset))?,
            OrcReg::Bp => self.bp = self.stack_word(self.bp.wrapping_add_signed(bp_offset))?,
            _ => return Err(bad("unknown frame pointer base")),
        }
        self.stacks.step(self.sp, 8)?;
        Ok(Step::Frame)
    }
}

/// What one step found.
enum Step {
    /// Another frame, at the walk's new address.
    Frame,
    /// The end.
    End(TraceEnd),
}
