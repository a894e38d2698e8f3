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
    KernelUnwinder, MAX_FRAMES, PerCpuStack, StackKind, StackLayout, StackPointerKind, StackReader,
    StackTrace, Stacks, TraceEnd, Unwind, UnwindError, UnwindStop, UnwindTables, symbol,
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

/// The ORC table and the text it covers (Linux's `orc_find` looks up only addresses in core
/// kernel text and init text: anything else, a module, a BPF program or an ftrace
/// trampoline, has no rule here).
#[derive(Debug, Clone)]
pub struct OrcUnwind {
    /// The table.
    pub table: OrcTable,
    /// `[_stext, _etext)` and `[_sinittext, _einittext)`, as linked.
    pub text: Vec<(u64, u64)>,
    /// Where the guest's ftrace keeps its trampolines, if its BTF and symbols say.
    pub ftrace: Option<FtraceTrampolines>,
}

/// The guest's ftrace trampolines (Linux's `orc_ftrace_find`): a trampoline is a copy of
/// `ftrace_regs_caller` (or `ftrace_caller`) made at run time outside kernel text, so an
/// address in one is looked up at the same offset in the original. The trampolines are found
/// on the guest's `ftrace_ops_list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FtraceTrampolines {
    /// `ftrace_ops_list` and `ftrace_list_end` (its end marker).
    pub list: (u64, u64),
    /// `offsetof(struct ftrace_ops, ...)`: `next`, `flags`, `trampoline`, `trampoline_size`.
    pub next: u64,
    /// See `next`.
    pub flags: u64,
    /// See `next`.
    pub trampoline: u64,
    /// See `next`.
    pub size: u64,
    /// `ftrace_regs_caller` and `ftrace_caller`.
    pub originals: (u64, u64),
}

/// `FTRACE_OPS_FL_SAVE_REGS`: the trampoline is a copy of `ftrace_regs_caller`.
const FTRACE_OPS_FL_SAVE_REGS: u64 = 1 << 2;
/// Most ftrace_ops a lookup walks.
const MAX_FTRACE_OPS: usize = 64;

impl FtraceTrampolines {
    fn from_kernel(btf: &Btf, map: &SymbolMap) -> Result<FtraceTrampolines, UnwindError> {
        let off = |m: &str| btf.member_offset("ftrace_ops", m);
        Ok(FtraceTrampolines {
            list: (
                symbol(map, "ftrace_ops_list")?,
                symbol(map, "ftrace_list_end")?,
            ),
            next: off("next")?,
            flags: off("flags")?,
            trampoline: off("trampoline")?,
            size: off("trampoline_size")?,
            originals: (
                symbol(map, "ftrace_regs_caller")?,
                symbol(map, "ftrace_caller")?,
            ),
        })
    }

    /// Where `ip` (a running address) would be in the original code, if it is in one of the
    /// guest's trampolines (System.map address).
    fn original(&self, reader: &mut StackReader<'_, X86_64>, ip: u64, slide: u64) -> Option<u64> {
        let end = self.list.1.wrapping_add(slide);
        let mut op = reader.read_u64(self.list.0.wrapping_add(slide)).ok()?;
        for _ in 0..MAX_FTRACE_OPS {
            if op == 0 || op == end {
                return None;
            }
            let tramp = reader.read_u64(op.wrapping_add(self.trampoline)).ok()?;
            let size = reader.read_u64(op.wrapping_add(self.size)).ok()?;
            if tramp != 0 && (tramp..tramp.wrapping_add(size)).contains(&ip) {
                let flags = reader.read_u64(op.wrapping_add(self.flags)).ok()?;
                let base = if flags & FTRACE_OPS_FL_SAVE_REGS != 0 {
                    self.originals.0
                } else {
                    self.originals.1
                };
                return Some(base + (ip - tramp));
            }
            op = reader.read_u64(op.wrapping_add(self.next)).ok()?;
        }
        None
    }
}

impl OrcUnwind {
    /// The rule at `ip` (as linked), if `ip` is in text the table covers.
    pub fn lookup(&self, ip: u64) -> Option<crate::unwind::orc::OrcEntry> {
        self.text
            .iter()
            .any(|(s, e)| (*s..*e).contains(&ip))
            .then(|| self.table.lookup(ip))
            .flatten()
    }
}

impl Unwind for X86_64 {
    type Tables = OrcUnwind;

    fn tables(t: &UnwindTables, btf: &Btf, map: &SymbolMap) -> Result<OrcUnwind, UnwindError> {
        let range = |s: &'static str, e: &'static str| {
            Ok::<_, UnwindError>((symbol(map, s)?, symbol(map, e)?))
        };
        let mut text = vec![range("_stext", "_etext")?];
        text.extend(range("_sinittext", "_einittext").ok());
        let orc = t.orc.as_ref().ok_or_else(|| {
            UnwindError::Tables(
                "the vmlinux has no ORC tables (.orc_unwind_ip, .orc_unwind): hvprobe unwinds x86_64 kernels built with CONFIG_UNWINDER_ORC".into(),
            )
        })?;
        let layout = OrcLayout::for_release(t.release.0, t.release.1)
            .map_err(|e| UnwindError::Tables(e.to_string()))?;
        let table = OrcTable::parse(&orc.ip, orc.ip_va, &orc.orc, layout)
            .map_err(|e| UnwindError::Tables(format!("the vmlinux's ORC tables: {e}")))?;
        Ok(OrcUnwind {
            table,
            text,
            ftrace: FtraceTrampolines::from_kernel(btf, map).ok(),
        })
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
            ip: ctx.regs.rip,
            sp: ctx.regs.get(Gpr::Rsp),
            bp: ctx.regs.get(Gpr::Rbp),
            regs: SavedRegs::Vcpu,
            prev_full: None,
            signal: true,
        };
        let mut frames = vec![ctx.regs.rip];
        let end = walk.run(&mut frames);
        StackTrace { frames, end }
    }
}

/// The state of one ORC walk (Linux's `struct unwind_state`).
struct OrcWalk<'a, 'r, 'c> {
    ctx: &'a ProbeContext<'c, X86_64>,
    orc: &'a OrcUnwind,
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
        let linked = at.wrapping_sub(self.slide);
        let rule = match self.orc.lookup(linked) {
            Some(r) => r,
            None => self
                .orc
                .ftrace
                .and_then(|f| f.original(self.reader, at, self.slide))
                .and_then(|orig| self.orc.lookup(orig))
                .ok_or(UnwindStop::NoUnwindData(ip))?,
        };
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

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::fake::{STACK_GPA, STACK_VA, TEXT_VA, machine};
    use crate::probe::ReturnRecovery;
    use crate::unwind::orc::OrcLayout;
    use crate::unwind::testing::{layout, task_stack};

    const T: u64 = TEXT_VA;
    const S: u64 = STACK_VA;

    /// One 6-byte entry: sp rule, bp rule, type, end.
    fn entry(
        sp_offset: i16,
        sp_reg: u8,
        bp_offset: i16,
        bp_reg: u8,
        kind: u8,
        end: bool,
    ) -> [u8; 6] {
        let mut b = [0u8; 6];
        b[..2].copy_from_slice(&sp_offset.to_le_bytes());
        b[2..4].copy_from_slice(&bp_offset.to_le_bytes());
        b[4] = sp_reg | (bp_reg << 4);
        b[5] = kind | (u8::from(end) << 2);
        b
    }

    /// A table for made-up text: `f` at +0 (pushes %rbp at +1), `g` at +0x40 (a plain call
    /// frame), an entry stub at +0x80 (pt_regs at %rsp), a kernel thread's start at +0xc0
    /// (end of stack), and code that finds its frame from %rbp at +0x140.
    fn table() -> OrcTable {
        let rules: [(u64, [u8; 6]); 7] = [
            (0x000, entry(8, 5, 0, 0, 0, false)),
            (0x001, entry(16, 5, -16, 1, 0, false)),
            (0x040, entry(8, 5, 0, 0, 0, false)),
            (0x080, entry(0, 5, 0, 0, 1, false)),
            (0x0c0, entry(0, 0, 0, 0, 0, true)),
            (0x140, entry(16, 4, 0, 0, 0, false)),
            (0x180, entry(0, 0, 0, 0, 0, false)),
        ];
        let base = T + 0x10_0000;
        let ips: Vec<u8> = rules
            .iter()
            .enumerate()
            .flat_map(|(i, (off, _))| {
                (((T + off) as i64 - (base + 4 * i as u64) as i64) as i32).to_le_bytes()
            })
            .collect();
        let orc: Vec<u8> = rules.iter().flat_map(|(_, e)| *e).collect();
        OrcTable::parse(&ips, base, &orc, OrcLayout::V4_14).unwrap()
    }

    fn walk_at(
        mem: &GuestMemoryMmap,
        regs: &crate::arch::x86_64::Registers,
        returns: ReturnRecovery<'_>,
    ) -> StackTrace {
        let tables = OrcUnwind {
            table: table(),
            text: vec![(T, T + 0x1000)],
            ftrace: None,
        };
        let unwinder = KernelUnwinder::<X86_64>::from_parts(tables, layout(false));
        let ctx = ProbeContext {
            vcpu: 0,
            location: "f",
            address: regs.rip,
            time: std::time::Duration::ZERO,
            regs,
            entry_regs: None,
            mem,
            returns,
            recorded: None,
            watch: None,
        };
        let mut reader = StackReader::new(&ctx);
        X86_64::walk(&ctx, &unwinder, &mut reader, &task_stack(S), 0)
    }

    fn put(mem: &GuestMemoryMmap, va: u64, v: u64) {
        mem.write_obj(v, GuestAddress(STACK_GPA + (va - S)))
            .unwrap();
    }

    /// A hit in `f` called from `g`, called from the entry stub with `pt_regs` from user mode
    /// at `S + 0x118`.
    fn user_stack(mem: &GuestMemoryMmap) {
        put(mem, S + 0x100, 0x5555); // f's saved %rbp
        put(mem, S + 0x108, T + 0x48); // into g
        put(mem, S + 0x110, T + 0x88); // into the stub
        put(mem, S + 0x118 + 128, 0x4000_1000); // pt_regs: user ip, cs, sp
        put(mem, S + 0x118 + 136, 0x33);
        put(mem, S + 0x118 + 152, 0x7ffc_0000);
    }

    #[test]
    fn orc_walks_call_and_register_frames_to_user_mode_and_to_a_kthreads_end() {
        let (engine, mut vcpu) = machine();
        let mem = engine.memory();
        user_stack(mem);
        vcpu.regs.rip = T + 0x10;
        vcpu.regs.set(Gpr::Rsp, S + 0x100);
        let t = walk_at(mem, &vcpu.regs, ReturnRecovery::default());
        assert_eq!(t.frames, vec![T + 0x10, T + 0x48, T + 0x88]);
        assert_eq!(t.end, TraceEnd::UserMode);

        // The same stub interrupting the kernel in `f` (after its push), whose caller is a
        // kernel thread's first frame: the walk goes on from the registers, then ends.
        put(mem, S + 0x118 + 128, T + 0x20);
        put(mem, S + 0x118 + 136, 0x10);
        put(mem, S + 0x118 + 152, S + 0x300);
        put(mem, S + 0x118 + 32, 0x7777); // %rbp in pt_regs
        put(mem, S + 0x308, T + 0xc8);
        let t = walk_at(mem, &vcpu.regs, ReturnRecovery::default());
        assert_eq!(
            t.frames,
            vec![T + 0x10, T + 0x48, T + 0x88, T + 0x20, T + 0xc8]
        );
        assert_eq!(t.end, TraceEnd::EndOfStack);
    }

    #[test]
    fn a_return_through_the_trampoline_is_seen_as_the_real_return() {
        let (engine, mut vcpu) = machine();
        let mem = engine.memory();
        user_stack(mem);
        let trampoline = 0xffff_ffff_7fff_0000;
        put(mem, S + 0x108, trampoline);
        vcpu.regs.rip = T + 0x10;
        vcpu.regs.set(Gpr::Rsp, S + 0x100);
        let lookup = |at: u64| (at == S + 0x108).then_some(T + 0x48);
        let returns = ReturnRecovery {
            trampoline: Some(trampoline),
            lookup: Some(&lookup),
            own: None,
        };
        let t = walk_at(mem, &vcpu.regs, returns);
        assert_eq!(t.frames, vec![T + 0x10, T + 0x48, T + 0x88]);
        // Without the instance, the trampoline shows, and the walk cannot go past it.
        let t = walk_at(mem, &vcpu.regs, ReturnRecovery::default());
        assert_eq!(t.frames[1], trampoline);
        assert!(matches!(t.end, TraceEnd::Unreliable(_)), "{t:?}");
    }

    #[test]
    fn bad_stacks_end_unreliable_where_they_go_wrong() {
        let (engine, mut vcpu) = machine();
        let mem = engine.memory();
        // A frame pointer below the stack pointer: the CFA would go down.
        vcpu.regs.rip = T + 0x150;
        vcpu.regs.set(Gpr::Rsp, S + 0x100);
        vcpu.regs.set(Gpr::Rbp, S + 0x50);
        put(mem, S + 0x58, T + 0x48);
        let t = walk_at(mem, &vcpu.regs, ReturnRecovery::default());
        assert_eq!(
            t.end,
            TraceEnd::Unreliable(UnwindStop::WrongDirection(S + 0x60))
        );
        assert_eq!(t.frames, vec![T + 0x150]);
        // A stack pointer on no known stack.
        vcpu.regs.set(Gpr::Rsp, 0xffff_8880_0000_0000);
        let t = walk_at(mem, &vcpu.regs, ReturnRecovery::default());
        assert_eq!(
            t.end,
            TraceEnd::Unreliable(UnwindStop::OffStack(0xffff_8880_0000_0000))
        );
        // A return into code the table does not cover.
        vcpu.regs.rip = T + 0x40;
        vcpu.regs.set(Gpr::Rsp, S + 0x100);
        put(mem, S + 0x100, T - 0x1000);
        let t = walk_at(mem, &vcpu.regs, ReturnRecovery::default());
        assert_eq!(t.frames, vec![T + 0x40, T - 0x1000]);
        assert_eq!(
            t.end,
            TraceEnd::Unreliable(UnwindStop::NoUnwindData(T - 0x1000))
        );
        // An undefined rule that is not an end.
        vcpu.regs.rip = T + 0x190;
        let t = walk_at(mem, &vcpu.regs, ReturnRecovery::default());
        assert!(
            matches!(t.end, TraceEnd::Unreliable(UnwindStop::BadRule { .. })),
            "{t:?}"
        );
    }

    #[test]
    fn a_vmlinux_that_is_not_the_running_kernel_gives_no_stack() {
        let (engine, mut vcpu) = machine();
        let mem = engine.memory();
        mem.write_slice(b"GNU\0running-build-id", GuestAddress(STACK_GPA + 0x800))
            .unwrap();
        vcpu.regs.rip = T + 0x10;
        vcpu.regs.set(Gpr::Rsp, S + 0x100);
        let tables = OrcUnwind {
            table: table(),
            text: vec![(T, T + 0x1000)],
            ftrace: None,
        };
        let mut unwinder = KernelUnwinder::<X86_64>::from_parts(tables, layout(false));
        unwinder.notes = (b"GNU\0another-build!!".to_vec(), S + 0x800);
        let ctx = crate::fake::context(mem, &vcpu.regs);
        let t = unwinder.unwind(&ctx, 0);
        assert_eq!(t.frames, vec![T + 0x10]);
        assert!(
            matches!(&t.end, TraceEnd::Unreliable(UnwindStop::WrongKernel(w)) if w.contains("build id")),
            "{t:?}"
        );
        // The verdict is kept: a later hit is refused the same way without reading again.
        mem.write_slice(b"GNU\0another-build!!", GuestAddress(STACK_GPA + 0x800))
            .unwrap();
        assert!(matches!(
            unwinder.unwind(&ctx, 0).end,
            TraceEnd::Unreliable(UnwindStop::WrongKernel(_))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::unwind::testing::fuzz_cases(2000)))]

        /// Any stack contents, any registers: the walk ends, within the frame limit, without
        /// a panic.
        #[test]
        fn any_stack_contents_end_the_walk(
            words in proptest::collection::vec(proptest::prelude::any::<u64>(), 512),
            pick in proptest::collection::vec(0u64..0x200, 512),
            sp in 0u64..4096,
            bp in proptest::prelude::any::<u64>(),
            rip in 0u64..0x200,
        ) {
            let (engine, mut vcpu) = machine();
            let mem = engine.memory();
            // Half the words are addresses in the made-up text or on the stack page, so the
            // walk goes somewhere before it ends.
            for (i, (w, p)) in words.iter().zip(&pick).enumerate() {
                let v = match w % 4 { 0 => T + p, 1 => S + p * 8, _ => *w };
                put(mem, S + 8 * i as u64, v);
            }
            vcpu.regs.rip = T + rip;
            vcpu.regs.set(Gpr::Rsp, S + (sp & !7));
            vcpu.regs.set(Gpr::Rbp, bp);
            let t = walk_at(mem, &vcpu.regs, ReturnRecovery::default());
            proptest::prop_assert!(t.frames.len() <= MAX_FRAMES);
        }
    }
}
