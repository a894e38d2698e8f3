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
    KernelUnwinder, MAX_FRAMES, PerCpuStack, StackKind, StackLayout, StackPointerKind, StackReader,
    StackTrace, Stacks, TopRegs, TraceEnd, Unwind, UnwindError, UnwindStop, UnwindTables, symbol,
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

    fn tables(_: &UnwindTables, _: &Btf, _: &SymbolMap) -> Result<(), UnwindError> {
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
        let mut frames = vec![ctx.regs.pc];
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

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::fake::aarch64::{STACK_GPA, STACK_VA, TCR, TEXT_VA, machine};
    use crate::unwind::testing::{layout, task_stack};

    const T: u64 = TEXT_VA;
    const S: u64 = STACK_VA;
    /// The `pt_regs` at the top of the task stack, and its frame record.
    const REGS: u64 = S + 4096 - 336;
    const FINAL: u64 = REGS + 304;

    fn put(mem: &GuestMemoryMmap, va: u64, v: u64) {
        mem.write_obj(v, GuestAddress(STACK_GPA + (va - S)))
            .unwrap();
    }

    fn walk_at(mem: &GuestMemoryMmap, regs: &crate::arch::aarch64::Registers) -> StackTrace {
        let unwinder = KernelUnwinder::<Aarch64>::from_parts((), layout(true));
        let ctx = crate::fake::aarch64::context(mem, regs);
        let mut reader = StackReader::new(&ctx);
        Aarch64::walk(&ctx, &unwinder, &mut reader, &task_stack(S), 0)
    }

    #[test]
    fn pointer_authentication_codes_are_stripped_as_linux_does() {
        let signed = 0x12ba_8000_0801_0040;
        assert_eq!(strip_pac(signed, TCR), 0xffff_8000_0801_0040);
        // A user address (bit 55 clear) loses its code instead.
        assert_eq!(strip_pac(0x003a_0000_0040_1000, TCR), 0x0000_0000_0040_1000);
        // 52-bit kernel half (T1SZ = 12).
        assert_eq!(
            strip_pac(0x12b0_0000_0801_0040, 12 << 16),
            0xfff0_0000_0801_0040
        );
    }

    #[test]
    fn frame_records_are_followed_to_the_final_record_and_end_at_user_mode_or_a_kthread() {
        let (engine, mut vcpu) = machine();
        let mem = engine.memory();
        put(mem, S + 0x100, S + 0x200);
        put(mem, S + 0x108, 0x12ba_8000_0801_0040); // signed return address
        put(mem, S + 0x200, FINAL);
        put(mem, S + 0x208, T + 0x80);
        put(mem, REGS + 256, 0x40_1000); // pt_regs->pc: user mode
        put(mem, REGS + 264, 0);
        vcpu.regs.pc = T + 0x10;
        vcpu.regs.x[29] = S + 0x100;
        let t = walk_at(mem, &vcpu.regs);
        assert_eq!(t.frames, vec![T + 0x10, T + 0x40, T + 0x80]);
        assert_eq!(t.end, TraceEnd::UserMode);
        // A kernel thread's registers at the top are zero.
        put(mem, REGS + 256, 0);
        assert_eq!(walk_at(mem, &vcpu.regs).end, TraceEnd::EndOfStack);
    }

    #[test]
    fn loops_misaligned_and_foreign_frame_pointers_end_unreliable() {
        let (engine, mut vcpu) = machine();
        let mem = engine.memory();
        vcpu.regs.pc = T + 0x10;
        // A record pointing back down.
        put(mem, S + 0x100, S + 0x200);
        put(mem, S + 0x108, T + 0x40);
        put(mem, S + 0x200, S + 0x100);
        put(mem, S + 0x208, T + 0x80);
        vcpu.regs.x[29] = S + 0x100;
        let t = walk_at(mem, &vcpu.regs);
        assert_eq!(t.frames, vec![T + 0x10, T + 0x40, T + 0x80]);
        assert_eq!(
            t.end,
            TraceEnd::Unreliable(UnwindStop::WrongDirection(S + 0x100))
        );
        vcpu.regs.x[29] = S + 0x104;
        assert_eq!(
            walk_at(mem, &vcpu.regs).end,
            TraceEnd::Unreliable(UnwindStop::Misaligned(S + 0x104))
        );
        vcpu.regs.x[29] = 0xffff_0000_1234_0000;
        assert_eq!(
            walk_at(mem, &vcpu.regs).end,
            TraceEnd::Unreliable(UnwindStop::OffStack(0xffff_0000_1234_0000))
        );
        vcpu.regs.x[29] = 0;
        let t = walk_at(mem, &vcpu.regs);
        assert_eq!((t.frames.len(), t.end), (1, TraceEnd::EndOfStack));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::unwind::testing::fuzz_cases(2000)))]

        /// Any stack contents: the walk ends within the frame limit, without a panic.
        #[test]
        fn any_stack_contents_end_the_walk(
            words in proptest::collection::vec(proptest::prelude::any::<u64>(), 512),
            fp in 0u64..4096,
        ) {
            let (engine, mut vcpu) = machine();
            let mem = engine.memory();
            for (i, w) in words.iter().enumerate() {
                let v = if w % 3 == 0 { S + (w >> 8) % 4096 } else { *w };
                put(mem, S + 8 * i as u64, v);
            }
            vcpu.regs.x[29] = S + fp;
            let t = walk_at(mem, &vcpu.regs);
            proptest::prop_assert!(t.frames.len() <= MAX_FRAMES + 1);
        }
    }
}
