//! The x86_64 back end: registers, instruction decoding and classification (capstone), the
//! step plans and the host-side emulation of simple instructions.

mod decode;
mod emulate;
pub mod extable;
mod regs;

pub use decode::{DecodeError, Decoder, Instruction, InstructionKind, Refusal};
pub use emulate::{Emulation, EmulationError, GuestStack, condition_holds};
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
    /// Copied into XOL slots and run there by the guest itself: a "boosted" slot (the copy, then
    /// `jmp` back to the next original instruction) costs no exit of its own; a "trapped" slot
    /// (the copy, then an int3 the host owns) brings control back for post handlers.
    StepOutOfLine(OutOfLine),
}

impl StepPlan {
    /// Short name of the plan, for figures and messages.
    pub fn name(&self) -> &'static str {
        match self {
            StepPlan::Emulate(_) => "emulate",
            StepPlan::StepOutOfLine(o) if o.rip_disp.is_some() => "xol-riprel",
            StepPlan::StepOutOfLine(_) => "xol",
        }
    }
}

/// Where a copied instruction addresses memory relative to the instruction pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RipDisplacement {
    /// Offset of the 32-bit displacement in the instruction bytes.
    pub offset: u8,
    /// `67`-prefixed: the address is computed from EIP and truncated to 32 bits.
    pub eip: bool,
}

/// An instruction prepared for execution out of line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfLine {
    /// The original instruction bytes.
    pub bytes: Vec<u8>,
    /// Length of the original instruction.
    pub len: u8,
    /// A RIP-relative memory operand, re-targeted for the slot's address when the copy is made.
    pub rip_disp: Option<RipDisplacement>,
    /// Why the copy cannot run in a trapped slot (with interrupts off until the trap): it may
    /// leave the slot without reaching the trap (an indirect branch) or wait for an interrupt
    /// (`hlt`). Such an instruction takes no post handler.
    pub untrappable: Option<&'static str>,
}

/// The `jmp rel32` opcode.
const JMP_REL32: u8 = 0xe9;

impl OutOfLine {
    /// The copy for a slot at `slot_va`, its RIP-relative displacement re-targeted so that it
    /// addresses what the original at `orig_va` addressed; `None` if the target is out of reach
    /// of a 32-bit displacement from the slot.
    pub fn relocate(&self, orig_va: u64, slot_va: u64) -> Option<Vec<u8>> {
        let mut out = self.bytes.clone();
        if let Some(d) = self.rip_disp {
            let at = usize::from(d.offset);
            let disp = i32::from_le_bytes(out.get(at..at + 4)?.try_into().ok()?);
            let len = u64::from(self.len);
            let target = orig_va.wrapping_add(len).wrapping_add(disp as i64 as u64);
            let new = target.wrapping_sub(slot_va.wrapping_add(len)) as i64;
            let new = if d.eip {
                // Address-size 32: only the low 32 bits of the sum count.
                new as i32
            } else {
                i32::try_from(new).ok()?
            };
            out[at..at + 4].copy_from_slice(&new.to_le_bytes());
        }
        Some(out)
    }

    /// The bytes of a boosted slot at `slot_va`: the copy, then `jmp rel32` to the next
    /// original instruction; `None` if either is out of reach.
    pub fn boosted_slot(&self, orig_va: u64, slot_va: u64) -> Option<Vec<u8>> {
        let mut out = self.relocate(orig_va, slot_va)?;
        let after = slot_va + out.len() as u64 + 5;
        let back = orig_va
            .wrapping_add(u64::from(self.len))
            .wrapping_sub(after) as i64;
        out.push(JMP_REL32);
        out.extend_from_slice(&i32::try_from(back).ok()?.to_le_bytes());
        Some(out)
    }

    /// The bytes of a trapped slot at `slot_va`: the copy, then an int3 at `slot_va + len`.
    pub fn trapped_slot(&self, orig_va: u64, slot_va: u64) -> Option<Vec<u8>> {
        let mut out = self.relocate(orig_va, slot_va)?;
        out.push(INT3);
        Some(out)
    }
}
