//! The x86_64 back end: registers, instruction decoding and classification (capstone), the
//! step plans and the host-side emulation of simple instructions, the page walker and the XOL
//! layout, and the [`Arch`] implementation that hands them to the engine.

mod decode;
mod emulate;
pub mod jump;
pub mod pagewalk;
mod regs;
pub mod xol;

pub use crate::arch::{
    DecodeError, EmulationError, GuestBreakpoints, GuestStack, PlanKind, Refusal,
};
pub use decode::{Decoder, Instruction, InstructionKind};
pub use emulate::{Emulation, condition_holds};
pub use pagewalk::{AddressSpace, PagingMode};
pub use regs::{Gpr, Registers};

use crate::arch::{Arch, DecodedInstruction, InstructionDecoder, OutOfLineCopy, PlanOf, XolLayout};
use crate::guest_memory::GuestPhysMemory;
use crate::pagewalk::{Translation, WalkError};
use crate::xol::{XolArea, XolError};

/// Marker type of the x86_64 architecture.
#[derive(Debug, Clone, Copy, Default)]
pub struct X86_64;

/// The `int3` opcode.
pub const INT3: u8 = 0xcc;

/// RFLAGS.RF: suppresses instruction breakpoints for one instruction.
const RFLAGS_RF: u64 = 1 << 16;
/// RFLAGS.IF: a trapped step runs with it clear, as Linux kprobes' int3 single-step does.
const RFLAGS_IF: u64 = 1 << 9;

impl Arch for X86_64 {
    type Registers = Registers;
    type Instruction = Instruction;
    type Decoder = Decoder;
    type Emulation = Emulation;
    type Copy = OutOfLine;
    type AddressSpace = AddressSpace;
    /// Nothing in the x86_64 plans depends on the CPU's features.
    type CpuFeatures = ();

    const NAME: &'static str = "x86_64";
    const BREAKPOINT: &'static [u8] = &[INT3];
    const SLOT_BREAKPOINT: &'static [u8] = &[INT3];
    const MAX_INSN_LEN: usize = 15;
    const MAX_HW_BREAKPOINTS: usize = 4;
    /// THREAD_SIZE with KASAN off.
    const KERNEL_STACK_SIZE: u64 = 16 << 10;
    const XOL: XolLayout = xol::LAYOUT;

    fn address_space(regs: &Registers) -> AddressSpace {
        AddressSpace {
            cr3: regs.cr3,
            mode: PagingMode::from_cr4(regs.cr4),
        }
    }

    fn translate(
        mem: &dyn GuestPhysMemory,
        space: AddressSpace,
        va: u64,
    ) -> Result<Translation, WalkError> {
        pagewalk::translate(mem, space.cr3, space.mode, va)
    }

    fn kernel_page_tables(regs: &Registers) -> Option<Registers> {
        // Linux's PTI_USER_PGTABLE_BIT (12) and the user PCID bit (11): SWITCH_TO_KERNEL_CR3.
        const USER_PGTABLE: u64 = 1 << 12;
        const USER_PCID: u64 = 1 << 11;
        (regs.cr3 & USER_PGTABLE != 0).then(|| Registers {
            cr3: regs.cr3 & !(USER_PGTABLE | USER_PCID),
            ..regs.clone()
        })
    }

    fn on_page_table_root(regs: &Registers, root: u64) -> Option<Registers> {
        (root & 0xfff == 0).then(|| Registers {
            cr3: root,
            ..regs.clone()
        })
    }

    fn write_xol_tables<M: vm_memory::GuestMemory>(
        area: &XolArea,
        mem: &M,
    ) -> Result<(), XolError> {
        xol::write_tables(area, mem)
    }

    fn ensure_xol_mapped<M: vm_memory::GuestMemory>(
        area: &XolArea,
        mem: &M,
        space: AddressSpace,
    ) -> Result<bool, XolError> {
        xol::ensure_mapped(area, mem, space.cr3, space.mode)
    }

    fn at_hit(regs: &mut Registers) {
        regs.rflags &= !RFLAGS_RF;
    }

    fn after_trap(regs: &mut Registers) {
        // RIP moves on: a resume flag left from a hardware-breakpoint #DB would suppress a
        // breakpoint on the next instruction.
        regs.rflags &= !RFLAGS_RF;
    }

    fn begin_trapped_step(regs: &mut Registers) -> u64 {
        let saved = regs.rflags & RFLAGS_IF;
        regs.rflags &= !RFLAGS_IF;
        saved
    }

    fn finish_trapped_step(regs: &mut Registers, saved: u64) {
        regs.rflags |= saved & RFLAGS_IF;
    }

    fn return_address(regs: &Registers, stack: &mut dyn GuestStack) -> Result<u64, EmulationError> {
        stack.read_u64(regs.get(Gpr::Rsp))
    }

    fn set_return_address(
        regs: &mut Registers,
        stack: &mut dyn GuestStack,
        to: u64,
    ) -> Result<(), EmulationError> {
        stack.write_u64(regs.get(Gpr::Rsp), to)
    }

    fn frame_at_entry(regs: &Registers) -> u64 {
        regs.get(Gpr::Rsp)
    }

    fn frame_at_return(regs: &Registers) -> u64 {
        // The `ret` popped the slot just below the stack pointer.
        regs.get(Gpr::Rsp).wrapping_sub(8)
    }

    fn jump_patch(
        plan: &StepPlan,
        insn: &Instruction,
        spec: &crate::jump::TrampolineSpec,
    ) -> Result<crate::jump::JumpPatch, &'static str> {
        jump::patch(plan, insn, spec)
    }

    fn jump_registers(record: &crate::jump::JumpRecord) -> Registers {
        jump::registers(record)
    }
}

impl DecodedInstruction for Instruction {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn text(&self) -> &str {
        &self.text
    }
}

impl InstructionDecoder<X86_64> for Decoder {
    fn new(_features: ()) -> Result<Decoder, DecodeError> {
        Decoder::new()
    }

    fn decode(&self, bytes: &[u8], va: u64) -> Result<Instruction, DecodeError> {
        Decoder::decode(self, bytes, va)
    }

    fn check_boundary(
        &self,
        code: &[u8],
        start: u64,
        offset: u64,
        guest: GuestBreakpoints,
    ) -> Result<(), DecodeError> {
        Decoder::check_boundary(self, code, start, offset, guest)
    }

    fn plan(&self, insn: &Instruction) -> Result<PlanOf<X86_64>, Refusal> {
        Decoder::plan(self, insn)
    }

    fn fallback_copy(&self, insn: &Instruction) -> Option<OutOfLine> {
        Decoder::fallback_copy(self, insn)
    }
}

impl OutOfLineCopy for OutOfLine {
    fn kind(&self) -> PlanKind {
        OutOfLine::kind(self)
    }

    fn original_len(&self) -> u64 {
        u64::from(self.len)
    }

    fn copy_len(&self, orig_va: u64) -> u64 {
        OutOfLine::copy_len(self, orig_va)
    }

    fn boosted_slot(&self, orig_va: u64, slot_va: u64) -> Option<Vec<u8>> {
        OutOfLine::boosted_slot(self, orig_va, slot_va)
    }

    fn trapped_slot(&self, orig_va: u64, slot_va: u64) -> Option<Vec<u8>> {
        OutOfLine::trapped_slot(self, orig_va, slot_va)
    }

    fn untrappable(&self) -> Option<&'static str> {
        self.untrappable
    }
}

/// How the instruction displaced by an int3 is executed once the handlers ran.
pub type StepPlan = crate::arch::StepPlan<Emulation, OutOfLine>;

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

#[cfg(test)]
mod pti_tests {
    use super::*;

    #[test]
    fn a_user_cr3_of_page_table_isolation_gives_the_kernels_pgd_and_pcid() {
        let user = Registers {
            cr3: 0x0000_0001_2345_7000 | (1 << 11) | 5,
            ..Registers::default()
        };
        let kernel = X86_64::kernel_page_tables(&user).unwrap();
        assert_eq!(kernel.cr3, 0x0000_0001_2345_6000 | 5);
        // A CR3 without the user bit has no other candidate.
        assert!(X86_64::kernel_page_tables(&kernel).is_none());
        // The kernel's own root replaces CR3 whole (no PCID: a root of its own).
        let own = X86_64::on_page_table_root(&user, 0x02a1_0000).unwrap();
        assert_eq!((own.cr3, own.cr4), (0x02a1_0000, user.cr4));
        assert!(X86_64::on_page_table_root(&user, 0x02a1_0008).is_none());
    }
}
