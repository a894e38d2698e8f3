//! aarch64 decoding and classification. Every instruction is one 32-bit word, so a boundary is
//! a multiple of four from the function start; capstone gives the text. Classification: the
//! instructions emulated on the host ([`super::classify`], every PC-relative one among them),
//! then what may run out of line ([`super::out_of_line`]), and the rest refused with the
//! instruction and the reason named.

use capstone::Capstone;
use capstone::arch::BuildsCapstone;
use capstone::arch::arm64::ArchMode;

use super::{Aarch64, CpuFeatures, OutOfLine};
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
