//! Differential instruction corpus, run where no /dev/kvm is needed: each x86_64 encoding is
//! executed natively in a ptrace'd child process and then as hvprobe's plan executes it (the
//! host emulation applied to the same state, or the boosted XOL copy run from a slot page with
//! its fix-ups), and the registers, flags, stack and data pages must come out the same.
//! Refused encodings must be refused with their reason. Instructions that only ring 0 may
//! execute (cli, sti, popf of IF, the refused system instructions) are covered by the runner's
//! tests, not here.
//!
//! Layout in the child: the original at `ORIG` in a code page full of int3, so that falling
//! through or branching to `TARGET` stops at an int3; the slot in a page of its own; a data
//! page for memory operands; a stack page. RIP-relative cases run twice: near address 0 (their
//! copy is made absolute) and above 4 GiB (their displacement is re-targeted for the slot).
//!
//! x86_64 hosts only: the encodings run natively.
#![cfg(target_arch = "x86_64")]

use probe_core::arch::x86_64::{
    Decoder, EmulationError, Gpr, GuestStack, Instruction, InstructionKind, Registers, StepPlan,
};

const PAGE: u64 = 0x1000;
/// The probed instruction's address (low placement).
const ORIG: u64 = 0x1000_0000;
/// Branch targets land here (an int3).
const TARGET_OFF: u64 = 0x800;
/// Data page for memory operands, right after the code page.
const DATA_OFF: u64 = 0x1000;
/// The slot, 256 MiB above the original.
const SLOT_OFF: u64 = 0x1000_0000;
/// The high placement: above 4 GiB, so RIP-relative targets do not fit a sign-extended disp32.
const HIGH: u64 = 0x1_0000_0000;
/// Stack page; `rsp` starts in its middle.
const STACK: u64 = 0x3000_0000;
const RSP0: u64 = STACK + 0x800;

/// Flags compared: CF PF AF ZF SF OF DF.
const FLAGS: u64 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x800 | 0x400;

/// The child process that runs the code.
struct Child {
    pid: libc::pid_t,
    mem: std::fs::File,
}

/// What a run ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    regs: Registers,
    /// Address of the int3 the run stopped on (or of the faulting instruction).
    stopped_at: u64,
    signal: i32,
    data: Vec<u8>,
    stack: Vec<u8>,
}

fn gpr_order() -> [Gpr; 16] {
    Gpr::ALL
}

impl Child {
    fn spawn() -> Child {
        // SAFETY: fork in a test process; the child only calls async-signal-safe functions
        // (mmap, ptrace, raise, _exit) before it stops under ptrace.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            for base in [ORIG, HIGH] {
                for (off, len) in [(0, 2 * PAGE), (SLOT_OFF, PAGE)] {
                    // SAFETY: fixed anonymous mappings at addresses nothing else uses in this
                    // fresh child; it never returns into Rust code after this.
                    unsafe {
                        libc::mmap(
                            (base + off) as *mut libc::c_void,
                            len as usize,
                            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                            -1,
                            0,
                        )
                    };
                }
            }
            // SAFETY: as above; then stop until the parent drives the child.
            unsafe {
                libc::mmap(
                    STACK as *mut libc::c_void,
                    PAGE as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                libc::raise(libc::SIGSTOP);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFSTOPPED(status), "child did not stop");
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .expect("/proc/pid/mem");
        Child { pid, mem }
    }

    fn write(&self, va: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        self.mem
            .write_all_at(bytes, va)
            .expect("write child memory");
    }

    fn read(&self, va: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; len];
        self.mem
            .read_exact_at(&mut b, va)
            .expect("read child memory");
        b
    }

    fn get_regs(&self) -> libc::user_regs_struct {
        // SAFETY: zeroed is a valid user_regs_struct; PTRACE_GETREGS fills it for our stopped
        // tracee.
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let rc = unsafe { libc::ptrace(libc::PTRACE_GETREGS, self.pid, 0, &mut r) };
        assert_eq!(rc, 0, "PTRACE_GETREGS");
        r
    }

    /// Runs from `rip` with `regs` until a signal; the pages are read back.
    fn run(&self, regs: &Registers, data_page: u64) -> Outcome {
        let mut r = self.get_regs();
        let g = &regs.gpr;
        (r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi) =
            (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rip = regs.rip;
        r.eflags = regs.rflags;
        // SAFETY: PTRACE_SETREGS/CONT on our stopped tracee with a filled register struct.
        unsafe {
            assert_eq!(libc::ptrace(libc::PTRACE_SETREGS, self.pid, 0, &r), 0);
            assert_eq!(libc::ptrace(libc::PTRACE_CONT, self.pid, 0, 0), 0);
        }
        let mut status = 0;
        // SAFETY: waiting for our own tracee.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert!(libc::WIFSTOPPED(status), "child ended: {status:#x}");
        let signal = libc::WSTOPSIG(status);
        let r = self.get_regs();
        let out = Registers {
            gpr: [
                r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            rip: r.rip,
            rflags: r.eflags,
            ..Registers::default()
        };
        let stopped_at = if signal == libc::SIGTRAP {
            r.rip - 1
        } else {
            r.rip
        };
        Outcome {
            regs: out,
            stopped_at,
            signal,
            data: self.read(data_page, PAGE as usize),
            stack: self.read(STACK, PAGE as usize),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: killing and reaping our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The stack page as host emulation sees it.
struct StackModel(Vec<u8>);

impl GuestStack for StackModel {
    fn read_u64(&mut self, va: u64) -> Result<u64, EmulationError> {
        let at = va
            .checked_sub(STACK)
            .filter(|a| a + 8 <= PAGE)
            .ok_or(EmulationError::Stack {
                va,
                why: "outside the stack page".into(),
            })? as usize;
        Ok(u64::from_le_bytes(self.0[at..at + 8].try_into().unwrap()))
    }

    fn write_u64(&mut self, va: u64, value: u64) -> Result<(), EmulationError> {
        let at = va
            .checked_sub(STACK)
            .filter(|a| a + 8 <= PAGE)
            .ok_or(EmulationError::Stack {
                va,
                why: "outside the stack page".into(),
            })? as usize;
        self.0[at..at + 8].copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
}

/// One corpus entry: bytes, the register and flag state to start from, and what to expect.
struct Case {
    name: String,
    bytes: Vec<u8>,
    /// Register values by number; unset ones get a pattern.
    regs: Vec<(Gpr, u64)>,
    flags: u64,
    /// The stack's top 8-byte words (from RSP0 upwards).
    stack_top: Vec<u64>,
    expect: Expect,
}

#[derive(Clone, PartialEq, Eq, Debug)]
enum Expect {
    /// Emulated on the host.
    Emulate,
    /// Run from a boosted slot.
    Step,
    /// Run from a slot; the return address it pushes is the slot's (a `call` through memory:
    /// the callee returns into the slot, whose `jmp` goes back).
    StepPushesSlot,
    /// Refused, with this text in the reason.
    Refuse(&'static str),
}

fn case(name: impl Into<String>, bytes: &[u8], expect: Expect) -> Case {
    Case {
        name: name.into(),
        bytes: bytes.to_vec(),
        regs: Vec::new(),
        flags: 0x202,
        stack_top: Vec::new(),
        expect,
    }
}

impl Case {
    fn with(mut self, r: Gpr, v: u64) -> Case {
        self.regs.push((r, v));
        self
    }
    fn flags(mut self, f: u64) -> Case {
        self.flags = 0x202 | f;
        self
    }
    fn stack(mut self, words: &[u64]) -> Case {
        self.stack_top = words.to_vec();
        self
    }
}

/// Patterned register values; pointers that memory operands use are set by each case.
fn initial_regs(c: &Case, base: u64) -> Registers {
    let mut regs = Registers::default();
    for (i, g) in gpr_order().iter().enumerate() {
        regs.set(
            *g,
            0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1) ^ 0x8040_2010,
        );
    }
    regs.set(Gpr::Rsp, RSP0);
    regs.set(Gpr::Rsi, base + DATA_OFF + 0x100);
    regs.set(Gpr::Rdi, base + DATA_OFF + 0x400);
    for (g, v) in &c.regs {
        // Values given relative to the placement are marked with the ORIG base.
        let v = if *v >= ORIG && *v < ORIG + 2 * PAGE {
            v - ORIG + base
        } else {
            *v
        };
        regs.set(*g, v);
    }
    regs.rflags = c.flags;
    regs.rip = base;
    regs
}

/// The data page: a byte pattern, with the branch target of placement `base` at the offsets
/// the jumps and calls through memory read it from (0x78, 0x100, 0x108).
fn data_pattern(base: u64) -> Vec<u8> {
    let mut d: Vec<u8> = (0..PAGE as usize)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(11))
        .collect();
    for at in [0x78usize, 0x100, 0x108] {
        d[at..at + 8].copy_from_slice(&(base + TARGET_OFF).to_le_bytes());
    }
    d
}

fn stack_pattern(c: &Case, base: u64) -> Vec<u8> {
    let mut s: Vec<u8> = (0..PAGE as usize).map(|i| (i as u8) ^ 0x5a).collect();
    for (i, w) in c.stack_top.iter().enumerate() {
        let w = if *w >= ORIG && *w < ORIG + 2 * PAGE {
            w - ORIG + base
        } else {
            *w
        };
        let at = 0x800 + 8 * i;
        s[at..at + 8].copy_from_slice(&w.to_le_bytes());
    }
    s
}

/// Prepares the child's pages for a run of `c` at `base`.
fn prepare(child: &Child, c: &Case, base: u64) {
    let mut code = vec![0xccu8; PAGE as usize];
    code[..c.bytes.len()].copy_from_slice(&c.bytes);
    child.write(base, &code);
    child.write(base + DATA_OFF, &data_pattern(base));
    child.write(base + SLOT_OFF, &vec![0xccu8; PAGE as usize]);
    child.write(STACK, &stack_pattern(c, base));
}

/// Runs `c` at placement `base`; `Err` says what differed.
fn check(child: &Child, d: &Decoder, c: &Case, base: u64) -> Result<&'static str, String> {
    let insn: Instruction = d
        .decode(&c.bytes, base)
        .map_err(|e| format!("decode: {e}"))?;
    if insn.len() != c.bytes.len() {
        return Err(format!("decoded {} bytes of {}", insn.len(), c.bytes.len()));
    }
    let plan = d.plan(&insn);
    if let Expect::Refuse(why) = &c.expect {
        return match plan {
            Err(r) if r.to_string().contains(why) => Ok("refused"),
            Err(r) => Err(format!("refused for another reason: {r}")),
            Ok(p) => Err(format!("planned as {}, expected a refusal", p.name())),
        };
    }
    let plan = plan.map_err(|r| format!("refused: {r}"))?;
    let start = initial_regs(c, base);
    prepare(child, c, base);
    let native = child.run(&start, base + DATA_OFF);
    if native.signal != libc::SIGTRAP {
        return Err(format!(
            "native run stopped by signal {} at {:#x}",
            native.signal, native.stopped_at
        ));
    }
    let (ours, pushes_slot) = match (&plan, &c.expect) {
        (StepPlan::Emulate(e), Expect::Emulate) => {
            let mut regs = start.clone();
            let mut stack = StackModel(stack_pattern(c, base));
            e.apply(&mut regs, &mut stack)
                .map_err(|e| format!("emulation: {e}"))?;
            let stopped_at = regs.rip;
            (
                Outcome {
                    regs,
                    stopped_at,
                    signal: libc::SIGTRAP,
                    data: data_pattern(base),
                    stack: stack.0,
                },
                None,
            )
        }
        (StepPlan::StepOutOfLine(ool), Expect::Step | Expect::StepPushesSlot) => {
            prepare(child, c, base);
            let slot = base + SLOT_OFF;
            let bytes = ool
                .boosted_slot(base, slot)
                .ok_or("the copy cannot reach its target from the slot")?;
            child.write(slot, &bytes);
            let mut regs = start.clone();
            regs.rip = slot;
            let out = child.run(&regs, base + DATA_OFF);
            let pushed = (c.expect == Expect::StepPushesSlot).then(|| slot + ool.copy_len(base));
            (out, pushed)
        }
        (p, e) => return Err(format!("planned as {}, expected {e:?}", p.name())),
    };
    if ours.signal != native.signal || ours.stopped_at != native.stopped_at {
        return Err(format!(
            "stopped at {:#x} (signal {}), natively at {:#x} (signal {})",
            ours.stopped_at, ours.signal, native.stopped_at, native.signal
        ));
    }
    for g in gpr_order() {
        if ours.regs.get(g) != native.regs.get(g) {
            return Err(format!(
                "{g:?} = {:#x}, natively {:#x}",
                ours.regs.get(g),
                native.regs.get(g)
            ));
        }
    }
    if ours.regs.rflags & FLAGS != native.regs.rflags & FLAGS {
        return Err(format!(
            "flags {:#x}, natively {:#x}",
            ours.regs.rflags & FLAGS,
            native.regs.rflags & FLAGS
        ));
    }
    if ours.data != native.data {
        return Err("the data page differs".into());
    }
    let mut stack = ours.stack.clone();
    if let Some(slot_ret) = pushes_slot {
        // The pushed return address is the slot's; the rest of the stack must match.
        let sp = (ours.regs.get(Gpr::Rsp) - STACK) as usize;
        let pushed = u64::from_le_bytes(stack[sp..sp + 8].try_into().unwrap());
        if pushed != slot_ret {
            return Err(format!(
                "pushed {pushed:#x}, expected the slot's {slot_ret:#x}"
            ));
        }
        stack[sp..sp + 8].copy_from_slice(&native.stack[sp..sp + 8]);
    }
    if stack != native.stack {
        let at = stack
            .iter()
            .zip(&native.stack)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(format!(
            "the stack page differs at {:#x}",
            STACK + at as u64
        ));
    }
    Ok(plan.name())
}

/// The corpus.
fn corpus() -> Vec<Case> {
    use Expect::*;
    use Gpr::*;
    let mut v = Vec::new();
    let target = ORIG + TARGET_OFF;
    // Flag states for conditional instructions: all clear; each of CF ZF SF OF PF; mixes.
    let flag_states: [u64; 8] = [0, 0x1, 0x40, 0x80, 0x800, 0x4, 0x41, 0x880];

    // --- Emulated ---
    for (name, b) in [
        ("nop", &[0x90][..]),
        ("xchg ax,ax", &[0x66, 0x90]),
        ("nopl (%rax)", &[0x0f, 0x1f, 0x00]),
        ("nopl 0(%rax)", &[0x0f, 0x1f, 0x40, 0x00]),
        ("nopl 0(%rax,%rax)", &[0x0f, 0x1f, 0x44, 0x00, 0x00]),
        ("nopw 0(%rax,%rax)", &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00]),
        ("nopl 0L(%rax)", &[0x0f, 0x1f, 0x80, 0, 0, 0, 0]),
        ("nopl 0L(%rax,%rax)", &[0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0]),
        ("cs nopw", &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0]),
        ("endbr64", &[0xf3, 0x0f, 0x1e, 0xfa]),
    ] {
        v.push(case(name, b, Emulate));
    }
    for r in 0..8u8 {
        v.push(case(format!("push r{r}"), &[0x50 + r], Emulate));
        v.push(case(format!("push r{}", r + 8), &[0x41, 0x50 + r], Emulate));
    }
    // mov %src,%dst for every pair of 64-bit registers (89 /r with REX.W, R, B).
    for src in 0..16u8 {
        for dst in 0..16u8 {
            let rex = 0x48 | ((src >> 3) << 2) | (dst >> 3);
            let modrm = 0xc0 | ((src & 7) << 3) | (dst & 7);
            v.push(case(
                format!("mov r{src},r{dst}"),
                &[rex, 0x89, modrm],
                Emulate,
            ));
        }
    }
    for (imm, b) in [
        (8u64, vec![0x48, 0x83, 0xec, 0x08]),
        (0x80, vec![0x48, 0x81, 0xec, 0x80, 0, 0, 0]),
        (0x7fff_fff0, vec![0x48, 0x81, 0xec, 0xf0, 0xff, 0xff, 0x7f]),
    ] {
        for f in [0, 0x1, 0x40] {
            v.push(case(format!("sub ${imm:#x},%rsp flags {f:#x}"), &b, Emulate).flags(f));
        }
    }
    // sub on a value that borrows and overflows.
    v.push(
        case("sub $8,%rsp borrowing", &[0x48, 0x83, 0xec, 0x08], Emulate).with(Rsp, STACK + 0x4),
    );
    for f in flag_states {
        v.push(case(format!("pushf {f:#x}"), &[0x9c], Emulate).flags(f));
    }
    for image in [0x202u64, 0x2d7, 0xa93, 0x40202] {
        v.push(case(format!("popf {image:#x}"), &[0x9d], Emulate).stack(&[image]));
    }
    v.push(case(
        "jmp rel8",
        &[0xeb, (TARGET_OFF - 2) as u8 & 0x7f],
        Emulate,
    ));
    let rel32 = |len: u64| ((TARGET_OFF - len) as u32).to_le_bytes();
    v.push(case(
        "jmp rel32",
        &[&[0xe9][..], &rel32(5)].concat(),
        Emulate,
    ));
    v.push(case(
        "call rel32",
        &[&[0xe8][..], &rel32(5)].concat(),
        Emulate,
    ));
    for cc in 0..16u8 {
        for f in flag_states {
            v.push(
                case(
                    format!("j{cc:x} rel8 flags {f:#x}"),
                    &[0x70 + cc, 0x7e],
                    Emulate,
                )
                .flags(f),
            );
            v.push(
                case(
                    format!("j{cc:x} rel32 flags {f:#x}"),
                    &[&[0x0f, 0x80 + cc][..], &rel32(6)].concat(),
                    Emulate,
                )
                .flags(f),
            );
        }
    }
    for (name, op) in [("loopne", 0xe0u8), ("loope", 0xe1), ("loop", 0xe2)] {
        for rcx in [0u64, 1, 2, 1 << 32] {
            for f in [0, 0x40] {
                v.push(
                    case(
                        format!("{name} rcx={rcx:#x} flags {f:#x}"),
                        &[op, 0x40],
                        Emulate,
                    )
                    .with(Rcx, rcx)
                    .flags(f),
                );
            }
        }
    }
    for rcx in [0u64, 1, 1 << 32] {
        v.push(case(format!("jrcxz rcx={rcx:#x}"), &[0xe3, 0x40], Emulate).with(Rcx, rcx));
        v.push(case(format!("jecxz rcx={rcx:#x}"), &[0x67, 0xe3, 0x40], Emulate).with(Rcx, rcx));
    }
    v.push(case("ret", &[0xc3], Emulate).stack(&[target]));
    v.push(case("ret $16", &[0xc2, 0x10, 0x00], Emulate).stack(&[target, 1, 2]));
    for r in [0u8, 1, 2, 3, 5, 6, 7] {
        let g = Gpr::from_number(r).unwrap();
        v.push(case(format!("call *r{r}"), &[0xff, 0xd0 + r], Emulate).with(g, target));
        v.push(case(format!("jmp *r{r}"), &[0xff, 0xe0 + r], Emulate).with(g, target));
        let g8 = Gpr::from_number(r + 8).unwrap();
        v.push(
            case(
                format!("call *r{}", r + 8),
                &[0x41, 0xff, 0xd0 + r],
                Emulate,
            )
            .with(g8, target),
        );
        v.push(case(format!("jmp *r{}", r + 8), &[0x41, 0xff, 0xe0 + r], Emulate).with(g8, target));
    }

    // --- Stepped out of line ---
    for (name, op) in [
        ("add", 0x01u8),
        ("or", 0x09),
        ("adc", 0x11),
        ("sbb", 0x19),
        ("and", 0x21),
        ("sub", 0x29),
        ("xor", 0x31),
        ("cmp", 0x39),
        ("test", 0x85),
    ] {
        for f in [0u64, 0x1] {
            v.push(case(format!("{name} %rcx,%rax {f:#x}"), &[0x48, op, 0xc8], Step).flags(f));
            v.push(case(format!("{name} %ecx,%r9d {f:#x}"), &[0x41, op, 0xc9], Step).flags(f));
            v.push(case(format!("{name} %al,(%rsi) {f:#x}"), &[op - 1, 0x06], Step).flags(f));
        }
        let ext = (op >> 3) & 7;
        v.push(case(
            format!("{name} $imm8,%rdx"),
            &[0x48, 0x83, 0xc0 | (ext << 3) | 2, 0x85],
            Step,
        ));
        v.push(case(
            format!("{name} $imm32,%r10"),
            &[0x49, 0x81, 0xc0 | (ext << 3) | 2, 0x78, 0x56, 0x34, 0x92],
            Step,
        ));
    }
    for (name, b) in [
        ("shl %rax", &[0x48, 0xd1, 0xe0][..]),
        ("shl $5,%rax", &[0x48, 0xc1, 0xe0, 0x05]),
        ("sar %cl,%rdx", &[0x48, 0xd3, 0xfa]),
        ("rol $3,%ebx", &[0xc1, 0xc3, 0x03]),
        ("imul %rcx,%rax", &[0x48, 0x0f, 0xaf, 0xc1]),
        ("mul %rcx", &[0x48, 0xf7, 0xe1]),
        ("neg %r8", &[0x49, 0xf7, 0xd8]),
        ("not %edx", &[0xf7, 0xd2]),
        ("inc %r11", &[0x49, 0xff, 0xc3]),
        ("dec %esi", &[0xff, 0xce]),
        ("bswap %rax", &[0x48, 0x0f, 0xc8]),
        ("xchg %rbx,%rcx", &[0x48, 0x87, 0xd9]),
        ("movzbl %al,%ecx", &[0x0f, 0xb6, 0xc8]),
        ("movslq %eax,%rdx", &[0x48, 0x63, 0xd0]),
        ("lea 8(%rax,%rbx,4),%rcx", &[0x48, 0x8d, 0x4c, 0x98, 0x08]),
        ("mov $imm64,%r12", &[0x49, 0xbc, 1, 2, 3, 4, 5, 6, 7, 8]),
        ("mov $imm32,%eax", &[0xb8, 0x78, 0x56, 0x34, 0x12]),
        ("mov (%rsi),%rax", &[0x48, 0x8b, 0x06]),
        ("mov %rax,8(%rdi)", &[0x48, 0x89, 0x47, 0x08]),
        ("movb $7,(%rdi)", &[0xc6, 0x07, 0x07]),
        ("bt %rcx,%rax", &[0x48, 0x0f, 0xa3, 0xc8]),
        ("bts $3,%rax", &[0x48, 0x0f, 0xba, 0xe8, 0x03]),
        ("btr %rcx,(%rsi)", &[0x48, 0x0f, 0xb3, 0x0e]),
        ("cmpxchg %rcx,(%rdi)", &[0x48, 0x0f, 0xb1, 0x0f]),
        ("lock xadd %eax,(%rsi)", &[0xf0, 0x0f, 0xc1, 0x06]),
        ("pop %rax", &[0x58]),
        ("pop %r15", &[0x41, 0x5f]),
        ("push (%rsi)", &[0xff, 0x36]),
        ("pop (%rdi)", &[0x8f, 0x07]),
        ("leave", &[0xc9]),
        ("cqo", &[0x48, 0x99]),
        ("cld", &[0xfc]),
        ("std", &[0xfd]),
        ("stc", &[0xf9]),
        ("cmc", &[0xf5]),
        ("lahf", &[0x9f]),
        ("sahf", &[0x9e]),
        ("xor %eax,%eax", &[0x31, 0xc0]),
        ("movq %rax,%xmm0", &[0x66, 0x48, 0x0f, 0x6e, 0xc0]),
    ] {
        v.push(
            case(name, b, Step)
                .with(Rcx, 13)
                .with(Rbp, RSP0 + 0x10)
                .stack(&[0x1234, 0x5678]),
        );
    }
    for cc in 0..16u8 {
        for f in [0u64, 0x41, 0x880] {
            v.push(
                case(
                    format!("cmov{cc:x} {f:#x}"),
                    &[0x48, 0x0f, 0x40 + cc, 0xc1],
                    Step,
                )
                .flags(f),
            );
            v.push(case(format!("set{cc:x} {f:#x}"), &[0x0f, 0x90 + cc, 0xc0], Step).flags(f));
        }
    }
    // String instructions, both directions, with counts.
    for (name, b) in [
        ("rep movsb", &[0xf3, 0xa4][..]),
        ("rep movsq", &[0xf3, 0x48, 0xa5]),
        ("rep stosb", &[0xf3, 0xaa]),
        ("rep stosq", &[0xf3, 0x48, 0xab]),
        ("repe cmpsb", &[0xf3, 0xa6]),
        ("repne scasb", &[0xf2, 0xae]),
        ("movsb", &[0xa4]),
        ("lodsq", &[0x48, 0xad]),
    ] {
        for rcx in [0u64, 1, 7, 64] {
            for df in [0u64, 0x400] {
                v.push(
                    case(format!("{name} rcx={rcx} df={df:#x}"), b, Step)
                        .with(Rcx, rcx)
                        .with(Rax, 0x11)
                        .flags(df),
                );
            }
        }
    }
    // RIP-relative operands (a target in the data page): loads, stores, read-modify-writes,
    // an immediate after the displacement, lea, push, EIP-relative, and a jump through memory.
    let disp = |len: u64, off: u64| ((DATA_OFF + off - len) as u32).to_le_bytes();
    let riprel: Vec<(&str, Vec<u8>, Expect)> = vec![
        (
            "mov disp(%rip),%rax",
            [&[0x48, 0x8b, 0x05][..], &disp(7, 0x10)].concat(),
            Step,
        ),
        (
            "mov %rcx,disp(%rip)",
            [&[0x48, 0x89, 0x0d][..], &disp(7, 0x18)].concat(),
            Step,
        ),
        (
            "mov disp(%rip),%r9d",
            [&[0x44, 0x8b, 0x0d][..], &disp(7, 0x20)].concat(),
            Step,
        ),
        (
            "add %eax,disp(%rip)",
            [&[0x01, 0x05][..], &disp(6, 0x28)].concat(),
            Step,
        ),
        (
            "incl disp(%rip)",
            [&[0xff, 0x05][..], &disp(6, 0x30)].concat(),
            Step,
        ),
        (
            "lock incl disp(%rip)",
            [&[0xf0, 0xff, 0x05][..], &disp(7, 0x30)].concat(),
            Step,
        ),
        (
            "cmpb $0x42,disp(%rip)",
            [&[0x80, 0x3d][..], &disp(7, 0x38), &[0x42]].concat(),
            Step,
        ),
        (
            "movl $imm32,disp(%rip)",
            [&[0xc7, 0x05][..], &disp(10, 0x40), &[1, 2, 3, 4]].concat(),
            Step,
        ),
        (
            "lea disp(%rip),%rdx",
            [&[0x48, 0x8d, 0x15][..], &disp(7, 0x48)].concat(),
            Step,
        ),
        (
            "push disp(%rip)",
            [&[0xff, 0x35][..], &disp(6, 0x50)].concat(),
            Step,
        ),
        (
            "movzwl disp(%rip),%ecx",
            [&[0x0f, 0xb7, 0x0d][..], &disp(7, 0x58)].concat(),
            Step,
        ),
        (
            "mov disp(%rip),%r10 (REX.X set)",
            [&[0x4e, 0x8b, 0x15][..], &disp(7, 0x60)].concat(),
            Step,
        ),
        (
            "mov disp(%eip),%eax",
            [&[0x67, 0x8b, 0x05][..], &disp(7, 0x68)].concat(),
            Step,
        ),
        (
            "cmpxchg %rcx,disp(%rip)",
            [&[0x48, 0x0f, 0xb1, 0x0d][..], &disp(8, 0x70)].concat(),
            Step,
        ),
        (
            "jmp *disp(%rip)",
            [&[0xff, 0x25][..], &disp(6, 0x78)].concat(),
            Step,
        ),
        (
            "call *disp(%rip)",
            [&[0xff, 0x15][..], &disp(6, 0x78)].concat(),
            StepPushesSlot,
        ),
    ];
    for (name, b, e) in riprel {
        let mut c = case(name, &b, e).with(Rcx, 0x77);
        // The jump and call through memory find the target address in the data page.
        c.stack_top = vec![];
        v.push(c);
    }
    // Calls and jumps through registers or memory pointing at the target.
    v.push(case("call *8(%rsi)", &[0xff, 0x56, 0x08], StepPushesSlot));
    v.push(case("jmp *(%rsi)", &[0xff, 0x26], Step));

    // --- Refused ---
    for (name, b, why) in [
        ("syscall", &[0x0f, 0x05][..], "syscall"),
        ("sysretq", &[0x48, 0x0f, 0x07], ""),
        ("int3", &[0xcc], "int3"),
        ("int $0x80", &[0xcd, 0x80], ""),
        ("ud2", &[0x0f, 0x0b], "BUG()"),
        ("iretq", &[0x48, 0xcf], ""),
        ("mov %eax,%ss", &[0x8e, 0xd0], "loads SS"),
        ("vmcall", &[0x0f, 0x01, 0xc1], ""),
        ("lretq", &[0x48, 0xcb], ""),
        ("retw", &[0x66, 0xc3], "operand-size prefix"),
        (
            "jmp rel8 with 66",
            &[0x66, 0xeb, 0x10],
            "operand-size prefix",
        ),
        ("loop with 67", &[0x67, 0xe2, 0x10], "ECX"),
        ("pushfw", &[0x66, 0x9c], ""),
        ("popfw", &[0x66, 0x9d], ""),
    ] {
        v.push(case(name, b, Refuse(why)));
    }
    v
}

#[test]
fn every_encoding_of_the_corpus_runs_the_same_natively_and_through_its_plan() {
    if std::env::var_os("HVPROBE_NO_PTRACE").is_some() {
        eprintln!("corpus: skipped (HVPROBE_NO_PTRACE)");
        return;
    }
    let d = Decoder::new().unwrap();
    let child = Child::spawn();
    let cases = corpus();
    let mut failures = Vec::new();
    let mut by_plan: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut runs = 0;
    for c in &cases {
        let rip_relative = d
            .decode(&c.bytes, ORIG)
            .map(|i| i.rip_disp.is_some())
            .unwrap_or(false);
        let is_refusal = matches!(c.expect, Expect::Refuse(_));
        // EIP-relative addresses wrap at 4 GiB: only the low placement has their target.
        let eip = c.bytes.first() == Some(&0x67);
        let placements: &[u64] = if rip_relative && !is_refusal && !eip {
            &[ORIG, HIGH]
        } else {
            &[ORIG]
        };
        for &base in placements {
            runs += 1;
            let result = check(&child, &d, c, base);
            match result {
                Ok(plan) => *by_plan.entry(plan).or_default() += 1,
                Err(e) => failures.push(format!("{} at {base:#x} ({:02x?}): {e}", c.name, c.bytes)),
            }
        }
    }
    eprintln!(
        "corpus: {} encodings, {runs} runs; by plan: {by_plan:?}",
        cases.len()
    );
    assert!(cases.len() >= 500, "only {} encodings", cases.len());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn decoded_kinds_of_the_corpus_match_their_expectations() {
    // A cheap check that needs no child: the plan kind each case expects.
    let d = Decoder::new().unwrap();
    for c in corpus() {
        let i = d.decode(&c.bytes, ORIG).unwrap();
        let ok = matches!(
            (&c.expect, &i.kind),
            (Expect::Emulate, InstructionKind::Emulable(_))
                | (
                    Expect::Step | Expect::StepPushesSlot,
                    InstructionKind::OutOfLine { .. }
                )
                | (Expect::Refuse(_), InstructionKind::Refused(_))
        );
        assert!(ok, "{}: {:?} is {:?}", c.name, c.expect, i.kind);
    }
}
