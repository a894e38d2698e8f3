//! The x86_64 back end: registers, instruction decoding and classification (capstone), the
//! step plans and the host-side emulation of simple instructions.

mod decode;
mod emulate;
mod regs;

pub use decode::{DecodeError, Decoder, Instruction, InstructionKind, Refusal};
pub use emulate::{Emulation, EmulationError, condition_holds};
pub use regs::{Gpr, Registers};

/// Marker type of the x86_64 architecture.
#[derive(Debug, Clone, Copy, Default)]
pub struct X86_64;

/// The `int3` opcode.
pub const INT3: u8 = 0xcc;

impl crate::arch::Arch for X86_64 {
    type Registers = Registers;
    type Plan = StepPlan;
    const NAME: &'static str = "x86_64";
    const BREAKPOINT: &'static [u8] = &[INT3];
    const MAX_INSN_LEN: usize = 15;
}

/// How the instruction displaced by a breakpoint is executed once the handlers ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepPlan {
    /// Emulated on the host: one exit per hit.
    Emulate(Emulation),
    /// Copied into an XOL slot and single-stepped there, then fixed up: two exits per hit.
    StepOutOfLine(OutOfLine),
}

impl StepPlan {
    /// Short name of the plan, for figures and messages.
    pub fn name(&self) -> &'static str {
        match self {
            StepPlan::Emulate(_) => "emulate",
            StepPlan::StepOutOfLine(o) if o.scratch.is_some() => "xol-riprel",
            StepPlan::StepOutOfLine(o) if o.fix_return_address => "xol-call",
            StepPlan::StepOutOfLine(_) => "xol",
        }
    }
}

/// An instruction prepared for execution out of line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfLine {
    /// The bytes to place in the slot (the original instruction, rewritten when it addressed
    /// memory relative to RIP).
    pub slot_bytes: Vec<u8>,
    /// Length of the original instruction.
    pub len: u8,
    /// For a RIP-relative instruction: the register that replaces RIP as the base. The host
    /// loads it with the original next-instruction address before the step and restores it
    /// after.
    pub scratch: Option<Gpr>,
    /// An indirect `call`: the return address it pushes points into the slot and must be
    /// rewritten to the original stream.
    pub fix_return_address: bool,
}
