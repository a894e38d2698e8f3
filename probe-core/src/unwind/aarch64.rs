//! The arm64 walker: Linux's frame-record unwinder (`arch/arm64/kernel/stacktrace.c`, 6.1) run
//! from the host. Every kernel function built with frame pointers stores `{x29, x30}` (the
//! caller's frame record and the return address) and points x29 at it; exception entry does
//! the same in `pt_regs->stackframe` with the interrupted PC, so the chain crosses interrupts
//! and exceptions by itself. The walk starts from the hit's PC and x29, strips pointer
//! authentication codes from return addresses (`ptrauth_strip_insn_pac`), and ends at the
//! task's final frame record (in the `pt_regs` at the top of its stack).
//!
//! As in Linux, a hit before a function has stored its frame record (its first instructions)
//! does not show the function's immediate caller: x29 still points at the caller's record.

use crate::arch::aarch64::Aarch64;
use crate::btf::Btf;
use crate::probe::ProbeContext;
use crate::symbols::SymbolMap;
use crate::unwind::{
    KernelUnwinder, MAX_FRAMES, PerCpuStack, StackKind, StackLayout, StackPointerKind,
    StackReader, StackTrace, Stacks, TopRegs, TraceEnd, Unwind, UnwindError, UnwindStop, UnwindTables, symbol,
};

/// `THREAD_SIZE` and `IRQ_STACK_SIZE` (16 KiB without KASAN).
const STACK_SIZE: u64 = 16 << 10;
/// `OVERFLOW_STACK_SIZE`.
const OVERFLOW_STACK_SIZE: u64 = 4 << 10;
/// `offsetof(struct pt_regs, pc)` and `pstate` (the `user_pt_regs` ABI).
const PT_REGS_PC: u64 = 32 * 8;
const PT_REGS_PSTATE: u64 = 33 * 8;

/// A return address without its pointer authentication code (`ptrauth_strip_insn_pac`):
/// kernel addresses (bit 55 set) get every bit above the virtual address size set, user ones
/// cleared. `tcr` gives the kernel half's size (T1SZ); 48 bits if it reads zero.
pub fn strip_pac(addr: u64, tcr: u64) -> u64 {
    let t1sz = (tcr >> 16) & 0x3f;
    let va_bits = if t1sz == 0 { 48 } else { 64 - t1sz };
    let mask = !0u64 << va_bits;
    if addr & (1 << 55) != 0 {
        addr | mask
    } else {
        addr & !mask
    }
}

impl Unwind for Aarch64 {
    type Tables = ();

    fn tables(_: &UnwindTables) -> Result<(), UnwindError> {
        Ok(())
    }

    fn stack_layout(btf: &Btf, map: &SymbolMap) -> Result<StackLayout, UnwindError> {
        let mut per_cpu = vec![PerCpuStack {
            kind: StackKind::Irq,
            symbol: symbol(map, "irq_stack_ptr")?,
            points: StackPointerKind::Base,
            size: STACK_SIZE,
        }];
        if let Ok(s) = map.lookup("overflow_stack") {
            per_cpu.push(PerCpuStack {
                kind: StackKind::Overflow,
                symbol: s.addr,
                points: StackPointerKind::Inline,
                size: OVERFLOW_STACK_SIZE,
            });
        }
        let regs = btf.struct_size("pt_regs")?;
        let record = btf.member_offset("pt_regs", "stackframe")?;
        Ok(StackLayout {
            task_stack: btf.member_offset("task_struct", "stack")?,
            thread_size: STACK_SIZE,
            per_cpu,
            per_cpu_offset: symbol(map, "__per_cpu_offset")?,
            nr_cpu_ids: symbol(map, "nr_cpu_ids")?,
            per_cpu_slid: true,
            top_regs: Some(TopRegs { size: regs, record }),
        })
    }

    fn walk(
        ctx: &ProbeContext<'_, Aarch64>,
        unwinder: &KernelUnwinder<Aarch64>,
        reader: &mut StackReader<'_, Aarch64>,
        stacks: &Stacks,
        _slide: u64,
    ) -> StackTrace {
        let mut stacks = stacks.clone();
        let mut frames = vec![ctx.address];
        // The registers at the top of the task's stack, and the frame record in them.
        let top = stacks
            .find_kind(StackKind::Task)
            .zip(unwinder.layout.top_regs)
            .map(|(t, r)| t.top.wrapping_sub(r.size))
            .zip(unwinder.layout.top_regs);
        let mut fp = ctx.regs.x[29];
        let end = loop {
            if let Some((regs, layout)) = top
                && fp == regs.wrapping_add(layout.record)
            {
                break user_or_end(reader, regs);
            }
            if fp == 0 {
                break TraceEnd::EndOfStack;
            }
            if frames.len() >= MAX_FRAMES {
                break TraceEnd::Unreliable(UnwindStop::TooDeep(MAX_FRAMES));
            }
            if fp & 7 != 0 {
                break TraceEnd::Unreliable(UnwindStop::Misaligned(fp));
            }
            if let Err(why) = stacks.step(fp, 16) {
                break TraceEnd::Unreliable(why);
            }
            let record = reader
                .read_u64(fp)
                .and_then(|next| Ok((next, reader.read_u64(fp + 8)?)));
            let (next, lr) = match record {
                Ok(r) => r,
                Err(why) => break TraceEnd::Unreliable(why),
            };
            frames.push(ctx.returns.real(fp, strip_pac(lr, ctx.regs.tcr)));
            fp = next;
        };
        StackTrace { frames, end }
    }
}

/// How a walk that reached the task's final frame record ends: at user mode if the registers
/// saved at the top of the stack (at `regs`) are a user context (EL0, a PC), else at the
/// kernel's end of the stack (a kernel thread's or idle task's zeroed registers).
fn user_or_end(reader: &mut StackReader<'_, Aarch64>, regs: u64) -> TraceEnd {
    let pc = reader.read_u64(regs + PT_REGS_PC).unwrap_or(0);
    let pstate = reader.read_u64(regs + PT_REGS_PSTATE).unwrap_or(0);
    if pc != 0 && pstate & 0xf == 0 {
        TraceEnd::UserMode
    } else {
        TraceEnd::EndOfStack
    }
}
