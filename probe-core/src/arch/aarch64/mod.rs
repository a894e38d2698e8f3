//! The aarch64 back end: the register file, the BRK encodings, decoding and classification
//! (host emulation, out-of-line copies, refusals), the stage-1 page walker, the XOL area's
//! descriptors under TTBR1, and the [`Arch`] implementation the engine runs on.

mod decode;
mod emulate;
mod insn;
pub mod jump;
pub mod pagewalk;
mod regs;
pub mod store;
pub mod xol;

pub use decode::{
    Decoder, Instruction, MRS_DAIF, NOP, classify, exclusive_window, is_pac_hint, out_of_line,
};
pub use emulate::{Emulation, condition_holds};
pub use pagewalk::AddressSpace;
pub use regs::{PSTATE_BTYPE, PSTATE_DAIF, Registers, UNREAD_TABLE, uses};

use crate::arch::{Arch, EmulationError, GuestStack, OutOfLineCopy, PlanKind, XolLayout};
use crate::guest_memory::GuestPhysMemory;
use crate::pagewalk::{Translation, WalkError};
use crate::xol::{XolArea, XolError};

/// Marker type of the aarch64 architecture.
#[derive(Debug, Clone, Copy, Default)]
pub struct Aarch64;

/// `BRK #imm16` encoding.
pub const fn brk(imm: u16) -> u32 {
    0xd420_0000 | ((imm as u32) << 5)
}

/// The immediate of hvprobe's probe breakpoints: distinct from every immediate the kernel
/// uses (arch/arm64/include/asm/brk-imm.h: kprobes 0x004-0x007, uprobes 0x005, fault 0x100,
/// KGDB 0x400/0x401, BUG 0x800, KASAN 0x900-0x9ff, UBSAN 0x5500-0x55ff, CFI 0x8000-0x8fff).
pub const PROBE_BRK_IMM: u16 = 0x0a5;
/// The immediate of the BRKs after a slot's copy and in the return trampoline.
pub const SLOT_BRK_IMM: u16 = 0x0a6;

const PROBE_BRK: [u8; 4] = brk(PROBE_BRK_IMM).to_le_bytes();
const SLOT_BRK: [u8; 4] = brk(SLOT_BRK_IMM).to_le_bytes();

/// What the guest's CPU offers that changes the plans: whether it may sign return addresses
/// (pointer authentication). The default assumes it may, the safe side for a CPU nobody
/// described: the PAC hints then run out of line instead of being emulated as NOPs, and return
/// probes go only on known function entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    /// The guest's ID registers show an address-authentication algorithm (ID_AA64ISAR1_EL1
    /// APA/API, ID_AA64ISAR2_EL1 APA3): `paciasp` and friends may sign and check x30.
    pub pointer_authentication: bool,
}

impl Default for CpuFeatures {
    fn default() -> CpuFeatures {
        CpuFeatures {
            pointer_authentication: true,
        }
    }
}

impl CpuFeatures {
    /// A CPU without pointer authentication: its PAC hints are NOPs.
    pub const WITHOUT_PAC: CpuFeatures = CpuFeatures {
        pointer_authentication: false,
    };

    /// The features the guest's ID registers describe: `isar1` is ID_AA64ISAR1_EL1, `isar2`
    /// ID_AA64ISAR2_EL1 (as KVM gives them to the guest, with what it hides already hidden).
    pub fn from_id_registers(isar1: u64, isar2: u64) -> CpuFeatures {
        let field = |reg: u64, shift: u32| (reg >> shift) & 0xf;
        CpuFeatures {
            pointer_authentication: field(isar1, 4) != 0
                || field(isar1, 8) != 0
                || field(isar2, 12) != 0,
        }
    }
}

/// An instruction word to be copied out of line: position-independent (every PC-relative
/// instruction is emulated instead), so the copy is the word itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfLine {
    /// The instruction word.
    pub word: u32,
}

impl OutOfLineCopy for OutOfLine {
    fn kind(&self) -> PlanKind {
        PlanKind::Xol
    }

    fn original_len(&self) -> u64 {
        4
    }

    fn copy_len(&self, _orig_va: u64) -> u64 {
        4
    }

    /// The copy, then `b` back to the next instruction: only from where `b` reaches the text
    /// (the XOL code pages' alias in the kernel's freed init range; the XOL area itself is far
    /// beyond `b`'s 128 MiB, so there every copy is followed by a BRK instead:
    /// [`Arch::BOOSTED_SLOTS`]).
    fn boosted_slot(&self, orig_va: u64, slot_va: u64) -> Option<Vec<u8>> {
        let rel = (orig_va as i64 + 4).wrapping_sub(slot_va as i64 + 4);
        if !(-(1 << 27)..(1 << 27)).contains(&rel) {
            return None;
        }
        let b = 0x1400_0000 | (((rel / 4) as u32) & 0x03ff_ffff);
        let mut out = self.word.to_le_bytes().to_vec();
        out.extend_from_slice(&b.to_le_bytes());
        Some(out)
    }

    fn trapped_slot(&self, _orig_va: u64, _slot_va: u64) -> Option<Vec<u8>> {
        let mut out = self.word.to_le_bytes().to_vec();
        out.extend_from_slice(&SLOT_BRK);
        Some(out)
    }

    fn untrappable(&self) -> Option<&'static str> {
        None
    }
}

impl Arch for Aarch64 {
    type Registers = Registers;
    type Instruction = Instruction;
    type Decoder = Decoder;
    type Emulation = Emulation;
    type Copy = OutOfLine;
    type AddressSpace = AddressSpace;
    type CpuFeatures = CpuFeatures;

    const NAME: &'static str = "aarch64";
    const BREAKPOINT: &'static [u8] = &PROBE_BRK;
    const SLOT_BREAKPOINT: &'static [u8] = &SLOT_BRK;
    const MAX_INSN_LEN: usize = 4;
    /// DBGBCR<n>_EL1 go up to 16.
    const MAX_HW_BREAKPOINTS: usize = 16;
    /// THREAD_SIZE with 4 KiB pages and KASAN off.
    const KERNEL_STACK_SIZE: u64 = 16 << 10;
    const PER_CPU_SYMBOLS_SLIDE: bool = true;
    const XOL: XolLayout = xol::LAYOUT;
    /// No boosted slots in the XOL area itself; the engine boosts through the code pages'
    /// alias where one is mapped ([`Arch::map_jump_code`]).
    const BOOSTED_SLOTS: bool = false;

    /// Any `BRK #imm`: the guest's own (kprobes, BUG, KGDB) as well as ours.
    fn is_breakpoint(insn: &[u8]) -> bool {
        insn.try_into()
            .is_ok_and(|w: [u8; 4]| u32::from_le_bytes(w) & 0xffe0_001f == 0xd420_0000)
    }

    /// `BRK #0xa5` and `BRK #0xa6`, which no kernel code uses.
    fn is_own_breakpoint(insn: &[u8]) -> bool {
        insn == PROBE_BRK || insn == SLOT_BRK
    }

    /// On an arm64 host, the data cache is cleaned and the instruction cache invalidated to the
    /// point of unification over the host's mapping of the bytes (`__clear_cache`: DC CVAU, DSB,
    /// IC IVAU, DSB, ISB), as the kernel does after patching text; the caches are physically
    /// indexed for the data side and the guest fetches through the same physical memory.
    fn sync_instructions<M: vm_memory::GuestMemory>(_mem: &M, _gpa: u64, _len: usize) {
        #[cfg(target_arch = "aarch64")]
        if let Some(host) = _mem.physical_memory().and_then(|p| {
            vm_memory::GuestMemoryBackend::get_host_address(p, vm_memory::GuestAddress(_gpa)).ok()
        }) {
            unsafe extern "C" {
                fn __clear_cache(start: *mut core::ffi::c_char, end: *mut core::ffi::c_char);
            }
            // SAFETY: `host` maps `_gpa` and the `_len` bytes the engine just wrote through the
            // same mapping (one region: a breakpoint, a slot, saved bytes); `__clear_cache` only
            // performs cache maintenance on that range.
            unsafe { __clear_cache(host.cast(), host.add(_len).cast()) }
        }
    }

    const KERNEL_SPACE_REGISTERS: u64 = uses::KERNEL_SPACE;
    const WATCHPOINTS_SHARE_BREAKPOINTS: bool = false;
    /// PSTATE: BTYPE is cleared, DAIF set and restored.
    const TRAP_REGISTERS: u64 = uses::PSTATE;

    fn address_space(regs: &Registers) -> AddressSpace {
        AddressSpace {
            ttbr0: regs.ttbr0,
            ttbr1: regs.ttbr1,
            tcr: regs.tcr,
        }
    }

    fn translate(
        mem: &dyn GuestPhysMemory,
        space: AddressSpace,
        va: u64,
    ) -> Result<Translation, WalkError> {
        pagewalk::translate(mem, space, va)
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
        xol::ensure_mapped(area, mem, space)
    }

    fn map_jump_code<M: vm_memory::GuestMemory>(
        area: &XolArea,
        mem: &M,
        space: AddressSpace,
        window: (u64, u64),
        write: bool,
    ) -> Result<Option<u64>, XolError> {
        xol::map_jump_code(area, mem, space, window, write).map(Some)
    }

    /// With pointer authentication the function's `paciasp` signs x30: the trampoline must be
    /// in x30 before it (and is then signed and checked like the real return address), which
    /// only a probe on the function's first instruction guarantees.
    fn return_probe_refusal(features: CpuFeatures, at_known_entry: bool) -> Option<&'static str> {
        (features.pointer_authentication && !at_known_entry).then_some(
            "the guest may sign return addresses (pointer authentication), so a return probe must be on a known function entry, before its paciasp",
        )
    }

    fn after_trap(regs: &mut Registers) {
        // The host moved the PC: no branch type is pending for a BTI check.
        regs.pstate &= !PSTATE_BTYPE;
    }

    fn begin_trapped_step(regs: &mut Registers) -> u64 {
        let saved = regs.pstate & PSTATE_DAIF;
        regs.pstate |= PSTATE_DAIF;
        saved
    }

    fn finish_trapped_step(regs: &mut Registers, saved: u64) {
        regs.pstate = (regs.pstate & !PSTATE_DAIF) | (saved & PSTATE_DAIF);
    }

    fn return_address(
        regs: &Registers,
        _stack: &mut dyn GuestStack,
    ) -> Result<u64, EmulationError> {
        Ok(regs.x[30])
    }

    fn set_return_address(
        regs: &mut Registers,
        _stack: &mut dyn GuestStack,
        to: u64,
    ) -> Result<(), EmulationError> {
        regs.x[30] = to;
        Ok(())
    }

    fn returned_through_trampoline(regs: &mut Registers, trampoline: u64, real: u64) {
        if regs.x[30] == trampoline {
            regs.x[30] = real;
        }
    }

    fn frame_at_entry(regs: &Registers) -> u64 {
        regs.sp
    }

    fn frame_at_return(regs: &Registers) -> u64 {
        // A function returns with the stack pointer it was entered with.
        regs.sp
    }

    fn jump_patch(
        plan: &crate::arch::PlanOf<Self>,
        insn: &Instruction,
        spec: &crate::jump::TrampolineSpec,
    ) -> Result<crate::jump::JumpPatch, &'static str> {
        jump::patch(plan, insn, spec)
    }

    fn jump_registers(record: &crate::jump::JumpRecord) -> Registers {
        jump::registers(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakpoints_are_brks_with_hvprobes_immediates() {
        assert_eq!(brk(0), 0xd420_0000);
        assert_eq!(brk(0x004), 0xd420_0080); // the kprobes BRK
        assert_eq!(u32::from_le_bytes(PROBE_BRK), 0xd420_14a0);
        assert_eq!(<Aarch64 as Arch>::BREAKPOINT.len(), 4);
        assert!(Aarch64::is_breakpoint(&brk(0x800).to_le_bytes()));
        assert!(Aarch64::is_breakpoint(&PROBE_BRK));
        assert!(!Aarch64::is_breakpoint(&NOP.to_le_bytes()));
        // HLT #0 is not a BRK.
        assert!(!Aarch64::is_breakpoint(&0xd440_0000u32.to_le_bytes()));
    }

    #[test]
    fn trapped_steps_mask_daif_and_put_it_back() {
        let mut r = Registers {
            pstate: 0x3c5 & !PSTATE_DAIF | (1 << 11),
            ..Default::default()
        };
        let before = r.pstate;
        let saved = Aarch64::begin_trapped_step(&mut r);
        assert_eq!(r.pstate & PSTATE_DAIF, PSTATE_DAIF);
        Aarch64::finish_trapped_step(&mut r, saved);
        assert_eq!(r.pstate, before);
        Aarch64::after_trap(&mut r);
        assert_eq!(r.pstate & PSTATE_BTYPE, 0);
    }
}
