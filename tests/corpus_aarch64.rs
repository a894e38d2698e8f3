//! The arm64 differential instruction corpus, the twin of `corpus.rs`: each A64 encoding runs
//! natively (in this process, at EL0: under `qemu-aarch64` on an x86_64 host, which is how CI
//! runs the aarch64 build's tests) and as hvprobe's plan runs it (the host emulation applied
//! to the same registers and memory, or the out-of-line copy run from a slot page elsewhere
//! followed by the slot's BRK, then the PC put back after the original), and the registers,
//! the flags and the data and stack pages must come out the same. Refused encodings must be
//! refused with their reason.
//!
//! How a case runs natively: `raise(SIGUSR1)`, whose handler saves the interrupted context and
//! loads the case's registers (x0-x30, SP, PC, NZCV) into it, so that returning from the
//! handler starts the code; the code stops at a BRK, whose SIGTRAP handler records the
//! registers and puts the saved context back, so that returning from it returns from `raise`.
//! Both handlers run on an alternate stack. The code page is full of BRKs, so a branch stops
//! on its target; a literal area holds patterns for the PC-relative loads.
//!
//! aarch64 hosts only; instructions that only EL1 may run (`mrs daif`, the system-register
//! writes) are covered by the runner's tests.
#![cfg(target_arch = "aarch64")]

use std::cell::UnsafeCell;
use std::collections::HashMap;

use probe_core::arch::aarch64::{CpuFeatures, Decoder, Registers, brk};
use probe_core::arch::{EmulationError, GuestStack, InstructionDecoder, OutOfLineCopy, StepPlan};

const PAGE: u64 = 0x1000;
/// The probed instruction, at the start of a page of BRKs.
const ORIG: u64 = 0x4000_0000;
/// Branch targets land here (a BRK).
const TARGET: u64 = ORIG + 0x100;
/// PC-relative loads read patterns here.
const LITERALS: u64 = ORIG + 0x800;
/// The data page memory operands point into.
const DATA: u64 = ORIG + PAGE;
/// The slot page, 256 MiB away.
const SLOT: u64 = ORIG + 0x1000_0000;
/// The stack page; SP starts in its middle.
const STACK: u64 = 0x6000_0000;
const SP0: u64 = STACK + 0x800;
/// NZCV in PSTATE.
const NZCV: u64 = 0xf000_0000;
/// The BRK the code page is filled with, apart from the slot's.
const FILL_BRK: u32 = brk(0x77);

/// What a case's plan must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Emulate,
    OutOfLine,
    Refused(&'static str),
}

struct Case {
    name: &'static str,
    word: u32,
    /// Registers set apart from the default pattern: (n, value), 31 meaning SP.
    regs: Vec<(usize, u64)>,
    nzcv: u64,
    expect: Expect,
}

fn case(name: &'static str, word: u32, expect: Expect) -> Case {
    Case {
        name,
        word,
        regs: Vec::new(),
        nzcv: 0,
        expect,
    }
}

impl Case {
    fn with(mut self, n: usize, v: u64) -> Case {
        self.regs.push((n, v));
        self
    }
    fn flags(mut self, nzcv: u64) -> Case {
        self.nzcv = nzcv << 28;
        self
    }
}

/// Registers, SP, PC and NZCV of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct State {
    x: [u64; 31],
    sp: u64,
    pc: u64,
    nzcv: u64,
}

/// What the signal handlers share with the test: one case at a time.
struct Shared {
    load: State,
    saved: libc::mcontext_t,
    stopped: State,
    signal: i32,
}

struct SharedCell(UnsafeCell<Option<Shared>>);
// SAFETY: one test thread uses it, and the handlers run synchronously on that thread (raise,
// and the BRK's SIGTRAP).
unsafe impl Sync for SharedCell {}
static SHARED: SharedCell = SharedCell(UnsafeCell::new(None));

fn shared() -> &'static mut Shared {
    // SAFETY: see `SharedCell`: no two references are live at once (the handlers run between
    // the test's uses, never during them).
    unsafe { (*SHARED.0.get()).as_mut().expect("set up") }
}

extern "C" fn on_usr1(_: libc::c_int, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel (or qemu-user) passes the interrupted context; it is ours to change.
    let mc = unsafe { &mut (*(uc as *mut libc::ucontext_t)).uc_mcontext };
    let s = shared();
    // SAFETY: mcontext_t is plain data; the copy keeps the FP/SIMD record as it was.
    unsafe { std::ptr::copy_nonoverlapping(mc, &mut s.saved, 1) };
    mc.regs.copy_from_slice(&s.load.x);
    mc.sp = s.load.sp;
    mc.pc = s.load.pc;
    mc.pstate = (mc.pstate & !NZCV) | s.load.nzcv;
}

extern "C" fn on_stop(sig: libc::c_int, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: as in `on_usr1`.
    let mc = unsafe { &mut (*(uc as *mut libc::ucontext_t)).uc_mcontext };
    let s = shared();
    s.stopped = State {
        x: mc.regs,
        sp: mc.sp,
        pc: mc.pc,
        nzcv: mc.pstate & NZCV,
    };
    s.signal = sig;
    // SAFETY: back to the context `raise` was interrupted in, whole.
    unsafe { std::ptr::copy_nonoverlapping(&s.saved, mc, 1) };
}

fn map(at: u64, len: u64) {
    // SAFETY: fixed anonymous mappings at addresses nothing else in this test process uses.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(p as u64, at, "mmap at {at:#x}");
}

fn install() {
    // SAFETY: set once, before any handler can run.
    unsafe {
        *SHARED.0.get() = Some(Shared {
            load: State::default(),
            saved: std::mem::zeroed(),
            stopped: State::default(),
            signal: 0,
        })
    };
    let alt = vec![0u8; 1 << 16].leak();
    let stack = libc::stack_t {
        ss_sp: alt.as_mut_ptr().cast(),
        ss_flags: 0,
        ss_size: alt.len(),
    };
    // SAFETY: a leaked buffer as the alternate stack; handlers with SA_SIGINFO | SA_ONSTACK.
    unsafe {
        assert_eq!(libc::sigaltstack(&stack, std::ptr::null_mut()), 0);
        for (sig, h) in [
            (libc::SIGUSR1, on_usr1 as *const () as usize),
            (libc::SIGTRAP, on_stop as *const () as usize),
            (libc::SIGILL, on_stop as *const () as usize),
            (libc::SIGSEGV, on_stop as *const () as usize),
            (libc::SIGBUS, on_stop as *const () as usize),
        ] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = h;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
            assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
        }
    }
    for (at, len) in [(ORIG, 2 * PAGE), (SLOT, PAGE), (STACK, PAGE)] {
        map(at, len);
    }
}

fn write_u32s(at: u64, words: &[u32]) {
    for (i, w) in words.iter().enumerate() {
        // SAFETY: inside the pages mapped by `install`.
        unsafe { ((at + 4 * i as u64) as *mut u32).write_volatile(*w) };
    }
}

fn read_page(at: u64) -> Vec<u8> {
    // SAFETY: a page mapped by `install`.
    unsafe { std::slice::from_raw_parts(at as *const u8, PAGE as usize).to_vec() }
}

/// The code page (BRKs, the literal patterns), the data and stack patterns.
fn reset_memory() {
    write_u32s(ORIG, &vec![FILL_BRK; (PAGE / 4) as usize]);
    let literals: Vec<u32> = (0..32u32)
        .map(|i| 0x8765_4321u32.wrapping_mul(i + 1) ^ 0x8000_0001)
        .collect();
    write_u32s(LITERALS, &literals);
    let pattern = |seed: u32| -> Vec<u32> {
        (0..PAGE as u32 / 4)
            .map(|i| (i.wrapping_mul(0x9e37_79b9) ^ seed).rotate_left(i % 31))
            .collect()
    };
    write_u32s(DATA, &pattern(0xd0d0_0001));
    write_u32s(STACK, &pattern(0x5ac0_0002));
    write_u32s(SLOT, &vec![FILL_BRK; (PAGE / 4) as usize]);
}

/// Runs the code at `pc` with `load` until it stops.
fn run_native(load: State) -> (State, i32) {
    let s = shared();
    s.load = load;
    s.signal = 0;
    // Instruction fetch sees the words just written.
    for at in [ORIG, SLOT] {
        unsafe extern "C" {
            fn __clear_cache(start: *mut libc::c_char, end: *mut libc::c_char);
        }
        // SAFETY: `__clear_cache` only maintains caches over the mapped range.
        unsafe { __clear_cache(at as *mut libc::c_char, (at + PAGE) as *mut libc::c_char) };
    }
    // SAFETY: the handlers run the case and come back here.
    unsafe { libc::raise(libc::SIGUSR1) };
    let s = shared();
    (s.stopped, s.signal)
}

fn initial(c: &Case, pc: u64) -> State {
    let mut x = [0u64; 31];
    for (i, r) in x.iter_mut().enumerate() {
        *r = 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1) ^ 0x8000_0000_0000_00f0;
    }
    // Pointers for memory operands, a branch target, a small count.
    x[1] = DATA + 0x100;
    x[2] = DATA + 0x200;
    x[3] = TARGET;
    x[4] = 5;
    let mut st = State {
        x,
        sp: SP0,
        pc,
        nzcv: c.nzcv,
    };
    for &(n, v) in &c.regs {
        if n == 31 {
            st.sp = v;
        } else {
            st.x[n] = v;
        }
    }
    st
}

/// Guest memory for the host emulation: this process's own pages.
struct OwnMemory;

impl GuestStack for OwnMemory {
    fn read_u64(&mut self, va: u64) -> Result<u64, EmulationError> {
        mapped(va)?;
        // SAFETY: inside a page `install` mapped (checked above).
        Ok(unsafe { (va as *const u64).read_unaligned() })
    }
    fn write_u64(&mut self, va: u64, value: u64) -> Result<(), EmulationError> {
        mapped(va)?;
        // SAFETY: as above.
        unsafe { (va as *mut u64).write_unaligned(value) };
        Ok(())
    }
}

fn mapped(va: u64) -> Result<(), EmulationError> {
    let inside = |at: u64, len: u64| va >= at && va + 8 <= at + len;
    if inside(ORIG, 2 * PAGE) || inside(STACK, PAGE) {
        Ok(())
    } else {
        Err(EmulationError::Stack {
            va,
            why: "not mapped in the corpus".into(),
        })
    }
}

fn to_registers(s: &State) -> Registers {
    Registers {
        x: s.x,
        sp: s.sp,
        pc: s.pc,
        pstate: s.nzcv,
        ..Default::default()
    }
}

fn from_registers(r: &Registers) -> State {
    State {
        x: r.x,
        sp: r.sp,
        pc: r.pc,
        nzcv: r.pstate & NZCV,
    }
}

/// Runs one case natively and through its plan; an error says what differed.
fn check(d: &Decoder, c: &Case) -> Result<&'static str, String> {
    let insn = d
        .decode(&c.word.to_le_bytes(), ORIG)
        .map_err(|e| format!("decode: {e}"))?;
    let plan = d.check_context(&[], &insn).and_then(|()| d.plan(&insn));
    let got = match (&plan, c.expect) {
        (Err(r), Expect::Refused(why)) => {
            return if r.to_string().contains(why) {
                Ok("refused")
            } else {
                Err(format!("refused as {r}, want {why:?}"))
            };
        }
        (Ok(StepPlan::Emulate(_)), Expect::Emulate) => "emulate",
        (Ok(StepPlan::StepOutOfLine(_)), Expect::OutOfLine) => "xol",
        (p, e) => return Err(format!("plan {p:?}, want {e:?} ({})", insn.text)),
    };

    // Natively, at the original address.
    reset_memory();
    write_u32s(ORIG, &[c.word]);
    let (native, sig) = run_native(initial(c, ORIG));
    if sig != libc::SIGTRAP {
        return Err(format!(
            "native run stopped by signal {sig} at {:#x}",
            native.pc
        ));
    }
    let (native_data, native_stack) = (read_page(DATA), read_page(STACK));

    // Through the plan.
    reset_memory();
    write_u32s(ORIG, &[c.word]);
    let planned = match plan.expect("planned") {
        StepPlan::Emulate(e) => {
            let mut r = to_registers(&initial(c, ORIG));
            e.apply(&mut r, &mut OwnMemory)
                .map_err(|e| format!("emulation: {e}"))?;
            from_registers(&r)
        }
        StepPlan::StepOutOfLine(ool) => {
            let slot = ool.trapped_slot(ORIG, SLOT).ok_or("no trapped slot")?;
            let words: Vec<u32> = slot
                .chunks(4)
                .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
                .collect();
            write_u32s(SLOT, &words);
            let (mut after, sig) = run_native(initial(c, SLOT));
            let trap = SLOT + ool.copy_len(ORIG);
            if sig != libc::SIGTRAP || after.pc != trap {
                return Err(format!(
                    "the slot stopped by signal {sig} at {:#x}, not at its BRK {trap:#x}",
                    after.pc
                ));
            }
            // The engine's finish: back after the original instruction.
            after.pc = ORIG + ool.original_len();
            after
        }
    };
    if planned != native {
        let diff: Vec<String> = (0..31)
            .filter(|&i| planned.x[i] != native.x[i])
            .map(|i| format!("x{i} {:#x} != {:#x}", planned.x[i], native.x[i]))
            .chain(
                [
                    ("sp", planned.sp, native.sp),
                    ("pc", planned.pc, native.pc),
                    ("nzcv", planned.nzcv, native.nzcv),
                ]
                .into_iter()
                .filter(|(_, a, b)| a != b)
                .map(|(n, a, b)| format!("{n} {a:#x} != {b:#x}")),
            )
            .collect();
        return Err(format!(
            "{} (plan != native): {}",
            insn.text,
            diff.join(", ")
        ));
    }
    if read_page(DATA) != native_data {
        return Err(format!("{}: the data page differs", insn.text));
    }
    if read_page(STACK) != native_stack {
        return Err(format!("{}: the stack page differs", insn.text));
    }
    Ok(got)
}

/// `b.cond +0x100` for each condition.
fn b_cond(cond: u32) -> u32 {
    0x5400_0000 | ((0x100 / 4) << 5) | cond
}

fn corpus() -> Vec<Case> {
    use Expect::*;
    let mut cases = vec![
        // Hints: NOPs on the host; the PAC hints with pointer authentication (qemu's `max`
        // CPU signs) run out of line and must sign and check the same.
        case("nop", 0xd503_201f, Emulate),
        case("bti c", 0xd503_245f, Emulate),
        case("csdb", 0xd503_229f, Emulate),
        case("yield", 0xd503_203f, Emulate),
        case("paciasp", 0xd503_233f, OutOfLine),
        case("pacibsp", 0xd503_237f, OutOfLine),
        case("xpaclri", 0xd503_20ff, OutOfLine),
        case("pacia1716", 0xd503_211f, OutOfLine),
        // Moves and immediate arithmetic, SP and the 32-bit forms.
        case("mov x9, x30", 0xaa1e_03e9, Emulate),
        case("mov w0, w1", 0x2a01_03e0, Emulate),
        case("mov xzr, x1", 0xaa01_03ff, Emulate),
        case("mov x29, sp", 0x9100_03fd, Emulate),
        case("sub sp, sp, #0x20", 0xd100_83ff, Emulate),
        case("add sp, sp, #1, lsl #12", 0x9140_07ff, Emulate).with(31, STACK),
        case("add w5, w6, #0xfff", 0x113f_fcc5, Emulate),
        case("sub x5, x6, #1, lsl #12", 0xd140_04c5, Emulate),
        case("stp x29, x30, [sp, #-16]!", 0xa9bf_7bfd, Emulate),
        case("stp x1, x2, [sp, #-0x200]!", 0xa9a0_0be1, Emulate),
        case("stp xzr, x0, [sp, #-16]!", 0xa9bf_03ff, Emulate),
        // Branches.
        case("b +0x100", 0x1400_0040, Emulate),
        case("bl +0x100", 0x9400_0040, Emulate),
        case("cbz x4 (taken)", 0xb400_0804, Emulate).with(4, 0),
        case("cbz x4 (not)", 0xb400_0804, Emulate),
        case("cbnz w4, high bits only", 0x3500_0804, Emulate).with(4, 1 << 32),
        case("cbnz x4", 0xb500_0804, Emulate).with(4, 1 << 32),
        case("tbz x4, #0", 0x3600_0804, Emulate),
        case("tbnz x4, #63", 0xb7f8_0804, Emulate).with(4, 1 << 63),
        case("tbz x4, #32", 0xb600_0804, Emulate).with(4, 1 << 32),
        case("br x3", 0xd61f_0060, Emulate),
        case("blr x3", 0xd63f_0060, Emulate),
        case("ret", 0xd65f_03c0, Emulate).with(30, TARGET),
        case("ret x3", 0xd65f_0060, Emulate),
        // PC-relative loads and addresses.
        case("ldr w5, literal", 0x1800_0005 | ((0x800 / 4) << 5), Emulate),
        case("ldr x5, literal", 0x5800_0005 | ((0x808 / 4) << 5), Emulate),
        case(
            "ldrsw x5, literal",
            0x9800_0005 | ((0x80c / 4) << 5),
            Emulate,
        ),
        case(
            "prfm pldl1keep, literal",
            0xd800_0000 | ((0x810 / 4) << 5),
            Emulate,
        ),
        case("adr x5, +0x800", 0x1000_4005, Emulate),
        case("adr x5, -4", 0x10ff_ffe5, Emulate),
        case("adrp x5, +1 page", 0xb000_0005, Emulate),
        case("adrp x5, -1 page", 0xf0ff_ffe5, Emulate),
        // What runs out of line: loads and stores of every addressing form, atomics, data
        // processing with flags, system-register reads EL0 may make, barriers, SIMD.
        case("ldr x0, [x1]", 0xf940_0020, OutOfLine),
        case("ldr x0, [x1, #8]!", 0xf840_8c20, OutOfLine),
        case("str x0, [x1], #-16", 0xf81f_0420, OutOfLine),
        case("ldp x5, x6, [x1, #16]", 0xa941_1825, OutOfLine),
        case("stp x5, x6, [sp], #32", 0xa882_1be5, OutOfLine),
        case("ldrb w5, [x1, x4]", 0x3864_6825, OutOfLine),
        case("ldrsh x5, [x2, #6]", 0x7980_0c45, OutOfLine),
        case("str w5, [sp, #12]", 0xb900_0fe5, OutOfLine),
        case("ldar x5, [x1]", 0xc8df_fc25, OutOfLine),
        case("stlr x5, [x1]", 0xc89f_fc25, OutOfLine),
        case("ldadd x4, x5, [x1]", 0xf824_0025, OutOfLine),
        case("swp x4, x5, [x2]", 0xf824_8045, OutOfLine),
        case("cas x4, x5, [x1]", 0xc8a4_7c25, OutOfLine),
        case("casp x6, x7, x8, x9, [x1]", 0x4826_7c28, OutOfLine),
        case("caspal x6, x7, x8, x9, [x2]", 0x4866_fc48, OutOfLine),
        case("adds x5, x6, #1", 0xb100_04c5, OutOfLine).with(6, u64::MAX),
        case("subs w5, w6, w7", 0x6b07_00c5, OutOfLine),
        case("add x5, x6, x7, lsl #3", 0x8b07_0cc5, OutOfLine),
        case("csel x5, x6, x7, ne", 0x9a87_10c5, OutOfLine).flags(0b0100),
        case("ccmp x5, #3, #4, eq", 0xfa43_08a4, OutOfLine).flags(0b0100),
        case("madd x5, x6, x7, x8", 0x9b07_20c5, OutOfLine),
        case("udiv x5, x6, x4", 0x9ac4_08c5, OutOfLine),
        case("rev x5, x6", 0xdac0_0cc5, OutOfLine),
        case("clz x5, x6", 0xdac0_10c5, OutOfLine),
        case("ubfx x5, x6, #4, #12", 0xd344_3cc5, OutOfLine),
        case("movk x5, #0xbeef, lsl #16", 0xf2b7_dde5, OutOfLine),
        case("mrs x5, nzcv", 0xd53b_4205, OutOfLine).flags(0b1010),
        case("mrs x5, tpidr_el0", 0xd53b_d045, OutOfLine),
        case("msr nzcv, x5", 0xd51b_4205, Refused("msr")),
        case("dmb ish", 0xd503_3bbf, OutOfLine),
        case("dc civac, x1", 0xd50b_7e21, OutOfLine),
        case("ic ivau, x1", 0xd50b_7521, OutOfLine),
        case("fmov d0, x5", 0x9e67_00a0, OutOfLine),
        case("add v0.2d, v1.2d, v2.2d", 0x4ee2_8420, OutOfLine),
        // Refused, with their reason.
        case("ldxr x0, [x1]", 0xc85f_7c20, Refused("exclusive")),
        case("stxr w2, x0, [x1]", 0xc802_7c20, Refused("exclusive")),
        case("svc #0", 0xd400_0001, Refused("exception")),
        case("brk #0", 0xd420_0000, Refused("exception")),
        case("wfi", 0xd503_207f, Refused("waits")),
        case("clrex", 0xd503_3f5f, Refused("clrex")),
        case("udf #0", 0x0000_0000, Refused("padding")),
        case("ldr q0, literal", 0x9c00_0040, Refused("FP/SIMD")),
        case("ldr d0, literal", 0x5c00_0040, Refused("FP/SIMD")),
        case("retaa", 0xd65f_0bff, Refused("authentication")),
    ];
    // Every condition of b.cond against flags that make it hold and fail.
    for cond in 0..16u32 {
        for nzcv in [0b0000, 0b0100, 0b1000, 0b0010, 0b0001, 0b1001, 0b0110] {
            cases.push(case("b.cond", b_cond(cond), Expect::Emulate).flags(nzcv));
        }
    }
    cases
}

#[test]
fn every_encoding_of_the_arm64_corpus_runs_the_same_natively_and_through_its_plan() {
    install();
    // A CPU that may authenticate: the PAC hints go out of line and are compared as run.
    let d = Decoder::new(CpuFeatures::default()).unwrap();
    let mut failures = Vec::new();
    let mut by_kind: HashMap<&str, usize> = HashMap::new();
    let cases = corpus();
    for c in &cases {
        match check(&d, c) {
            Ok(kind) => *by_kind.entry(kind).or_default() += 1,
            Err(e) => failures.push(format!("{} ({:#010x}): {e}", c.name, c.word)),
        }
    }
    eprintln!("arm64 corpus: {} cases, {by_kind:?}", cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The corpus covers each kind of plan.
    for kind in ["emulate", "xol", "refused"] {
        assert!(
            by_kind.get(kind).copied().unwrap_or(0) > 5,
            "{kind}: {by_kind:?}"
        );
    }
}
