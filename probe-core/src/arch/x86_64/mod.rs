//! The x86_64 back end: registers, instruction decoding and classification (capstone), the
//! step plans and the host-side emulation of simple instructions.

mod decode;
mod emulate;
pub mod extable;
mod regs;

pub use decode::{DecodeError, Decoder, GuestInt3, Instruction, InstructionKind, Refusal};
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

/// Which kind of plan a site has, for statistics and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PlanKind {
    /// Emulated on the host.
    Emulate,
    /// Copied out of line.
    Xol,
    /// Copied out of line with its RIP-relative operand rewritten.
    XolRiprel,
}

impl PlanKind {
    /// Every kind, in the order statistics list them.
    pub const ALL: [PlanKind; 3] = [PlanKind::Emulate, PlanKind::Xol, PlanKind::XolRiprel];

    /// Short name, for figures and messages.
    pub fn name(self) -> &'static str {
        match self {
            PlanKind::Emulate => "emulate",
            PlanKind::Xol => "xol",
            PlanKind::XolRiprel => "xol-riprel",
        }
    }
}

impl std::fmt::Display for PlanKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl StepPlan {
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
    /// The kind of plan a copy is: `xol-riprel` when its RIP-relative operand is rewritten.
    pub fn kind(&self) -> PlanKind {
        if self.rip_disp.is_some() {
            PlanKind::XolRiprel
        } else {
            PlanKind::Xol
        }
    }

    /// The address a RIP-relative operand of the original at `orig_va` refers to (before any
    /// segment base is added).
    fn rip_target(&self, d: RipDisplacement, orig_va: u64) -> Option<u64> {
        let at = usize::from(d.offset);
        let disp = i32::from_le_bytes(self.bytes.get(at..at + 4)?.try_into().ok()?);
        Some(
            orig_va
                .wrapping_add(u64::from(self.len))
                .wrapping_add(disp as i64 as u64),
        )
    }

    /// The copy with its RIP-relative operand rewritten as an absolute `[disp32]` (ModRM
    /// `rm=100` with a SIB byte of no base and no index), when the target fits a sign-extended
    /// 32 bits: kernel image and module addresses, and the small per-CPU offsets that
    /// `gs:[rip+X]` operands reach, which are 2 GiB away from every slot. The copy is one byte
    /// longer, and the same wherever the slot is.
    fn absolute_copy(&self, orig_va: u64) -> Option<Vec<u8>> {
        let d = self.rip_disp.filter(|d| !d.eip)?;
        let target = i32::try_from(self.rip_target(d, orig_va)? as i64).ok()?;
        let at = usize::from(d.offset);
        let modrm_at = at.checked_sub(1)?;
        let legacy = decode::legacy_prefixes(&self.bytes).len();
        // VEX, EVEX and XOP carry REX.X inverted inside their payload: leave them to
        // displacement re-targeting.
        let xop = self.bytes.get(legacy) == Some(&0x8f)
            && self.bytes.get(legacy + 1).is_some_and(|b| b & 0x1f >= 8);
        if xop || matches!(self.bytes.get(legacy), Some(0xc4 | 0xc5 | 0x62)) {
            return None;
        }
        let modrm = *self.bytes.get(modrm_at)?;
        if modrm & 0xc7 != 0x05 || self.bytes.len() + 1 > 15 {
            return None;
        }
        let mut out = self.bytes[..modrm_at].to_vec();
        if let Some(rex) = out.get_mut(legacy).filter(|b| **b & 0xf0 == 0x40) {
            // SIB index 100 means "no index" only without REX.X.
            *rex &= !0x02;
        }
        out.push((modrm & 0x38) | 0x04);
        out.push(0x25);
        out.extend_from_slice(&target.to_le_bytes());
        out.extend_from_slice(self.bytes.get(at + 4..)?);
        Some(out)
    }

    /// Length of the copy of the original at `orig_va` in a slot (the original's, or one more
    /// when its RIP-relative operand is rewritten as absolute): the slot's own trap follows it.
    pub fn copy_len(&self, orig_va: u64) -> u64 {
        self.absolute_copy(orig_va)
            .map_or(u64::from(self.len), |c| c.len() as u64)
    }

    /// The copy for a slot at `slot_va` that addresses what the original at `orig_va`
    /// addressed: its RIP-relative operand made absolute where the target allows it, else its
    /// displacement re-targeted for the slot; `None` if neither reaches the target.
    pub fn relocate(&self, orig_va: u64, slot_va: u64) -> Option<Vec<u8>> {
        if let Some(copy) = self.absolute_copy(orig_va) {
            return Some(copy);
        }
        let mut out = self.bytes.clone();
        if let Some(d) = self.rip_disp {
            let at = usize::from(d.offset);
            let target = self.rip_target(d, orig_va)?;
            let new = target.wrapping_sub(slot_va.wrapping_add(u64::from(self.len))) as i64;
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
