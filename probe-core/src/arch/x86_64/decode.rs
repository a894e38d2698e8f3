//! x86_64 instruction decoding with capstone, and classification of the instruction under a
//! probe into a [`StepPlan`]: emulate it on the host, step a (possibly rewritten) copy out of
//! line, or refuse it with the reason, the way Linux kprobes sorts instructions.

use capstone::arch::x86::{ArchMode, X86Insn, X86OperandType, X86Reg};
use capstone::arch::{BuildsCapstone, DetailsArchInsn};
use capstone::{Capstone, InsnId, RegId};

use super::emulate::Emulation;
use super::regs::Gpr;
use super::{OutOfLine, StepPlan};

/// Errors of decoding.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Capstone could not be set up.
    #[error("cannot initialise the x86_64 disassembler: {0}")]
    Capstone(String),
    /// The bytes at an address are not a valid instruction.
    #[error("no valid x86_64 instruction at {0:#x}")]
    Invalid(u64),
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
    /// The offset lies past the decodable code.
    #[error("offset {offset:#x} lies past the decodable code ({decoded:#x} bytes decoded)")]
    PastCode {
        /// The requested offset.
        offset: u64,
        /// How far decoding got.
        decoded: u64,
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

/// What the classifier found an instruction to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstructionKind {
    /// Can be emulated on the host.
    Emulable(Emulation),
    /// Runs out of line; `rip_relative` if it addresses memory relative to RIP, `call` if it is
    /// an indirect call.
    OutOfLine {
        /// Addresses memory relative to RIP.
        rip_relative: bool,
        /// An indirect call.
        call: bool,
    },
    /// Must not be probed.
    Refused(&'static str),
}

/// One decoded instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// Its guest virtual address.
    pub va: u64,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Mnemonic and operands, Intel syntax.
    pub text: String,
    /// Classification.
    pub kind: InstructionKind,
    /// Registers it reads or writes, explicitly or implicitly (64-bit ones only).
    pub touches: Vec<Gpr>,
    /// Offset of the ModRM byte, when the instruction has one.
    pub modrm_offset: Option<usize>,
}

impl Instruction {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: an instruction has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A capstone-backed x86_64 decoder.
pub struct Decoder {
    cs: Capstone,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder(x86_64)")
    }
}

fn insn(id: X86Insn) -> InsnId {
    InsnId(id as u32)
}

fn reg(id: X86Reg::Type) -> RegId {
    RegId(id as u16)
}

/// The 64-bit register a capstone register id names or is part of.
fn gpr_of(r: RegId) -> Option<Gpr> {
    use X86Reg::*;
    let table: [(&[X86Reg::Type], Gpr); 16] = [
        (
            &[X86_REG_RAX, X86_REG_EAX, X86_REG_AX, X86_REG_AL, X86_REG_AH],
            Gpr::Rax,
        ),
        (
            &[X86_REG_RCX, X86_REG_ECX, X86_REG_CX, X86_REG_CL, X86_REG_CH],
            Gpr::Rcx,
        ),
        (
            &[X86_REG_RDX, X86_REG_EDX, X86_REG_DX, X86_REG_DL, X86_REG_DH],
            Gpr::Rdx,
        ),
        (
            &[X86_REG_RBX, X86_REG_EBX, X86_REG_BX, X86_REG_BL, X86_REG_BH],
            Gpr::Rbx,
        ),
        (
            &[X86_REG_RSP, X86_REG_ESP, X86_REG_SP, X86_REG_SPL],
            Gpr::Rsp,
        ),
        (
            &[X86_REG_RBP, X86_REG_EBP, X86_REG_BP, X86_REG_BPL],
            Gpr::Rbp,
        ),
        (
            &[X86_REG_RSI, X86_REG_ESI, X86_REG_SI, X86_REG_SIL],
            Gpr::Rsi,
        ),
        (
            &[X86_REG_RDI, X86_REG_EDI, X86_REG_DI, X86_REG_DIL],
            Gpr::Rdi,
        ),
        (
            &[X86_REG_R8, X86_REG_R8D, X86_REG_R8W, X86_REG_R8B],
            Gpr::R8,
        ),
        (
            &[X86_REG_R9, X86_REG_R9D, X86_REG_R9W, X86_REG_R9B],
            Gpr::R9,
        ),
        (
            &[X86_REG_R10, X86_REG_R10D, X86_REG_R10W, X86_REG_R10B],
            Gpr::R10,
        ),
        (
            &[X86_REG_R11, X86_REG_R11D, X86_REG_R11W, X86_REG_R11B],
            Gpr::R11,
        ),
        (
            &[X86_REG_R12, X86_REG_R12D, X86_REG_R12W, X86_REG_R12B],
            Gpr::R12,
        ),
        (
            &[X86_REG_R13, X86_REG_R13D, X86_REG_R13W, X86_REG_R13B],
            Gpr::R13,
        ),
        (
            &[X86_REG_R14, X86_REG_R14D, X86_REG_R14W, X86_REG_R14B],
            Gpr::R14,
        ),
        (
            &[X86_REG_R15, X86_REG_R15D, X86_REG_R15W, X86_REG_R15B],
            Gpr::R15,
        ),
    ];
    table
        .iter()
        .find(|(names, _)| names.iter().any(|n| reg(*n) == r))
        .map(|(_, g)| *g)
}

/// 64-bit register ids, for operands that must be full-width.
fn gpr64(r: RegId) -> Option<Gpr> {
    use X86Reg::*;
    let full = [
        X86_REG_RAX,
        X86_REG_RCX,
        X86_REG_RDX,
        X86_REG_RBX,
        X86_REG_RSP,
        X86_REG_RBP,
        X86_REG_RSI,
        X86_REG_RDI,
        X86_REG_R8,
        X86_REG_R9,
        X86_REG_R10,
        X86_REG_R11,
        X86_REG_R12,
        X86_REG_R13,
        X86_REG_R14,
        X86_REG_R15,
    ];
    full.iter()
        .position(|x| reg(*x) == r)
        .and_then(|i| Gpr::from_number(i as u8))
}

/// Instructions that must never run out of line, with the reason (after Linux kprobes'
/// `can_probe` / `insn_is_*` checks).
fn refusal_of(id: InsnId) -> Option<&'static str> {
    use X86Insn::*;
    let table: &[(X86Insn, &str)] = &[
        (
            X86_INS_INT3,
            "a breakpoint the guest placed itself (text_poke, its own kprobes)",
        ),
        (X86_INS_INT, "raises a software interrupt"),
        (X86_INS_INTO, "raises a software interrupt"),
        (X86_INS_INT1, "raises a debug exception"),
        (X86_INS_UD0, "is a trap the kernel uses for BUG()/WARN()"),
        (X86_INS_UD1, "is a trap the kernel uses for BUG()/WARN()"),
        (X86_INS_UD2, "is a trap the kernel uses for BUG()/WARN()"),
        (
            X86_INS_IRET,
            "returns from an interrupt (changes privilege and flags)",
        ),
        (
            X86_INS_IRETD,
            "returns from an interrupt (changes privilege and flags)",
        ),
        (
            X86_INS_IRETQ,
            "returns from an interrupt (changes privilege and flags)",
        ),
        (X86_INS_SYSCALL, "changes privilege level"),
        (X86_INS_SYSRET, "changes privilege level"),
        (X86_INS_SYSRETQ, "changes privilege level"),
        (X86_INS_SYSENTER, "changes privilege level"),
        (X86_INS_SYSEXIT, "changes privilege level"),
        (
            X86_INS_POPF,
            "changes IF/TF, which single-stepping relies on",
        ),
        (
            X86_INS_POPFD,
            "changes IF/TF, which single-stepping relies on",
        ),
        (
            X86_INS_POPFQ,
            "changes IF/TF, which single-stepping relies on",
        ),
        (X86_INS_STI, "changes IF and opens an interrupt shadow"),
        (X86_INS_CLI, "changes IF"),
        (X86_INS_HLT, "halts the vCPU"),
        (
            X86_INS_LOOP,
            "is a RIP-relative loop that is neither stepped nor emulated",
        ),
        (
            X86_INS_LOOPE,
            "is a RIP-relative loop that is neither stepped nor emulated",
        ),
        (
            X86_INS_LOOPNE,
            "is a RIP-relative loop that is neither stepped nor emulated",
        ),
        (
            X86_INS_JCXZ,
            "is a RIP-relative branch that is neither stepped nor emulated",
        ),
        (
            X86_INS_JECXZ,
            "is a RIP-relative branch that is neither stepped nor emulated",
        ),
        (
            X86_INS_JRCXZ,
            "is a RIP-relative branch that is neither stepped nor emulated",
        ),
        (X86_INS_XBEGIN, "has a RIP-relative abort target"),
        (X86_INS_LCALL, "is a far call"),
        (X86_INS_LJMP, "is a far jump"),
        (X86_INS_RSM, "leaves system management mode"),
        (X86_INS_VMCALL, "is a hypercall"),
        (X86_INS_VMMCALL, "is a hypercall"),
    ];
    table
        .iter()
        .find(|(i, _)| insn(*i) == id)
        .map(|(_, why)| *why)
}

impl Decoder {
    /// A decoder in 64-bit mode with details on.
    pub fn new() -> Result<Decoder, DecodeError> {
        let cs = Capstone::new()
            .x86()
            .mode(ArchMode::Mode64)
            .detail(true)
            .build()
            .map_err(|e| DecodeError::Capstone(e.to_string()))?;
        Ok(Decoder { cs })
    }

    /// Decodes the instruction at the start of `bytes`, located at `va`.
    pub fn decode(&self, bytes: &[u8], va: u64) -> Result<Instruction, DecodeError> {
        let insns = self
            .cs
            .disasm_count(bytes, va, 1)
            .map_err(|_| DecodeError::Invalid(va))?;
        let i = insns.iter().next().ok_or(DecodeError::Invalid(va))?;
        let detail = self
            .cs
            .insn_detail(i)
            .map_err(|e| DecodeError::Capstone(e.to_string()))?;
        let arch = detail.arch_detail();
        let x86 = arch.x86().ok_or(DecodeError::Invalid(va))?;
        let text = match (i.mnemonic(), i.op_str()) {
            (Some(m), Some(o)) if !o.is_empty() => format!("{m} {o}"),
            (Some(m), _) => m.to_string(),
            _ => "?".to_string(),
        };
        let bytes = i.bytes().to_vec();
        let len = bytes.len() as u64;
        let id = i.id();
        let mut touches: Vec<Gpr> = detail
            .regs_read()
            .iter()
            .chain(detail.regs_write())
            .filter_map(|r| gpr_of(*r))
            .collect();
        let mut rip_relative = false;
        let operands: Vec<X86OperandType> = x86.operands().map(|op| op.op_type).collect();
        for op in &operands {
            match op {
                X86OperandType::Reg(r) => touches.extend(gpr_of(*r)),
                X86OperandType::Mem(m) => {
                    if m.base() == reg(X86Reg::X86_REG_RIP) {
                        rip_relative = true;
                    }
                    touches.extend(gpr_of(m.base()));
                    touches.extend(gpr_of(m.index()));
                }
                _ => {}
            }
        }
        touches.sort_by_key(|g| g.number());
        touches.dedup();
        let encoding = x86.encoding();
        let modrm_offset = (encoding.modrm_offset != 0).then_some(encoding.modrm_offset as usize);
        let branch_target = || match operands.first() {
            Some(X86OperandType::Imm(t)) => Some(*t as u64),
            _ => None,
        };
        let next = va.wrapping_add(len);
        let kind = if let Some(why) = refusal_of(id) {
            InstructionKind::Refused(why)
        } else if id == insn(X86Insn::X86_INS_NOP) || id == insn(X86Insn::X86_INS_ENDBR64) {
            InstructionKind::Emulable(Emulation::Nop { next })
        } else if id == insn(X86Insn::X86_INS_PUSH) {
            match operands.as_slice() {
                [X86OperandType::Reg(r)] if gpr64(*r).is_some() => {
                    InstructionKind::Emulable(Emulation::Push {
                        reg: gpr64(*r).unwrap_or(Gpr::Rax),
                        next,
                    })
                }
                _ => InstructionKind::OutOfLine {
                    rip_relative,
                    call: false,
                },
            }
        } else if id == insn(X86Insn::X86_INS_MOV) {
            match operands.as_slice() {
                [X86OperandType::Reg(d), X86OperandType::Reg(s)]
                    if gpr64(*d).is_some() && gpr64(*s).is_some() =>
                {
                    InstructionKind::Emulable(Emulation::MovRegReg {
                        dst: gpr64(*d).unwrap_or(Gpr::Rax),
                        src: gpr64(*s).unwrap_or(Gpr::Rax),
                        next,
                    })
                }
                _ => InstructionKind::OutOfLine {
                    rip_relative,
                    call: false,
                },
            }
        } else if id == insn(X86Insn::X86_INS_SUB)
            && matches!(operands.as_slice(), [X86OperandType::Reg(r), X86OperandType::Imm(_)] if *r == reg(X86Reg::X86_REG_RSP))
        {
            let imm = match operands[1] {
                X86OperandType::Imm(v) => v as u64,
                _ => 0,
            };
            InstructionKind::Emulable(Emulation::SubRspImm { imm, next })
        } else if id == insn(X86Insn::X86_INS_JMP) && branch_target().is_some() {
            InstructionKind::Emulable(Emulation::Jmp {
                target: branch_target().unwrap_or(next),
            })
        } else if id == insn(X86Insn::X86_INS_CALL) && branch_target().is_some() {
            InstructionKind::Emulable(Emulation::Call {
                target: branch_target().unwrap_or(next),
                ret: next,
            })
        } else if let (Some(cond), Some(target)) = (jcc_condition(x86.opcode()), branch_target()) {
            if detail
                .groups()
                .iter()
                .any(|g| g.0 == capstone::InsnGroupType::CS_GRP_JUMP as u8)
            {
                InstructionKind::Emulable(Emulation::Jcc { cond, target, next })
            } else {
                InstructionKind::OutOfLine {
                    rip_relative,
                    call: false,
                }
            }
        } else if id == insn(X86Insn::X86_INS_JMP) || id == insn(X86Insn::X86_INS_CALL) {
            InstructionKind::OutOfLine {
                rip_relative,
                call: id == insn(X86Insn::X86_INS_CALL),
            }
        } else if detail
            .groups()
            .iter()
            .any(|g| g.0 == capstone::InsnGroupType::CS_GRP_BRANCH_RELATIVE as u8)
        {
            InstructionKind::Refused(
                "is a RIP-relative branch that is neither stepped nor emulated",
            )
        } else {
            InstructionKind::OutOfLine {
                rip_relative,
                call: false,
            }
        };
        Ok(Instruction {
            va,
            bytes,
            text,
            kind,
            touches,
            modrm_offset,
        })
    }

    /// Decodes `code` (a function from its first byte, at `start_va`) up to `offset` and checks
    /// that `offset` starts an instruction.
    pub fn check_boundary(
        &self,
        code: &[u8],
        start_va: u64,
        offset: u64,
    ) -> Result<(), DecodeError> {
        let mut at = 0u64;
        while at < offset {
            let rest = code.get(at as usize..).unwrap_or(&[]);
            let i = self
                .decode(rest, start_va + at)
                .map_err(|_| DecodeError::PastCode {
                    offset,
                    decoded: at,
                })?;
            let len = i.len() as u64;
            if at + len > offset {
                return Err(DecodeError::NotOnBoundary {
                    offset,
                    insn_start: at,
                    len: i.len(),
                    text: i.text,
                });
            }
            at += len;
        }
        Ok(())
    }

    /// Decides how the instruction is executed after a probe hit.
    pub fn plan(&self, i: &Instruction) -> Result<StepPlan, Refusal> {
        let refuse = |reason| Refusal {
            va: i.va,
            text: i.text.clone(),
            reason,
        };
        match &i.kind {
            InstructionKind::Refused(why) => Err(refuse(why)),
            InstructionKind::Emulable(e) => Ok(StepPlan::Emulate(e.clone())),
            InstructionKind::OutOfLine { rip_relative, call } => {
                let (slot_bytes, scratch) = if *rip_relative {
                    let (bytes, scratch) = self.rewrite_rip_relative(i).map_err(refuse)?;
                    (bytes, Some(scratch))
                } else {
                    (i.bytes.clone(), None)
                };
                Ok(StepPlan::StepOutOfLine(OutOfLine {
                    slot_bytes,
                    len: i.len() as u8,
                    scratch,
                    fix_return_address: *call,
                }))
            }
        }
    }

    /// Rewrites a RIP-relative memory operand `disp32(%rip)` into `disp32(%scratch)`, choosing a
    /// scratch register the instruction does not touch (uprobes' approach). The host loads
    /// the scratch register with the address of the next original instruction, so the
    /// effective address is unchanged wherever the copy runs.
    fn rewrite_rip_relative(&self, i: &Instruction) -> Result<(Vec<u8>, Gpr), &'static str> {
        let modrm_at = i
            .modrm_offset
            .ok_or("is RIP-relative without a ModRM byte")?;
        let modrm = *i.bytes.get(modrm_at).ok_or("has a truncated encoding")?;
        if modrm & 0xc7 != 0x05 {
            return Err("has a RIP-relative form the rewriter does not know");
        }
        // Legacy prefixes, then an optional REX, then the opcode.
        let mut p = 0;
        while p < i.bytes.len()
            && matches!(
                i.bytes[p],
                0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x66 | 0x67
            )
        {
            p += 1;
        }
        let first = *i.bytes.get(p).ok_or("has a truncated encoding")?;
        if matches!(first, 0xc4 | 0xc5 | 0x62 | 0x8f) {
            return Err(
                "is a VEX/EVEX/XOP-encoded RIP-relative instruction, which is not rewritten",
            );
        }
        let scratch = [Gpr::Rax, Gpr::Rcx, Gpr::Rdx, Gpr::Rbx, Gpr::Rsi, Gpr::Rdi]
            .into_iter()
            .find(|g| !i.touches.contains(g))
            .ok_or("touches every scratch register candidate")?;
        let mut out = i.bytes.clone();
        if (0x40..=0x4f).contains(&first) {
            out[p] &= !0x01; // REX.B off: the base is one of the low eight registers
        }
        out[modrm_at] = 0x80 | (modrm & 0x38) | scratch.number();
        let check = self
            .decode(&out, i.va)
            .map_err(|_| "cannot be re-encoded with a scratch base register")?;
        if check.len() != i.len() || check.text.split(' ').next() != i.text.split(' ').next() {
            return Err("cannot be re-encoded with a scratch base register");
        }
        Ok((out, scratch))
    }
}

/// The condition code of a `jcc rel8` (0x70+cc) or `jcc rel32` (0x0f 0x80+cc).
fn jcc_condition(opcode: &[u8; 4]) -> Option<u8> {
    match opcode {
        [op, ..] if (0x70..=0x7f).contains(op) => Some(op & 0xf),
        [0x0f, op, ..] if (0x80..=0x8f).contains(op) => Some(op & 0xf),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VA: u64 = 0xffff_ffff_8100_0000;

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::new().unwrap().decode(bytes, VA).unwrap()
    }

    fn plan(bytes: &[u8]) -> Result<StepPlan, Refusal> {
        let d = Decoder::new().unwrap();
        d.plan(&d.decode(bytes, VA).unwrap())
    }

    #[test]
    fn simple_prologue_instructions_are_emulated() {
        let cases: &[(&[u8], Emulation)] = &[
            (&[0xf3, 0x0f, 0x1e, 0xfa], Emulation::Nop { next: VA + 4 }),
            (
                &[0x0f, 0x1f, 0x44, 0x00, 0x00],
                Emulation::Nop { next: VA + 5 },
            ),
            (&[0x66, 0x90], Emulation::Nop { next: VA + 2 }),
            (
                &[0x55],
                Emulation::Push {
                    reg: Gpr::Rbp,
                    next: VA + 1,
                },
            ),
            (
                &[0x41, 0x57],
                Emulation::Push {
                    reg: Gpr::R15,
                    next: VA + 2,
                },
            ),
            (
                &[0x48, 0x89, 0xe5],
                Emulation::MovRegReg {
                    dst: Gpr::Rbp,
                    src: Gpr::Rsp,
                    next: VA + 3,
                },
            ),
            (
                &[0x48, 0x83, 0xec, 0x10],
                Emulation::SubRspImm {
                    imm: 0x10,
                    next: VA + 4,
                },
            ),
            (&[0xeb, 0x10], Emulation::Jmp { target: VA + 0x12 }),
            (
                &[0xe9, 0x00, 0x01, 0x00, 0x00],
                Emulation::Jmp { target: VA + 0x105 },
            ),
            (
                &[0xe8, 0xfb, 0xff, 0xff, 0xff],
                Emulation::Call {
                    target: VA,
                    ret: VA + 5,
                },
            ),
            (
                &[0x74, 0x05],
                Emulation::Jcc {
                    cond: 4,
                    target: VA + 7,
                    next: VA + 2,
                },
            ),
            (
                &[0x0f, 0x85, 0x10, 0x00, 0x00, 0x00],
                Emulation::Jcc {
                    cond: 5,
                    target: VA + 0x16,
                    next: VA + 6,
                },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                plan(bytes).unwrap(),
                StepPlan::Emulate(want.clone()),
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn rip_relative_operands_are_rewritten_through_a_free_register() {
        // mov 0x1234(%rip),%rax: rax is the destination, so the scratch is rcx.
        let p = plan(&[0x48, 0x8b, 0x05, 0x34, 0x12, 0x00, 0x00]).unwrap();
        let StepPlan::StepOutOfLine(o) = p else {
            panic!("not out of line")
        };
        assert_eq!(o.scratch, Some(Gpr::Rcx));
        assert_eq!(o.slot_bytes, vec![0x48, 0x8b, 0x81, 0x34, 0x12, 0x00, 0x00]);
        let d = Decoder::new().unwrap();
        assert_eq!(
            d.decode(&o.slot_bytes, 0).unwrap().text,
            "mov rax, qword ptr [rcx + 0x1234]"
        );

        // lea -0x10(%rip),%r8 with REX.R: the REX byte keeps R, drops B.
        let p = plan(&[0x4c, 0x8d, 0x05, 0xf0, 0xff, 0xff, 0xff]).unwrap();
        let StepPlan::StepOutOfLine(o) = p else {
            panic!("not out of line")
        };
        assert_eq!(o.scratch, Some(Gpr::Rax));
        assert_eq!(
            d.decode(&o.slot_bytes, 0).unwrap().text,
            "lea r8, [rax - 0x10]"
        );

        // cmpl $0x0,0x100(%rip) with an immediate after the displacement.
        let p = plan(&[0x83, 0x3d, 0x00, 0x01, 0x00, 0x00, 0x00]).unwrap();
        let StepPlan::StepOutOfLine(o) = p else {
            panic!("not out of line")
        };
        assert_eq!(
            d.decode(&o.slot_bytes, 0).unwrap().text,
            "cmp dword ptr [rax + 0x100], 0"
        );
        assert_eq!(
            p_name(&[0x83, 0x3d, 0x00, 0x01, 0x00, 0x00, 0x00]),
            "xol-riprel"
        );
    }

    fn p_name(bytes: &[u8]) -> &'static str {
        plan(bytes).unwrap().name()
    }

    #[test]
    fn indirect_calls_fix_their_return_address_and_others_step_plainly() {
        let p = plan(&[0xff, 0xd0]).unwrap(); // call *%rax
        assert_eq!(p.name(), "xol-call");
        assert_eq!(p_name(&[0x48, 0x89, 0x07]), "xol"); // mov %rax,(%rdi)
        assert_eq!(p_name(&[0xc3]), "xol"); // ret
        assert_eq!(p_name(&[0x31, 0xc0]), "xol"); // xor %eax,%eax
    }

    #[test]
    fn dangerous_instructions_are_refused_by_name() {
        for (bytes, name) in [
            (&[0xcc][..], "int3"),
            (&[0xcd, 0x80][..], "int"),
            (&[0x9d][..], "popfq"),
            (&[0xfb][..], "sti"),
            (&[0xfa][..], "cli"),
            (&[0x0f, 0x05][..], "syscall"),
            (&[0x48, 0xcf][..], "iretq"),
            (&[0x0f, 0x0b][..], "ud2"),
            (&[0xe2, 0xfe][..], "loop"),
            (&[0xe3, 0x00][..], "jrcxz"),
        ] {
            let err = plan(bytes).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
            assert!(err.to_string().starts_with("refusing to probe"), "{err}");
        }
    }

    #[test]
    fn boundaries_are_checked_from_the_function_start() {
        let d = Decoder::new().unwrap();
        // endbr64; push %rbp; mov %rsp,%rbp; ret
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0xc3];
        for ok in [0, 4, 5, 8] {
            d.check_boundary(&code, VA, ok).unwrap();
        }
        let err = d.check_boundary(&code, VA, 6).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::NotOnBoundary {
                    insn_start: 5,
                    len: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("mov rbp, rsp"), "{err}");
        assert!(matches!(
            d.check_boundary(&code, VA, 40),
            Err(DecodeError::PastCode { .. })
        ));
        assert_eq!(decode(&code).len(), 4);
    }
}
