//! aarch64 decoding and classification (as Linux keeps `decode-insn.c` apart from
//! `simulate-insn.c`: the emulations themselves are `emulate.rs`'s). Every instruction is one
//! 32-bit word, so a boundary is a multiple of four from the function start; capstone gives
//! the text. Classification, by the encodings of `insn.rs`: the instructions emulated on the
//! host ([`classify`], every PC-relative one among them), then what may run out of line
//! ([`out_of_line`]), and the rest refused with the instruction and the reason named; the
//! exclusive-monitor window ([`exclusive_window`]).

use capstone::Capstone;
use capstone::arch::BuildsCapstone;
use capstone::arch::arm64::ArchMode;

use super::emulate::Emulation;
use super::{Aarch64, CpuFeatures, OutOfLine, insn};
use crate::arch::{
    DecodeError, DecodedInstruction, GuestBreakpoints, InstructionDecoder, PlanOf, Refusal,
    StepPlan,
};

/// `NOP`.
pub const NOP: u32 = 0xd503_201f;

/// One decoded instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// Its guest virtual address.
    pub va: u64,
    /// The instruction word.
    pub word: u32,
    /// Its bytes (little-endian).
    pub bytes: Vec<u8>,
    /// Mnemonic and operands.
    pub text: String,
}

impl DecodedInstruction for Instruction {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn text(&self) -> &str {
        &self.text
    }
}

/// A capstone-backed aarch64 decoder for a CPU with given features.
pub struct Decoder {
    cs: Capstone,
    features: CpuFeatures,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder(aarch64)")
    }
}

impl Decoder {
    fn text(&self, word: u32, va: u64) -> String {
        self.cs
            .disasm_count(&word.to_le_bytes(), va, 1)
            .ok()
            .and_then(|insns| {
                insns.iter().next().map(|i| {
                    let ops = i.op_str().unwrap_or("");
                    let m = i.mnemonic().unwrap_or("?");
                    if ops.is_empty() {
                        m.to_string()
                    } else {
                        format!("{m} {ops}")
                    }
                })
            })
            .unwrap_or_else(|| format!(".inst {word:#010x}"))
    }
}

impl InstructionDecoder<Aarch64> for Decoder {
    fn new(features: CpuFeatures) -> Result<Decoder, DecodeError> {
        let cs = Capstone::new()
            .arm64()
            .mode(ArchMode::Arm)
            .build()
            .map_err(|e| DecodeError::Disassembler {
                arch: "aarch64",
                why: e.to_string(),
            })?;
        Ok(Decoder { cs, features })
    }

    fn decode(&self, bytes: &[u8], va: u64) -> Result<Instruction, DecodeError> {
        let word: [u8; 4] =
            bytes
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .ok_or(DecodeError::Invalid {
                    arch: "aarch64",
                    va,
                })?;
        if !va.is_multiple_of(4) {
            return Err(DecodeError::Invalid {
                arch: "aarch64",
                va,
            });
        }
        let word = u32::from_le_bytes(word);
        Ok(Instruction {
            va,
            word,
            bytes: word.to_le_bytes().to_vec(),
            text: self.text(word, va),
        })
    }

    fn check_boundary(
        &self,
        code: &[u8],
        start: u64,
        offset: u64,
        _guest: GuestBreakpoints,
    ) -> Result<(), DecodeError> {
        if offset.is_multiple_of(4) {
            return Ok(());
        }
        let insn_start = offset & !3;
        let text = code
            .get(insn_start as usize..insn_start as usize + 4)
            .map(|w| {
                self.text(
                    u32::from_le_bytes(w.try_into().unwrap_or([0; 4])),
                    start + insn_start,
                )
            })
            .unwrap_or_default();
        Err(DecodeError::NotOnBoundary {
            offset,
            insn_start,
            len: 4,
            text,
        })
    }

    fn plan(&self, insn: &Instruction) -> Result<PlanOf<Aarch64>, Refusal> {
        // With pointer authentication a PAC hint is no NOP: it runs out of line.
        let authenticates = self.features.pointer_authentication && super::is_pac_hint(insn.word);
        if let Some(emulation) = super::classify(insn.word, insn.va).filter(|_| !authenticates) {
            return Ok(StepPlan::Emulate(emulation));
        }
        super::out_of_line(insn.word)
            .map(|()| StepPlan::StepOutOfLine(OutOfLine { word: insn.word }))
            .map_err(|reason| Refusal {
                va: insn.va,
                text: insn.text.clone(),
                reason,
            })
    }

    fn fallback_copy(&self, _insn: &Instruction) -> Option<OutOfLine> {
        None
    }

    fn check_context(&self, preceding: &[u8], insn: &Instruction) -> Result<(), Refusal> {
        match super::exclusive_window(preceding) {
            Some(back) => Err(Refusal {
                va: insn.va,
                text: insn.text.clone(),
                reason: if back <= 4 {
                    "it follows a load-exclusive: a trap inside the exclusive-monitor window clears the monitor and the store-exclusive would fail forever"
                } else {
                    "it sits inside the exclusive-monitor window of a load-exclusive before it: a trap there clears the monitor and the store-exclusive would fail forever"
                },
            }),
            None => Ok(()),
        }
    }
}

/// `mrs x0, daif`; the low five bits are the destination.
pub const MRS_DAIF: u32 = insn::MRS_DAIF.value;

/// Whether `word` is one of the pointer-authentication hints (`pacia1716`, `paciaz`,
/// `paciasp`, their B-key and `auti*` twins, `xpaclri`: HINT #7, #8, #10, #12, #14, #24-#31):
/// NOPs without pointer authentication; with it they sign, check or strip x30 or x17 using SP,
/// zero or x16, which a slot keeps, so they run out of line as Linux steps them.
pub fn is_pac_hint(word: u32) -> bool {
    insn::HINT.matches(word) && matches!((word >> 5) & 0x7f, 7 | 8 | 10 | 12 | 14 | 24..=31)
}

/// Whether `word` is a hint that is architecturally a NOP to the guest: `yield` and `csdb`
/// (a speculation barrier; the exit to the host is a stronger one).
fn is_plain_hint(word: u32) -> bool {
    insn::YIELD.matches(word) || insn::CSDB.matches(word)
}

/// Whether `word` is `casp`/`caspa`/`caspl`/`caspal` (a single atomic instruction that shares
/// its encoding group with the exclusives but is not watched by the exclusive monitor).
pub fn is_compare_and_swap_pair(word: u32) -> bool {
    insn::CASP.matches(word)
}

/// Whether `word` is a load/store exclusive (`ldxr`, `stxr`, `ldaxp`, ...), not `casp`.
fn is_exclusive(word: u32) -> bool {
    insn::EXCLUSIVE_GROUP.matches(word) && word & (1 << 23) == 0 && !is_compare_and_swap_pair(word)
}

/// The emulation of `word` at `pc`, if it is one of the emulated instructions (on a CPU
/// without pointer authentication: see [`is_pac_hint`]).
pub fn classify(word: u32, pc: u64) -> Option<Emulation> {
    let next = pc.wrapping_add(4);
    let w = u64::from(word);
    let rd = (word & 0x1f) as u8;
    let rn = ((word >> 5) & 0x1f) as u8;
    // Hints: nop, and the BTI landing pads (bti, bti c, bti j, bti jc).
    if insn::NOP.matches(word) || insn::BTI.matches(word) {
        return Some(Emulation::Nop { next });
    }
    // The pointer-authentication hints on the return address: NOPs to a CPU without pointer
    // authentication, which hvprobe's VMM gives its guests (it never asks KVM for
    // KVM_ARM_VCPU_PTRAUTH_*). The decoder sends them out of line on a CPU that has it.
    if is_pac_hint(word) || is_plain_hint(word) {
        return Some(Emulation::Nop { next });
    }
    // mrs Xt, daif (op0 3, op1 3, CRn 4, CRm 2, op2 1).
    if insn::MRS_DAIF.matches(word) {
        return Some(Emulation::ReadDaif { rt: rd, next });
    }
    // mov Xd, Xm = orr Xd, xzr, Xm (no shift); the 32-bit form too.
    if insn::MOV_REGISTER.matches(word) {
        return Some(Emulation::MovRegister {
            rd,
            rm: ((word >> 16) & 0x1f) as u8,
            wide: word >> 31 == 1,
            next,
        });
    }
    // add/sub (immediate), not setting flags: sf op 0 100010 sh imm12 Rn Rd.
    if insn::ADD_SUB_IMMEDIATE.matches(word) {
        let shift = if word & (1 << 22) != 0 { 12 } else { 0 };
        let imm = (((word >> 10) & 0xfff) as i64) << shift;
        return Some(Emulation::AddImmediate {
            rd,
            rn,
            imm: if word & (1 << 30) != 0 { -imm } else { imm },
            wide: word >> 31 == 1,
            next,
        });
    }
    // stp (64-bit, pre-index): 10 101 0 011 0 imm7 Rt2 Rn Rt.
    if insn::STP_PRE_INDEX.matches(word) {
        return Some(Emulation::StorePairPreIndex {
            rt: rd,
            rt2: ((word >> 10) & 0x1f) as u8,
            rn,
            offset: insn::sign_extend((w >> 15) & 0x7f, 7) * 8,
            next,
        });
    }
    // b / bl imm26.
    if insn::B_BL.matches(word) {
        let target = pc.wrapping_add((insn::sign_extend(w & 0x03ff_ffff, 26) * 4) as u64);
        return Some(if word >> 31 == 1 {
            Emulation::BranchLink { target, ret: next }
        } else {
            Emulation::Branch { target }
        });
    }
    // b.cond: 0101010 0 imm19 0 cond.
    if insn::B_COND.matches(word) {
        return Some(Emulation::BranchConditional {
            cond: (word & 0xf) as u8,
            target: pc.wrapping_add((insn::sign_extend((w >> 5) & 0x7_ffff, 19) * 4) as u64),
            next,
        });
    }
    // cbz/cbnz: sf 011010 op imm19 Rt.
    if insn::CBZ_CBNZ.matches(word) {
        return Some(Emulation::CompareBranch {
            rt: rd,
            wide: word >> 31 == 1,
            nonzero: word & (1 << 24) != 0,
            target: pc.wrapping_add((insn::sign_extend((w >> 5) & 0x7_ffff, 19) * 4) as u64),
            next,
        });
    }
    // tbz/tbnz: b5 011011 op b40 imm14 Rt.
    if insn::TBZ_TBNZ.matches(word) {
        return Some(Emulation::TestBranch {
            rt: rd,
            bit: (((word >> 31) << 5) | ((word >> 19) & 0x1f)) as u8,
            set: word & (1 << 24) != 0,
            target: pc.wrapping_add((insn::sign_extend((w >> 5) & 0x3fff, 14) * 4) as u64),
            next,
        });
    }
    // br / blr / ret (no pointer authentication): 1101011 0 0 op 11111 000000 Rn 00000.
    if insn::BR.matches(word) {
        return Some(Emulation::BranchRegister {
            rn,
            link: false,
            // BTYPE 01 for br through x16/x17, 11 otherwise.
            btype: if rn == 16 || rn == 17 { 1 } else { 3 },
            ret: next,
        });
    }
    if insn::BLR.matches(word) {
        return Some(Emulation::BranchRegister {
            rn,
            link: true,
            btype: 2,
            ret: next,
        });
    }
    if insn::RET.matches(word) {
        return Some(Emulation::BranchRegister {
            rn,
            link: false,
            btype: 0,
            ret: next,
        });
    }
    // ldr (literal) to a general register, ldrsw (literal), prfm (literal): opc 011 0 00
    // imm19 Rt.
    if insn::LDR_LITERAL.matches(word) {
        let address = pc.wrapping_add((insn::sign_extend((w >> 5) & 0x7_ffff, 19) * 4) as u64);
        return match word >> 30 {
            0 => Some(Emulation::LoadLiteral {
                rt: rd,
                address,
                size: 4,
                signed: false,
                next,
            }),
            1 => Some(Emulation::LoadLiteral {
                rt: rd,
                address,
                size: 8,
                signed: false,
                next,
            }),
            2 => Some(Emulation::LoadLiteral {
                rt: rd,
                address,
                size: 4,
                signed: true,
                next,
            }),
            // prfm: a hint.
            _ => Some(Emulation::Nop { next }),
        };
    }
    // adr / adrp: op immlo 10000 immhi Rd.
    if insn::ADR_ADRP.matches(word) {
        let imm = insn::sign_extend(((w >> 5) & 0x7_ffff) << 2 | ((w >> 29) & 3), 21);
        let value = if word >> 31 == 1 {
            (pc & !0xfff).wrapping_add((imm << 12) as u64)
        } else {
            pc.wrapping_add(imm as u64)
        };
        return Some(Emulation::SetRegister { rd, value, next });
    }
    None
}

/// Whether `word`, which the host does not emulate, may run out of line (a copy at another
/// address, followed by the slot's BRK), or why not. The classes follow the Arm ARM's top-level
/// encoding table and Linux's arm64 kprobes (`decode-insn.c`): every PC-relative instruction
/// is emulated before this is asked; what changes the exception level, the PSTATE or system
/// state, what waits, and what the exclusive monitor watches is refused.
pub fn out_of_line(word: u32) -> Result<(), &'static str> {
    let op0 = (word >> 25) & 0xf;
    match op0 {
        // Data processing, immediate (the PC-relative adr/adrp are emulated).
        0b1000 | 0b1001 => Ok(()),
        // Branches, exception generation, system.
        0b1010 | 0b1011 => {
            if insn::EXCEPTION.matches(word) {
                return Err("it generates an exception (svc, hvc, smc, brk, hlt)");
            }
            if insn::BRANCH_REGISTER.matches(word) {
                return Err(
                    "it is a branch through a register with pointer authentication, or an exception return",
                );
            }
            // The PAC hints run out of line where the CPU authenticates (they depend on x30
            // and SP only); wfe, wfi and the rest of the hints that are not emulated do not.
            if is_pac_hint(word) {
                return Ok(());
            }
            if insn::HINT.matches(word) {
                return Err("it is a hint that waits or changes execution state (wfe, wfi, ...)");
            }
            // Barriers (dsb, dmb, isb, sb, clrex): clrex touches the exclusive monitor.
            if insn::BARRIER.matches(word) {
                return if (word >> 5) & 7 == 2 {
                    Err("clrex clears the exclusive monitor")
                } else {
                    Ok(())
                };
            }
            // mrs: a read of a system register (`mrs daif`, the one whose value a slot
            // changes, is emulated).
            if insn::MRS.matches(word) {
                return Ok(());
            }
            // sys: cache and TLB maintenance and address translation (dc, ic, tlbi, at), which
            // depend on their register operand only, as Linux steps them.
            if insn::SYS.matches(word) {
                return Ok(());
            }
            Err("it writes PSTATE or a system register (msr)")
        }
        // Loads and stores.
        0b0100 | 0b0110 | 0b1100 | 0b1110 => {
            // Load/store exclusive (o2 = 0 in the exclusive/ordered group): the monitor would
            // be lost between the slot's BRK exits. casp is one atomic instruction: it steps.
            if is_exclusive(word) {
                return Err("it is a load/store exclusive, watched by the exclusive monitor");
            }
            // ldr St|Dt|Qt, label: PC-relative, and its destination is an FP/SIMD register the
            // host does not emulate; a copy would load from beside the slot.
            if insn::LDR_LITERAL_SIMD.matches(word) {
                return Err(
                    "it is an FP/SIMD load of a PC-relative literal, which a slot would read from the wrong address",
                );
            }
            Ok(())
        }
        // Data processing, register; SIMD and floating point.
        0b0101 | 0b1101 | 0b0111 | 0b1111 => Ok(()),
        // udf #imm16: what the assembler pads between functions with.
        _ if insn::UDF.matches(word) => {
            Err("it is `udf`, permanently undefined (the padding between functions)")
        }
        _ => Err("its encoding is unallocated or SME/SVE, which the kernel does not run"),
    }
}

/// Most instructions looked back over for an open load-exclusive.
const EXCLUSIVE_LOOKBACK: usize = 32;

/// Whether `word` ends any exclusive-monitor window before the instruction after it: an
/// unconditional branch, call or return (what follows is reached from elsewhere; no LL/SC loop
/// holds one) or `wfe` (after `__cmpwait`'s load-exclusive, which only arms the monitor for
/// the wait: no store-exclusive follows it).
fn closes_exclusive_window(word: u32) -> bool {
    insn::B_BL.matches(word)
        || insn::BR_BLR.matches(word)
        || insn::RET.matches(word)
        || insn::WFE.matches(word)
}

/// If the instruction after `preceding` (the code before it, from a function start) lies inside
/// an exclusive-monitor window (a load-exclusive before it with no store-exclusive, `clrex`,
/// unconditional branch, call, return or `wfe` in between), how many bytes back that
/// load-exclusive is.
pub fn exclusive_window(preceding: &[u8]) -> Option<usize> {
    let words = preceding.len() / 4;
    for back in 1..=words.min(EXCLUSIVE_LOOKBACK) {
        let at = (words - back) * 4;
        let w = u32::from_le_bytes(preceding[at..at + 4].try_into().ok()?);
        // clrex closes the window.
        if insn::CLREX.matches(w) || closes_exclusive_window(w) {
            return None;
        }
        // The load/store exclusive group with o2 = 0 (casp aside): L (bit 22) tells load from
        // store.
        if is_exclusive(w) {
            return if w & (1 << 22) != 0 {
                Some(back * 4)
            } else {
                None
            };
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::Emulation;
    use super::*;

    const VA: u64 = 0xffff_8000_0801_0000;

    #[test]
    fn words_decode_and_classify() {
        let d = Decoder::new(CpuFeatures::WITHOUT_PAC).unwrap();
        let nop = d.decode(&NOP.to_le_bytes(), VA).unwrap();
        assert_eq!(nop.text, "nop");
        assert_eq!(
            d.plan(&nop).unwrap(),
            StepPlan::Emulate(Emulation::Nop { next: VA + 4 })
        );
        // bti c
        let bti = d.decode(&0xd503_245fu32.to_le_bytes(), VA).unwrap();
        assert!(matches!(d.plan(&bti), Ok(StepPlan::Emulate(_))));
        // stp x29, x30, [sp, #-16]! is emulated; ldr x0, [x1] runs out of line; ldxr is
        // refused, named.
        let stp = d.decode(&0xa9bf_7bfdu32.to_le_bytes(), VA).unwrap();
        assert_eq!(stp.text, "stp x29, x30, [sp, #-0x10]!");
        assert!(matches!(d.plan(&stp), Ok(StepPlan::Emulate(_))));
        let ldr = d.decode(&0xf940_0020u32.to_le_bytes(), VA).unwrap();
        assert!(matches!(d.plan(&ldr), Ok(StepPlan::StepOutOfLine(_))));
        let ldxr = d.decode(&0xc85f_7c20u32.to_le_bytes(), VA).unwrap();
        let err = d.plan(&ldxr).unwrap_err();
        assert!(err.to_string().contains("`ldxr x0, [x1]`"), "{err}");
        assert!(err.to_string().contains("exclusive monitor"), "{err}");
        assert!(d.decode(&[0x1f, 0x20], VA).is_err());
    }

    #[test]
    fn boundaries_are_multiples_of_four() {
        let d = Decoder::new(CpuFeatures::WITHOUT_PAC).unwrap();
        let code: Vec<u8> = [NOP, 0xa9bf_7bfd]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        d.check_boundary(&code, VA, 4, GuestBreakpoints::Unknown)
            .unwrap();
        let err = d
            .check_boundary(&code, VA, 6, GuestBreakpoints::Unknown)
            .unwrap_err();
        assert!(matches!(
            err,
            DecodeError::NotOnBoundary {
                insn_start: 4,
                len: 4,
                ..
            }
        ));
    }

    #[test]
    fn pac_hints_are_nops_only_where_the_cpu_does_not_authenticate() {
        let paciasp = 0xd503_233fu32;
        let without = Decoder::new(CpuFeatures::WITHOUT_PAC).unwrap();
        let insn = without.decode(&paciasp.to_le_bytes(), VA).unwrap();
        assert_eq!(insn.text, "paciasp");
        assert_eq!(
            without.plan(&insn).unwrap(),
            StepPlan::Emulate(Emulation::Nop { next: VA + 4 })
        );
        // A CPU nobody described may authenticate: the hint runs out of line, as every PAC
        // hint does (xpaclri, autibsp), while wfi stays refused.
        let with = Decoder::new(CpuFeatures::default()).unwrap();
        for word in [paciasp, 0xd503_20ff, 0xd503_23ff] {
            let insn = with.decode(&word.to_le_bytes(), VA).unwrap();
            assert_eq!(
                with.plan(&insn).unwrap(),
                StepPlan::StepOutOfLine(OutOfLine { word }),
                "{}",
                insn.text
            );
        }
        let wfi = with.decode(&0xd503_207fu32.to_le_bytes(), VA).unwrap();
        assert!(with.plan(&wfi).is_err());
        // The ID registers: APA (ISAR1 bits 7:4), API (11:8), APA3 (ISAR2 bits 15:12).
        assert_eq!(
            CpuFeatures::from_id_registers(0, 0),
            CpuFeatures::WITHOUT_PAC
        );
        assert!(CpuFeatures::from_id_registers(1 << 4, 0).pointer_authentication);
        assert!(CpuFeatures::from_id_registers(1 << 8, 0).pointer_authentication);
        assert!(CpuFeatures::from_id_registers(0, 1 << 12).pointer_authentication);
        // GPA/GPI (generic authentication) alone sign no return address.
        assert!(!CpuFeatures::from_id_registers(0xff << 24, 0).pointer_authentication);
    }
}
