//! Architecture back ends. Each architecture is a marker type implementing [`Arch`], whose
//! associated types carry what differs (as gdbstub's `Arch` does): the register file, the
//! decoder and its instructions, host emulation, out-of-line copies, the address space a vCPU's
//! registers select. The probe engine ([`crate::engine::ProbeEngine`]) is generic over it and
//! holds no architecture's details; x86_64 lives in [`x86_64`], aarch64 in [`aarch64`].
//!
//! What a new architecture implements, file by file, is listed in `docs/architecture.md`.

pub mod aarch64;
pub mod x86_64;

use std::fmt::Debug;

use vm_memory::GuestMemory;

use crate::guest_memory::GuestPhysMemory;
use crate::pagewalk::{Translation, WalkError};
pub use crate::xol::XolLayout;
use crate::xol::{XolArea, XolError};

/// The architecture of the machine this library is built for: the engine inside a VMM always
/// probes guests of its host's architecture (an x86_64 host reaches arm64 guests through an
/// emulated arm64 host running the aarch64 build).
#[cfg(target_arch = "x86_64")]
pub type Host = x86_64::X86_64;
/// The architecture of the machine this library is built for.
#[cfg(target_arch = "aarch64")]
pub type Host = aarch64::Aarch64;

/// The registers of one vCPU as the engine and the handlers see them.
pub trait RegisterFile: Clone + Debug + Default + Send + Sync + 'static {
    /// The program counter's name in output (`rip`, `pc`).
    const PC_NAME: &'static str;
    /// The argument registers' names, in order (`rdi`, `rsi`, ...; `x0`, `x1`, ...).
    const ARG_NAMES: &'static [&'static str];
    /// The program counter.
    fn pc(&self) -> u64;
    /// Sets the program counter.
    fn set_pc(&mut self, pc: u64);
    /// The stack pointer.
    fn sp(&self) -> u64;
    /// Argument register `n` (0-based) of the kernel's calling convention, if there is one.
    fn arg(&self, n: usize) -> Option<u64>;
    /// How many arguments the calling convention passes in registers.
    fn register_args(&self) -> usize;
    /// The register a function returns its value in (`rax`, `x0`).
    fn return_value(&self) -> u64;
    /// The general-purpose registers (`rax`..`r15`; `x0`..`x30`): what a vCPU may leave unread
    /// on an exit that needs only the control registers
    /// ([`crate::vm::VcpuAccess::exit_registers`]).
    fn general_purpose(&self) -> &[u64];
    /// The same, to fill in.
    fn general_purpose_mut(&mut self) -> &mut [u64];
    /// A register by the name the kernel's kprobe_events syntax uses for it (`di`, `rdi`, `ip`
    /// on x86_64; `x0`, `sp`, `pc` on arm64), for output and fetch args.
    fn by_name(&self, name: &str) -> Option<u64>;
}

/// Which kind of plan a probed instruction has, for statistics and messages. One list for all
/// architectures, so that figures compare across them (arm64 has no RIP-relative copies: its
/// PC-relative instructions are emulated).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum PlanKind {
    /// Emulated on the host.
    Emulate,
    /// Copied out of line.
    Xol,
    /// Copied out of line with its PC-relative operand rewritten.
    XolRiprel,
    /// A jump into a host-written trampoline that records the hit in the guest: no exit.
    Jump,
    /// A data watchpoint: the debug registers trap the access; no guest instruction is
    /// touched.
    Watch,
    /// A write-protected region: its pages are read-only to the guest, and each write to
    /// them exits to the VMM.
    Protect,
}

impl PlanKind {
    /// Every kind, in the order statistics list them.
    pub const ALL: [PlanKind; 6] = [
        PlanKind::Emulate,
        PlanKind::Xol,
        PlanKind::XolRiprel,
        PlanKind::Jump,
        PlanKind::Watch,
        PlanKind::Protect,
    ];

    /// VM exits one hit of the plan costs at least (a trapped step or a post handler adds
    /// one).
    pub fn exits_per_hit(self) -> u32 {
        match self {
            PlanKind::Jump => 0,
            _ => 1,
        }
    }

    /// Short name, for figures and messages.
    pub fn name(self) -> &'static str {
        match self {
            PlanKind::Emulate => "emulate",
            PlanKind::Xol => "xol",
            PlanKind::XolRiprel => "xol-riprel",
            PlanKind::Jump => "jump",
            PlanKind::Watch => "watch",
            PlanKind::Protect => "protect",
        }
    }
}

impl std::fmt::Display for PlanKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the instruction displaced by a breakpoint is executed once the handlers ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepPlan<E, C> {
    /// Emulated on the host: one exit per hit.
    Emulate(E),
    /// Copied into XOL slots and run there by the guest itself: a "boosted" slot (the copy, then
    /// a branch back to the next original instruction) costs no exit of its own; a "trapped"
    /// slot (the copy, then a breakpoint the host owns) brings control back for post handlers.
    StepOutOfLine(C),
}

/// The step plan of architecture `A`.
pub type PlanOf<A> = StepPlan<<A as Arch>::Emulation, <A as Arch>::Copy>;

impl<E, C: OutOfLineCopy> StepPlan<E, C> {
    /// The kind of the plan.
    pub fn kind(&self) -> PlanKind {
        match self {
            StepPlan::Emulate(_) => PlanKind::Emulate,
            StepPlan::StepOutOfLine(o) => o.kind(),
        }
    }

    /// Short name of the plan, for figures and messages.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }
}

/// Errors of emulation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmulationError {
    /// The stack slot could not be read or written.
    #[error("cannot write the guest stack at {va:#x}: {why}")]
    Stack {
        /// The stack address.
        va: u64,
        /// Why.
        why: String,
    },
}

/// The guest stack as emulation reaches it: 64-bit reads and writes at guest virtual addresses.
pub trait GuestStack {
    /// Reads the 64-bit value at `va`.
    fn read_u64(&mut self, va: u64) -> Result<u64, EmulationError>;
    /// Writes a 64-bit value at `va`.
    fn write_u64(&mut self, va: u64, value: u64) -> Result<(), EmulationError>;
}

/// An instruction the host emulates instead of the guest running it.
pub trait HostEmulation<R>: Clone + Debug + Send + Sync + 'static {
    /// Applies the instruction to `regs`, reading and writing the guest stack through `stack`.
    /// Nothing is changed in `regs` if a stack access fails.
    fn apply(&self, regs: &mut R, stack: &mut dyn GuestStack) -> Result<(), EmulationError>;
    /// Whether it reads or writes the guest stack (and so may fail where the stack is not
    /// accessible, which the engine then leaves to the real instruction in a slot).
    fn touches_stack(&self) -> bool;
    /// Whether the real instruction blocks interrupts for one more instruction (x86 `sti`).
    fn opens_interrupt_shadow(&self) -> bool {
        false
    }
    /// The registers applying it reads or writes, as a register-use mask: bit n for the
    /// general-purpose register of index n, and the architecture's bits above them for the
    /// control registers its [`crate::vm::VcpuAccess::exit_registers`] leaves unread (arm64's
    /// [`crate::arch::aarch64::uses`]). A hit without handlers reads only those (none for
    /// arm64's hints and `b`; x30 and x9 for `mov x9, x30`). All, unless the architecture says
    /// otherwise.
    fn registers_used(&self) -> u64 {
        u64::MAX
    }
    /// Of [`HostEmulation::registers_used`], the general-purpose registers it writes whole
    /// without reading them (`mov x9, x30`'s x9): their old values are never needed, so a
    /// vCPU need not read them ([`crate::vm::VcpuAccess::overwrote`]). None by default.
    fn registers_overwritten(&self) -> u64 {
        0
    }
}

/// An instruction prepared for execution out of line, and the bytes of its slots.
pub trait OutOfLineCopy: Clone + Debug + Send + Sync + 'static {
    /// The kind of plan the copy is.
    fn kind(&self) -> PlanKind;
    /// Length of the original instruction.
    fn original_len(&self) -> u64;
    /// Length of the copy of the original at `orig_va` in a slot: the slot's trap follows it.
    fn copy_len(&self, orig_va: u64) -> u64;
    /// A boosted slot at `slot_va`: the copy, then a branch back to the next original
    /// instruction; `None` if either is out of reach.
    fn boosted_slot(&self, orig_va: u64, slot_va: u64) -> Option<Vec<u8>>;
    /// A trapped slot at `slot_va`: the copy, then the host's breakpoint at
    /// `slot_va + copy_len`; `None` if the copy is out of reach.
    fn trapped_slot(&self, orig_va: u64, slot_va: u64) -> Option<Vec<u8>>;
    /// Why the copy cannot run in a trapped slot (it may leave the slot without reaching the
    /// trap, or wait for an interrupt): such an instruction takes no post handler.
    fn untrappable(&self) -> Option<&'static str>;
}

/// Errors of decoding, shared by the back ends.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The disassembler could not be set up.
    #[error("cannot initialise the {arch} disassembler: {why}")]
    Disassembler {
        /// The architecture.
        arch: &'static str,
        /// What the disassembler said.
        why: String,
    },
    /// The bytes at an address are not an instruction the decoder knows.
    #[error("no {arch} instruction the decoder knows at {va:#x}")]
    Invalid {
        /// The architecture.
        arch: &'static str,
        /// The address.
        va: u64,
    },
    /// An offset does not start an instruction.
    #[error(
        "offset {offset:#x} is not on an instruction boundary (it falls inside the instruction at +{insn_start:#x}, {len} bytes: {text})"
    )]
    NotOnBoundary {
        /// The requested offset from the symbol.
        offset: u64,
        /// Offset of the instruction that contains it.
        insn_start: u64,
        /// That instruction's length.
        len: usize,
        /// That instruction's text.
        text: String,
    },
    /// The walk from the function start met bytes that are no instruction it knows.
    #[error(
        "offset {offset:#x} cannot be checked: the bytes at +{decoded:#x} ({bytes}) are no instruction the decoder knows, so the instruction boundaries past them are unknown"
    )]
    PastCode {
        /// The requested offset.
        offset: u64,
        /// How far decoding got.
        decoded: u64,
        /// The first bytes it could not decode, in hex.
        bytes: String,
    },
    /// The walk from the function start met a breakpoint that may cover an instruction, and the
    /// guest's kprobes could not be read to tell.
    #[error(
        "offset {offset:#x} cannot be checked: the breakpoint (int3, brk) at +{at:#x} follows an instruction that may fall through, so it may be the guest's own breakpoint over an instruction (a guest kprobe, kgdb), and the guest's kprobe table could not be read to tell; the instruction boundaries past it are unknown"
    )]
    GuestBreakpoint {
        /// The requested offset.
        offset: u64,
        /// Where the guest's breakpoint is.
        at: u64,
    },
}

/// Why an instruction cannot be probed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refusing to probe `{text}` at {va:#x}: {reason}")]
pub struct Refusal {
    /// Address of the instruction.
    pub va: u64,
    /// The instruction as text.
    pub text: String,
    /// Why.
    pub reason: &'static str,
}

/// How the boundary walk takes a breakpoint instruction it meets in the guest's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestBreakpoints {
    /// The guest's kprobes were read and the bytes under them put back: a breakpoint left is
    /// an instruction (padding after a `ret`, a `jmp` or a call that does not return), as
    /// Linux's `can_probe` takes it.
    Known,
    /// The guest's kprobes are unknown: a breakpoint is taken as padding only after an
    /// instruction that never falls through; elsewhere it may cover an instruction, and the
    /// walk stops.
    Unknown,
}

/// One decoded instruction, as the engine needs it.
pub trait DecodedInstruction {
    /// Its bytes.
    fn bytes(&self) -> &[u8];
    /// Mnemonic and operands.
    fn text(&self) -> &str;
}

/// The decoder and classifier of one architecture. One is made per planting (capstone handles
/// are not `Send`), never on the hit path.
pub trait InstructionDecoder<A: Arch>: Sized {
    /// A decoder that plans for a guest CPU with `features`.
    fn new(features: A::CpuFeatures) -> Result<Self, DecodeError>;
    /// Decodes the instruction at the start of `bytes`, which is at `va`.
    fn decode(&self, bytes: &[u8], va: u64) -> Result<A::Instruction, DecodeError>;
    /// Checks that `offset` into the function whose code (from its start `start`) is `code`
    /// starts an instruction.
    fn check_boundary(
        &self,
        code: &[u8],
        start: u64,
        offset: u64,
        guest: GuestBreakpoints,
    ) -> Result<(), DecodeError>;
    /// The plan for a decoded instruction, or why it is refused.
    fn plan(&self, insn: &A::Instruction) -> Result<PlanOf<A>, Refusal>;
    /// The instruction that ends exactly at `offset` into the function whose code (from its
    /// start `start`) is `code`: its address and text. For the writer of an access reported
    /// after it (an x86 data breakpoint traps past the store). `None` where that is not
    /// certain: a byte that does not decode, or a breakpoint on the way (hvprobe's or the
    /// guest's own `int3`, which stands for the first byte of a longer instruction), or no
    /// instruction ending there.
    fn instruction_ending_at(&self, code: &[u8], start: u64, offset: u64) -> Option<(u64, String)> {
        let mut at = 0u64;
        while at < offset {
            let rest = code.get(at as usize..)?;
            if A::is_breakpoint(rest.get(..A::BREAKPOINT.len())?) {
                return None;
            }
            let insn = self.decode(rest, start + at).ok()?;
            let len = insn.bytes().len() as u64;
            if len == 0 {
                return None;
            }
            if at + len == offset {
                return Some((start + at, insn.text().to_string()));
            }
            at += len;
        }
        None
    }
    /// For an emulated instruction that touches the stack: a copy of the real instruction to
    /// run out of line when the emulated stack access fails.
    fn fallback_copy(&self, insn: &A::Instruction) -> Option<A::Copy>;
    /// Refuses an instruction whose neighbourhood makes any trap on it unsafe (arm64: inside
    /// the exclusive-monitor window after a load-exclusive, where every trap clears the monitor
    /// and the store-exclusive would fail forever), given the code from the function start up
    /// to it. Nothing to check by default.
    fn check_context(&self, _preceding: &[u8], _insn: &A::Instruction) -> Result<(), Refusal> {
        Ok(())
    }
}

/// An instruction set the probe engine supports: the behaviour the engine needs, carried by
/// associated types and functions.
pub trait Arch: Sized + Copy + Debug + Default + Send + Sync + 'static {
    /// The register file.
    type Registers: RegisterFile;
    /// What the decoder makes of one instruction.
    type Instruction: DecodedInstruction + Debug;
    /// The decoder and classifier.
    type Decoder: InstructionDecoder<Self>;
    /// An instruction emulated on the host.
    type Emulation: HostEmulation<Self::Registers>;
    /// An instruction copied out of line.
    type Copy: OutOfLineCopy;
    /// What selects the page tables of a vCPU (CR3 and the paging mode; TTBR0/1 and TCR).
    type AddressSpace: Copy + Debug + Send + Sync;
    /// What the guest's CPU offers that changes how instructions are planned (arm64: pointer
    /// authentication). The default is the safe assumption for a CPU the VMM did not describe.
    type CpuFeatures: Copy + Debug + Default + PartialEq + Send + Sync;

    /// Short name for messages.
    const NAME: &'static str;
    /// The bytes of the software breakpoint written over a probed instruction.
    const BREAKPOINT: &'static [u8];
    /// The breakpoint that fills the rest of every slot and the return trampoline, and follows
    /// a trapped slot's copy.
    const SLOT_BREAKPOINT: &'static [u8];
    /// Longest instruction encoding.
    const MAX_INSN_LEN: usize;
    /// Most hardware execute breakpoints the architecture defines; how many a host offers comes
    /// from KVM ([`crate::engine::ProbeEngine::set_hardware_breakpoint_count`]).
    const MAX_HW_BREAKPOINTS: usize;
    /// Size and alignment of a kernel task stack (THREAD_SIZE), for return-probe bookkeeping.
    const KERNEL_STACK_SIZE: u64;

    /// Whether the kernel's per-CPU symbols move with the KASLR slide (arm64, where they are
    /// addresses the per-CPU offset is added to) or not (x86_64, where they are offsets from
    /// the per-CPU base).
    const PER_CPU_SYMBOLS_SLIDE: bool = false;
    /// Where the XOL area is mapped.
    const XOL: XolLayout;
    /// Whether a copy can return to the text by itself from the XOL area (a "boosted" slot
    /// ending in a branch back, one exit per hit: x86_64's `jmp rel32`); else every copy is
    /// followed by the slot's breakpoint and costs a second exit (arm64, whose `b` cannot reach
    /// the text from the XOL area), unless the engine has the code pages' alias within reach
    /// ([`Arch::map_jump_code`]), from which it boosts.
    const BOOSTED_SLOTS: bool = true;

    /// Whether `insn` is one of hvprobe's own breakpoint encodings, told apart from every
    /// breakpoint the guest uses (arm64: the BRK immediates of probes and slots); `false` where
    /// the encoding cannot tell (x86_64's one `int3`).
    fn is_own_breakpoint(_insn: &[u8]) -> bool {
        false
    }

    /// Whether `insn` (the first [`Arch::BREAKPOINT`]`.len()` bytes at an address) is a
    /// software breakpoint of any owner: a trap where no probe is goes back to the guest only
    /// while one is still there.
    fn is_breakpoint(insn: &[u8]) -> bool {
        insn == Self::BREAKPOINT
    }

    /// Makes instructions the host wrote at guest physical `gpa..gpa + len` visible to the
    /// guest's instruction fetch. Nothing to do where the host's writes are coherent with
    /// instruction fetch (x86_64).
    fn sync_instructions<M: GuestMemory>(_mem: &M, _gpa: u64, _len: usize) {}

    /// The address space the registers select.
    fn address_space(regs: &Self::Registers) -> Self::AddressSpace;

    /// For registers of a vCPU in user mode, the same registers on the kernel's own page
    /// tables where the user ones may lack most of the kernel (x86_64's page-table isolation:
    /// the user PGD is the kernel's next 4 KiB page, CR3 bit 12). A candidate only: the caller
    /// takes it when the registers as they are cannot read the kernel and it can. `None` where
    /// user mode always sees the kernel's page tables (arm64's TTBR1).
    fn kernel_page_tables(_regs: &Self::Registers) -> Option<Self::Registers> {
        None
    }

    /// The same registers with the top-level page table at guest physical `root` as their
    /// root (x86_64: CR3 without PCID bits), for a view of the kernel that outlives the
    /// process the registers came from. `None` where the architecture's kernel root never
    /// changes (arm64's TTBR1).
    fn on_page_table_root(_regs: &Self::Registers, _root: u64) -> Option<Self::Registers> {
        None
    }

    /// Why a data watchpoint `spec` cannot be planted on this architecture; `None` where the
    /// hardware slots take it.
    fn watch_refusal(_spec: crate::definition::WatchSpec) -> Option<&'static str> {
        None
    }

    /// Whether data watchpoints take the execute breakpoints' hardware slots (x86's DR0-3)
    /// rather than registers of their own (arm64's DBGWVR/DBGWCR pairs).
    const WATCHPOINTS_SHARE_BREAKPOINTS: bool = true;

    /// The register-use bits ([`HostEmulation::registers_used`]) that translating a kernel
    /// address needs beyond what [`crate::vm::VcpuAccess::exit_registers`] gives (arm64:
    /// TTBR1_EL1 and TCR_EL1). None where the exit gives them.
    const KERNEL_SPACE_REGISTERS: u64 = 0;

    /// The register-use bits that [`Arch::after_trap`] and the trapped-step functions read
    /// and change beyond what the exit gives (arm64: PSTATE). The engine reads them for
    /// [`Arch::after_trap`] only at a site on a guarded page
    /// ([`crate::pagewalk::Translation::guarded`]).
    const TRAP_REGISTERS: u64 = 0;

    /// Translates `va` through the page tables of `space`.
    fn translate(
        mem: &dyn GuestPhysMemory,
        space: Self::AddressSpace,
        va: u64,
    ) -> Result<Translation, WalkError>;

    /// Writes the XOL area's own page tables.
    fn write_xol_tables<M: GuestMemory>(area: &XolArea, mem: &M) -> Result<(), XolError>;

    /// Makes sure the XOL area is mapped in `space` (checked, and written if absent: the guest
    /// could take the hole). Returns whether it wrote.
    fn ensure_xol_mapped<M: GuestMemory>(
        area: &XolArea,
        mem: &M,
        space: Self::AddressSpace,
    ) -> Result<bool, XolError>;

    /// Maps the XOL code pages a second time inside `window` (guest virtual, text the guest
    /// freed and never reuses) for the jump plan's trampolines, where the area itself is beyond
    /// a jump's reach of the kernel text (arm64's `b`: 128 MiB); returns that alias's base.
    /// `None`: the trampolines run at the area's own addresses (x86_64, PUD 509). Without
    /// `write`, a dry run: whether and where, nothing written.
    fn map_jump_code<M: GuestMemory>(
        _area: &XolArea,
        _mem: &M,
        _space: Self::AddressSpace,
        _window: (u64, u64),
        _write: bool,
    ) -> Result<Option<u64>, XolError> {
        Ok(None)
    }

    /// Why a return probe cannot go at its address on a CPU with `features`, given whether the
    /// address is known to be a function's first instruction (arm64 with pointer
    /// authentication: the return address is signed once the function's `paciasp` ran, so
    /// only a known entry is safe). `None`: no rule beyond the engine's own.
    fn return_probe_refusal(
        _features: Self::CpuFeatures,
        _at_known_entry: bool,
    ) -> Option<&'static str> {
        None
    }

    /// The registers as the guest's own breakpoint handler would see them at a hit, for the
    /// probe's handlers: x86's RFLAGS.RF, which KVM may still hold at the intercept (set by
    /// an `iret` into the instruction), is never in the frame the CPU pushes for a trap, nor
    /// what a jump plan's `pushf` records. Nothing by default.
    fn at_hit(_regs: &mut Self::Registers) {}

    /// The PC moves on from a trap: clears what belongs to the trapped instruction (RFLAGS.RF
    /// after a hardware breakpoint on x86; PSTATE.BTYPE on arm64, which matters only where
    /// the next instruction is on a guarded page). Registers a vCPU left unread read as zero
    /// and must stay so: clearing bits keeps them.
    fn after_trap(regs: &mut Self::Registers);

    /// A trapped step starts: interrupts are masked until the slot's breakpoint, as Linux
    /// kprobes do. Returns the bits [`Arch::finish_trapped_step`] puts back.
    fn begin_trapped_step(regs: &mut Self::Registers) -> u64;

    /// A trapped step reached its breakpoint: the interrupt mask as it was.
    fn finish_trapped_step(regs: &mut Self::Registers, saved: u64);

    /// At a function's first instruction: the return address (at the top of the stack on
    /// x86_64, in the link register on arm64).
    fn return_address(
        regs: &Self::Registers,
        stack: &mut dyn GuestStack,
    ) -> Result<u64, EmulationError>;

    /// At a function's first instruction: replaces the return address.
    fn set_return_address(
        regs: &mut Self::Registers,
        stack: &mut dyn GuestStack,
        to: u64,
    ) -> Result<(), EmulationError>;

    /// A return reached the trampoline and goes on to `real`: where the return address is
    /// still visible after the return, it is made the real one (arm64's x30, which `ret` leaves
    /// holding the trampoline's address; the guest may read it, e.g. a tail of `ret` through
    /// x30 again). Nothing on x86_64, whose `ret` popped it.
    fn returned_through_trampoline(_regs: &mut Self::Registers, _trampoline: u64, _real: u64) {}

    /// The key of a probed function's frame at its entry: unique among live frames (the stack
    /// slot of the return address on x86_64, the stack pointer on arm64).
    fn frame_at_entry(regs: &Self::Registers) -> u64;

    /// The same key, seen when the function has returned to the trampoline.
    fn frame_at_return(regs: &Self::Registers) -> u64;

    /// The jump plan's patch for a site ([`crate::jump`]): the trampoline that records a hit
    /// and runs the displaced instruction, and the bytes that jump to it; or why the site (or
    /// the architecture, so far) cannot take it, and its probes take exits.
    fn jump_patch(
        _plan: &PlanOf<Self>,
        _insn: &Self::Instruction,
        _spec: &crate::jump::TrampolineSpec,
    ) -> Result<crate::jump::JumpPatch, &'static str> {
        Err("the jump plan is not implemented for this architecture yet")
    }

    /// The registers a jump record holds, as a hit's registers.
    fn jump_registers(_record: &crate::jump::JumpRecord) -> Self::Registers {
        Self::Registers::default()
    }
}
