//! x86_64 instruction decoding with capstone, and classification of the instruction under a
//! probe into a [`StepPlan`]: emulate it on the host, step a (possibly rewritten) copy out of
//! line, or refuse it with the reason, the way Linux kprobes sorts instructions.

use capstone::arch::x86::{ArchMode, X86Insn, X86OperandType, X86Reg};
use capstone::arch::{BuildsCapstone, DetailsArchInsn};
use capstone::{Capstone, InsnId, RegId};

use super::emulate::Emulation;
use super::regs::Gpr;
use super::{OutOfLine, RipDisplacement, StepPlan};
use crate::arch::{DecodeError, GuestBreakpoints, Refusal};

/// Number of legacy prefixes and REX bytes before the opcode of the instruction in `bytes`.
fn prefix_len(bytes: &[u8]) -> usize {
    let legacy = legacy_prefixes(bytes).len();
    legacy + usize::from(bytes.get(legacy).is_some_and(|b| b & 0xf0 == 0x40))
}

/// Length of a ModRM byte with its SIB and displacement (64-bit mode, which has no 16-bit
/// addressing), from the ModRM byte on.
fn modrm_len(b: &[u8]) -> Option<usize> {
    let modrm = *b.first()?;
    let (md, rm) = (modrm >> 6, modrm & 7);
    if md == 3 {
        return Some(1);
    }
    let mut n = 1;
    if rm == 4 {
        let sib = *b.get(1)?;
        n += 1;
        if md == 0 && sib & 7 == 5 {
            n += 4;
        }
    } else if md == 0 && rm == 5 {
        n += 4;
    }
    Some(
        n + match md {
            1 => 1,
            2 => 4,
            _ => 0,
        },
    )
}

/// The length of an instruction the disassembler (capstone 5) does not know but the kernel
/// uses, for the boundary walk only (such an instruction is never probed): the `0f 01` group
/// (`serialize`, `pvalidate`, `rmpadjust`, ...: ModRM, no immediate) and VEX opcode maps
/// `0f38` (no immediate) and `0f3a` (imm8), as AMX's `tilerelease`.
pub fn fallback_length(bytes: &[u8]) -> Option<usize> {
    let p = prefix_len(bytes);
    let rest = bytes.get(p..)?;
    let len = match rest {
        [0x0f, 0x01, modrm @ ..] => 2 + modrm_len(modrm)?,
        [0xc4, p1, _, _, modrm @ ..] if p == 0 => match p1 & 0x1f {
            2 => 4 + modrm_len(modrm)?,
            3 => 4 + modrm_len(modrm)? + 1,
            _ => return None,
        },
        _ => return None,
    };
    let len = p + len;
    (len <= 15 && len <= bytes.len()).then_some(len)
}

/// Whether execution never goes on from this instruction to the next byte (`ret`, `jmp`,
/// `int3`): an `int3` right after one is padding the compiler put there (straight-line
/// speculation, function alignment), not a breakpoint written over an instruction.
fn ends_flow(bytes: &[u8]) -> bool {
    let rest = &bytes[prefix_len(bytes).min(bytes.len())..];
    match rest {
        [0xc3, ..] | [0xc2, ..] | [0xe9, ..] | [0xeb, ..] | [0xcc, ..] => true,
        [0xff, modrm, ..] => matches!((modrm >> 3) & 7, 4 | 5),
        _ => false,
    }
}

/// What the classifier found an instruction to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstructionKind {
    /// Can be emulated on the host.
    Emulable(Emulation),
    /// Runs out of line; `untrappable` says why it cannot run in a trapped slot, if so.
    OutOfLine {
        /// Why the copy cannot be followed by the host's trap (it leaves the slot, or waits for
        /// an interrupt).
        untrappable: Option<&'static str>,
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
    /// A RIP- (or EIP-) relative memory operand.
    pub rip_disp: Option<RipDisplacement>,
    /// Offset of a relative branch's 32-bit displacement (`call`/`jmp rel32`).
    pub rel32_offset: Option<usize>,
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
    const INTERRUPT: &str = "raises a software interrupt";
    const BUG: &str = "is a trap the kernel uses for BUG()/WARN()";
    const IRET: &str = "returns from an interrupt (changes privilege and flags)";
    const PRIVILEGE: &str = "changes privilege level";
    const VIRT: &str = "is a virtualization instruction (VMX/SVM)";
    let table: &[(X86Insn, &str)] = &[
        (
            X86_INS_INT3,
            "an int3: padding the compiler left (never run), or a breakpoint the guest placed itself",
        ),
        (X86_INS_INT, INTERRUPT),
        (X86_INS_INTO, INTERRUPT),
        (X86_INS_INT1, "raises a debug exception"),
        (X86_INS_UD0, BUG),
        (X86_INS_UD1, BUG),
        (X86_INS_UD2, BUG),
        (X86_INS_IRET, IRET),
        (X86_INS_IRETD, IRET),
        (X86_INS_IRETQ, IRET),
        (X86_INS_SYSCALL, PRIVILEGE),
        (X86_INS_SYSRET, PRIVILEGE),
        (X86_INS_SYSRETQ, PRIVILEGE),
        (X86_INS_SYSENTER, PRIVILEGE),
        (X86_INS_SYSEXIT, PRIVILEGE),
        (X86_INS_PUSHF, "is a 16-bit pushf, which is not emulated"),
        (X86_INS_POPF, "is a 16-bit popf, which is not emulated"),
        (
            X86_INS_POPFD,
            "is a 32-bit popf, which does not exist in 64-bit mode",
        ),
        (X86_INS_XBEGIN, "has a RIP-relative abort target"),
        (X86_INS_LCALL, "is a far call"),
        (X86_INS_LJMP, "is a far jump"),
        (X86_INS_RETF, "is a far return"),
        (X86_INS_RETFQ, "is a far return"),
        (X86_INS_RSM, "leaves system management mode"),
        (X86_INS_VMCALL, VIRT),
        (X86_INS_VMMCALL, VIRT),
        (X86_INS_VMLAUNCH, VIRT),
        (X86_INS_VMRESUME, VIRT),
        (X86_INS_VMXOFF, VIRT),
        (X86_INS_VMXON, VIRT),
        (X86_INS_VMFUNC, VIRT),
        (X86_INS_VMRUN, VIRT),
        (X86_INS_VMLOAD, VIRT),
        (X86_INS_VMSAVE, VIRT),
        (X86_INS_STGI, VIRT),
        (X86_INS_CLGI, VIRT),
        (X86_INS_SKINIT, VIRT),
        (X86_INS_INVLPGA, VIRT),
        (X86_INS_ENCLS, "is an SGX instruction"),
        (X86_INS_ENCLU, "is an SGX instruction"),
    ];
    table
        .iter()
        .find(|(i, _)| insn(*i) == id)
        .map(|(_, why)| *why)
}

/// The legacy prefixes at the start of `bytes`.
pub(super) fn legacy_prefixes(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .iter()
        .take_while(|b| {
            matches!(
                b,
                0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x66 | 0x67
            )
        })
        .count();
    &bytes[..n]
}

/// What an instruction is, as far as classification cares: its mnemonic class with the
/// operands that matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `nop`, `endbr64`.
    Nop,
    /// `push`, with its register when the operand is one.
    Push(Option<Gpr>),
    /// `mov`, with (destination, source) when both are 64-bit registers.
    Mov(Option<(Gpr, Gpr)>),
    /// `sub`, with the immediate when it is `sub $imm, %rsp`.
    Sub(Option<u64>),
    /// `pushfq`.
    Pushf,
    /// `popfq`.
    Popf,
    /// `cli`.
    Cli,
    /// `sti`.
    Sti,
    /// `loop`, `loope` (`zf` true), `loopne` (false).
    Loop {
        /// The ZF condition, if any.
        zf: Option<bool>,
    },
    /// `jrcxz`, `jecxz`.
    Jrcxz {
        /// Tests ECX instead of RCX.
        ecx: bool,
    },
    /// `ret [imm16]`.
    Ret {
        /// Bytes popped besides the return address.
        pop: u64,
    },
    /// `jmp`, with its register when the target is one.
    Jmp(Option<Gpr>),
    /// `call`, with its register when the target is one.
    Call(Option<Gpr>),
    /// `hlt`.
    Hlt,
    /// A conditional jump.
    Jcc {
        /// Its condition code.
        cond: u8,
    },
    /// Anything else.
    Other,
}

/// The facts of one decoded instruction that decide how it is probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Facts {
    /// It is one that must never run out of line ([`refusal_of`]).
    refusal: Option<&'static str>,
    /// It has a RIP-relative operand whose displacement could not be found.
    rip_relative_unknown: bool,
    /// An operand-size (0x66) prefix.
    operand_size_prefix: bool,
    /// An address-size (0x67) prefix.
    address_size_prefix: bool,
    /// `mov` or `pop` to SS.
    loads_ss: bool,
    /// In a jump, call, return or relative-branch group.
    is_branch: bool,
    /// In the relative-branch group.
    branch_relative: bool,
    /// The immediate target of a direct branch.
    target: Option<u64>,
    /// The address after it.
    next: u64,
    /// What it is.
    op: Op,
}

/// How an instruction with these facts is probed: the refusals first, then one `match` on
/// what it is.
fn classify(f: &Facts) -> InstructionKind {
    use InstructionKind::{Emulable, Refused};
    let stepped = InstructionKind::OutOfLine { untrappable: None };
    let leaves = InstructionKind::OutOfLine {
        untrappable: Some("may leave the slot (an indirect branch) before the host's trap"),
    };
    if let Some(why) = f.refusal {
        return Refused(why);
    }
    if f.rip_relative_unknown {
        return Refused("has a RIP-relative operand whose displacement cannot be found");
    }
    if f.is_branch && f.operand_size_prefix {
        return Refused("is a branch with an operand-size prefix (the target is truncated)");
    }
    if f.loads_ss {
        return Refused("loads SS, which blocks interrupts and debug traps for one instruction");
    }
    let next = f.next;
    match (f.op, f.target) {
        (Op::Nop, _) => Emulable(Emulation::Nop { next }),
        (Op::Push(Some(reg)), _) => Emulable(Emulation::Push { reg, next }),
        (Op::Mov(Some((dst, src))), _) => Emulable(Emulation::MovRegReg { dst, src, next }),
        (Op::Sub(Some(imm)), _) => Emulable(Emulation::SubRspImm { imm, next }),
        (Op::Pushf, _) => Emulable(Emulation::Pushf { next }),
        (Op::Popf, _) => Emulable(Emulation::Popf { next }),
        (Op::Cli, _) => Emulable(Emulation::Cli { next }),
        (Op::Sti, _) => Emulable(Emulation::Sti { next }),
        (Op::Loop { .. }, Some(_)) if f.address_size_prefix => {
            Refused("is a loop on ECX (address-size prefix), which is not emulated")
        }
        (Op::Loop { zf }, Some(target)) => Emulable(Emulation::Loop { zf, target, next }),
        (Op::Jrcxz { ecx }, Some(target)) => Emulable(Emulation::Jrcxz { ecx, target, next }),
        (Op::Ret { pop }, _) => Emulable(Emulation::Ret { pop }),
        (Op::Jmp(_), Some(target)) => Emulable(Emulation::Jmp { target }),
        (Op::Call(_), Some(target)) => Emulable(Emulation::Call { target, ret: next }),
        (Op::Jcc { cond }, Some(target)) if f.is_branch => {
            Emulable(Emulation::Jcc { cond, target, next })
        }
        (Op::Jcc { .. }, Some(_)) => {
            Refused("is a RIP-relative branch that is neither stepped nor emulated")
        }
        (Op::Call(Some(reg)), None) => Emulable(Emulation::CallIndirect { reg, ret: next }),
        (Op::Jmp(Some(reg)), None) => Emulable(Emulation::JmpIndirect { reg }),
        (Op::Jmp(None) | Op::Call(None), None) => leaves,
        (Op::Hlt, _) => InstructionKind::OutOfLine {
            untrappable: Some("waits for an interrupt, which a trapped step keeps off"),
        },
        _ if f.branch_relative => {
            Refused("is a RIP-relative branch that is neither stepped nor emulated")
        }
        _ if f.is_branch => leaves,
        _ => stepped,
    }
}

impl Decoder {
    /// A decoder in 64-bit mode with details on.
    pub fn new() -> Result<Decoder, DecodeError> {
        let cs = Capstone::new()
            .x86()
            .mode(ArchMode::Mode64)
            .detail(true)
            .build()
            .map_err(|e| DecodeError::Disassembler {
                arch: "x86_64",
                why: e.to_string(),
            })?;
        Ok(Decoder { cs })
    }

    /// Decodes the instruction at the start of `bytes`, located at `va`.
    pub fn decode(&self, bytes: &[u8], va: u64) -> Result<Instruction, DecodeError> {
        let insns = self
            .cs
            .disasm_count(bytes, va, 1)
            .map_err(|_| DecodeError::Invalid { arch: "x86_64", va })?;
        let i = insns
            .iter()
            .next()
            .ok_or(DecodeError::Invalid { arch: "x86_64", va })?;
        let detail = self
            .cs
            .insn_detail(i)
            .map_err(|e| DecodeError::Disassembler {
                arch: "x86_64",
                why: e.to_string(),
            })?;
        let arch = detail.arch_detail();
        let x86 = arch
            .x86()
            .ok_or(DecodeError::Invalid { arch: "x86_64", va })?;
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
        let mut rip_disp = None;
        let mut rip_based = false;
        let encoding = x86.encoding();
        let operands: Vec<X86OperandType> = x86.operands().map(|op| op.op_type).collect();
        for op in &operands {
            match op {
                X86OperandType::Reg(r) => touches.extend(gpr_of(*r)),
                X86OperandType::Mem(m) => {
                    let eip = m.base() == reg(X86Reg::X86_REG_EIP);
                    // RIP-relative addressing is ModRM mod=00 rm=101 with no SIB: the
                    // 32-bit displacement follows the ModRM byte (capstone's own displacement
                    // offset is missing for some encodings, e.g. pcmpestrm).
                    let modrm_at = usize::from(encoding.modrm_offset);
                    rip_based |= m.base() == reg(X86Reg::X86_REG_RIP) || eip;
                    if (m.base() == reg(X86Reg::X86_REG_RIP) || eip)
                        && modrm_at != 0
                        && i.bytes().get(modrm_at).is_some_and(|b| b & 0xc7 == 0x05)
                    {
                        rip_disp = Some(RipDisplacement {
                            offset: (modrm_at + 1) as u8,
                            eip,
                        });
                    }
                    touches.extend(gpr_of(m.base()));
                    touches.extend(gpr_of(m.index()));
                }
                _ => {}
            }
        }
        touches.sort_by_key(|g| g.number());
        touches.dedup();
        let modrm_offset = (encoding.modrm_offset != 0).then_some(encoding.modrm_offset as usize);
        let prefixes = legacy_prefixes(&bytes);
        let branch_target = || match operands.first() {
            Some(X86OperandType::Imm(t)) => Some(*t as u64),
            _ => None,
        };
        let is_branch = detail.groups().iter().any(|g| {
            [
                capstone::InsnGroupType::CS_GRP_JUMP,
                capstone::InsnGroupType::CS_GRP_CALL,
                capstone::InsnGroupType::CS_GRP_RET,
                capstone::InsnGroupType::CS_GRP_BRANCH_RELATIVE,
            ]
            .iter()
            .any(|k| g.0 == *k as u8)
        });
        let rel32_offset = encoding
            .imm
            .filter(|i| {
                i.size == 4
                    && branch_target().is_some()
                    && (id == insn(X86Insn::X86_INS_CALL) || id == insn(X86Insn::X86_INS_JMP))
            })
            .map(|i| usize::from(i.offset));
        let single_reg = || match operands.as_slice() {
            [X86OperandType::Reg(r)] => gpr64(*r),
            _ => None,
        };
        let next = va.wrapping_add(len);
        let is = |i: X86Insn| id == insn(i);
        // The facts classification needs, from capstone's view of the instruction.
        let op = if is(X86Insn::X86_INS_NOP) || is(X86Insn::X86_INS_ENDBR64) {
            Op::Nop
        } else if is(X86Insn::X86_INS_PUSH) {
            Op::Push(single_reg())
        } else if is(X86Insn::X86_INS_MOV) {
            Op::Mov(match operands.as_slice() {
                [X86OperandType::Reg(d), X86OperandType::Reg(s)] => gpr64(*d).zip(gpr64(*s)),
                _ => None,
            })
        } else if is(X86Insn::X86_INS_SUB) {
            Op::Sub(match operands.as_slice() {
                [X86OperandType::Reg(r), X86OperandType::Imm(v)]
                    if *r == reg(X86Reg::X86_REG_RSP) =>
                {
                    Some(*v as u64)
                }
                _ => None,
            })
        } else if is(X86Insn::X86_INS_PUSHFQ) {
            Op::Pushf
        } else if is(X86Insn::X86_INS_POPFQ) {
            Op::Popf
        } else if is(X86Insn::X86_INS_CLI) {
            Op::Cli
        } else if is(X86Insn::X86_INS_STI) {
            Op::Sti
        } else if is(X86Insn::X86_INS_LOOP) {
            Op::Loop { zf: None }
        } else if is(X86Insn::X86_INS_LOOPE) {
            Op::Loop { zf: Some(true) }
        } else if is(X86Insn::X86_INS_LOOPNE) {
            Op::Loop { zf: Some(false) }
        } else if is(X86Insn::X86_INS_JRCXZ) || is(X86Insn::X86_INS_JECXZ) {
            Op::Jrcxz {
                ecx: is(X86Insn::X86_INS_JECXZ),
            }
        } else if is(X86Insn::X86_INS_RET) {
            Op::Ret {
                pop: match operands.first() {
                    Some(X86OperandType::Imm(v)) => *v as u64 & 0xffff,
                    _ => 0,
                },
            }
        } else if is(X86Insn::X86_INS_JMP) {
            Op::Jmp(single_reg())
        } else if is(X86Insn::X86_INS_CALL) {
            Op::Call(single_reg())
        } else if is(X86Insn::X86_INS_HLT) {
            Op::Hlt
        } else if let Some(cond) = jcc_condition(x86.opcode()) {
            Op::Jcc { cond }
        } else {
            Op::Other
        };
        let facts = Facts {
            refusal: refusal_of(id),
            rip_relative_unknown: rip_based && rip_disp.is_none(),
            operand_size_prefix: prefixes.contains(&0x66),
            address_size_prefix: prefixes.contains(&0x67),
            loads_ss: operands
                .iter()
                .any(|op| matches!(op, X86OperandType::Reg(r) if *r == reg(X86Reg::X86_REG_SS)))
                && (is(X86Insn::X86_INS_MOV) || is(X86Insn::X86_INS_POP)),
            is_branch,
            branch_relative: detail
                .groups()
                .iter()
                .any(|g| g.0 == capstone::InsnGroupType::CS_GRP_BRANCH_RELATIVE as u8),
            target: branch_target(),
            next,
            op,
        };
        let kind = classify(&facts);
        Ok(Instruction {
            va,
            bytes,
            text,
            kind,
            touches,
            modrm_offset,
            rip_disp,
            rel32_offset,
        })
    }

    /// Decodes `code` (a function from its first byte, at `start_va`, with hvprobe's own
    /// breakpoints and the guest's known kprobes already replaced by the bytes they cover) up
    /// to `offset` and checks that `offset` starts an instruction, as Linux's `can_probe`
    /// does. `int3` says how an int3 met on the way is taken.
    pub fn check_boundary(
        &self,
        code: &[u8],
        start_va: u64,
        offset: u64,
        int3: GuestBreakpoints,
    ) -> Result<(), DecodeError> {
        let mut at = 0u64;
        let mut after_flow_end = false;
        while at < offset {
            let rest = code.get(at as usize..).unwrap_or(&[]);
            if rest.first() == Some(&0xcc) && !after_flow_end && int3 == GuestBreakpoints::Unknown {
                return Err(DecodeError::GuestBreakpoint { offset, at });
            }
            let (len, text) = match self.decode(rest, start_va + at) {
                Ok(i) => (i.len() as u64, i.text),
                Err(_) => match fallback_length(rest) {
                    Some(len) => (len as u64, format!("{:02x?}", &rest[..len])),
                    None => {
                        return Err(DecodeError::PastCode {
                            offset,
                            decoded: at,
                            bytes: rest
                                .iter()
                                .take(8)
                                .map(|b| format!("{b:02x}"))
                                .collect::<Vec<_>>()
                                .join(" "),
                        });
                    }
                },
            };
            if at + len > offset {
                return Err(DecodeError::NotOnBoundary {
                    offset,
                    insn_start: at,
                    len: len as usize,
                    text,
                });
            }
            after_flow_end = ends_flow(&rest[..len as usize]);
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
            InstructionKind::OutOfLine { untrappable } => Ok(StepPlan::StepOutOfLine(OutOfLine {
                bytes: i.bytes.clone(),
                len: i.len() as u8,
                rip_disp: i.rip_disp,
                untrappable: *untrappable,
            })),
        }
    }

    /// The real instruction as an out-of-line copy, for an emulated instruction whose stack
    /// access failed: run by the guest itself in a boosted slot, it takes its own fault there.
    /// `None` where the copy cannot be relocated (short relative branches).
    pub fn fallback_copy(&self, i: &Instruction) -> Option<OutOfLine> {
        let rip_disp = match (i.rip_disp, i.rel32_offset) {
            (Some(d), _) => Some(d),
            (None, Some(offset)) => Some(RipDisplacement {
                offset: offset as u8,
                eip: false,
            }),
            (None, None) if i.kind_is_relative_branch() => return None,
            (None, None) => None,
        };
        Some(OutOfLine {
            bytes: i.bytes.clone(),
            len: i.len() as u8,
            rip_disp,
            untrappable: Some("is the fallback of an emulated instruction"),
        })
    }
}

impl Instruction {
    /// A relative branch (`jcc`, `loop`, `jrcxz`, `jmp`/`call` with an 8-bit displacement):
    /// its copy cannot be relocated.
    fn kind_is_relative_branch(&self) -> bool {
        matches!(
            self.kind,
            InstructionKind::Emulable(
                Emulation::Jcc { .. }
                    | Emulation::Loop { .. }
                    | Emulation::Jrcxz { .. }
                    | Emulation::Jmp { .. }
                    | Emulation::Call { .. }
            )
        ) && self.rel32_offset.is_none()
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

    fn out_of_line(bytes: &[u8]) -> OutOfLine {
        match plan(bytes).unwrap() {
            StepPlan::StepOutOfLine(o) => o,
            p => panic!("{bytes:x?} is not out of line: {p:?}"),
        }
    }

    /// The effective address of a copy's RIP-relative operand when it runs at `at`.
    fn target_of(copy: &[u8], disp_at: usize, at: u64, eip: bool) -> u64 {
        let disp = i32::from_le_bytes(copy[disp_at..disp_at + 4].try_into().unwrap());
        let ea = at
            .wrapping_add(copy.len() as u64)
            .wrapping_add(disp as i64 as u64);
        if eip { ea & 0xffff_ffff } else { ea }
    }

    #[test]
    fn rip_relative_operands_are_retargeted_for_the_slot() {
        let slot = crate::arch::x86_64::xol::XOL_VA_BASE + 0x40;
        for (bytes, text) in [
            // mov 0x1234(%rip),%rax
            (&[0x48, 0x8b, 0x05, 0x34, 0x12, 0x00, 0x00][..], "mov"),
            // lea -0x10(%rip),%r8
            (&[0x4c, 0x8d, 0x05, 0xf0, 0xff, 0xff, 0xff][..], "lea"),
            // cmpl $0x0,0x100(%rip): an immediate after the displacement
            (&[0x83, 0x3d, 0x00, 0x01, 0x00, 0x00, 0x00][..], "cmp"),
            // pcmpestrm $0x0,0x10(%rip),%xmm1: implicit rax/rdx/rcx, no scratch needed
            (
                &[0x66, 0x0f, 0x3a, 0x60, 0x0d, 0x10, 0x00, 0x00, 0x00, 0x00][..],
                "pcmpestrm",
            ),
            // pop 0x10(%rip) (8f /0 is not XOP)
            (&[0x8f, 0x05, 0x10, 0x00, 0x00, 0x00][..], "pop"),
            // vmovdqu 0x20(%rip),%ymm0 (VEX)
            (
                &[0xc5, 0xfe, 0x6f, 0x05, 0x20, 0x00, 0x00, 0x00][..],
                "vmovdqu",
            ),
        ] {
            let i = decode(bytes);
            assert!(i.text.starts_with(text), "{}", i.text);
            let o = out_of_line(bytes);
            let d = o
                .rip_disp
                .unwrap_or_else(|| panic!("{} not rip-relative", i.text));
            assert!(!d.eip);
            // From an address whose targets do not fit a sign-extended disp32 (below the
            // kernel image, within 2 GiB of the slot): the displacement is re-targeted.
            let near: u64 = 0xffff_ffff_7000_0000;
            let copy = o.relocate(near, slot).unwrap();
            assert_eq!(copy.len(), bytes.len());
            assert_eq!(o.copy_len(near), bytes.len() as u64);
            let at = usize::from(d.offset);
            assert_eq!(
                target_of(&copy, at, slot, false),
                target_of(bytes, at, near, false),
                "{}",
                i.text
            );
            // Only the displacement changed.
            assert_eq!(copy[..at], bytes[..at]);
            assert_eq!(copy[at + 4..], bytes[at + 4..]);
            assert_eq!(p_name(bytes), "xol-riprel");
            // From kernel text: the operand is made absolute (`[disp32]` through a SIB byte),
            // one byte longer, the same instruction otherwise; VEX forms keep re-targeting.
            let target = target_of(bytes, at, VA, false);
            let copy = o.relocate(VA, slot).unwrap();
            if bytes[0] == 0xc5 {
                assert_eq!(copy.len(), bytes.len());
                assert_eq!(target_of(&copy, at, slot, false), target);
                continue;
            }
            assert_eq!(copy.len(), bytes.len() + 1, "{}", i.text);
            assert_eq!(o.copy_len(VA), copy.len() as u64);
            let c = decode(&copy);
            assert_eq!(c.len(), copy.len(), "{}", c.text);
            assert!(c.rip_disp.is_none(), "{}", c.text);
            assert_eq!(c.text.split(' ').next(), i.text.split(' ').next());
            assert!(
                c.text.contains(&format!("[{target:#x}]")),
                "{} -> {} (target {target:#x})",
                i.text,
                c.text
            );
            assert_eq!(copy[at + 5..], bytes[at + 4..], "{}", i.text);
        }
        // gs:[rip+X] reaches a per-CPU offset (a small number, 2 GiB from every slot): only
        // the absolute form reaches it. mov %gs:0x7eed1aaa(%rip),%eax at 0xffffffff81a07055.
        let bytes = [0x65, 0x8b, 0x05, 0xaa, 0x1a, 0xed, 0x7e];
        let va = 0xffff_ffff_81a0_7055;
        let o = out_of_line(&bytes);
        let copy = o.relocate(va, slot).unwrap();
        let percpu = (va + 7).wrapping_add(0x7eed_1aaa);
        assert!(percpu < 0x100_0000, "{percpu:#x}: a small per-CPU offset");
        let c = decode(&copy);
        assert_eq!(c.text, format!("mov eax, dword ptr gs:[{percpu:#x}]"));
        // REX.X is cleared (SIB index 100 means "no index" only without it).
        let bytes = [0x4a, 0x8b, 0x05, 0x10, 0x00, 0x00, 0x00];
        let copy = out_of_line(&bytes).relocate(VA, slot).unwrap();
        assert_eq!(copy[0], 0x48);
        assert_eq!(
            decode(&copy).text,
            format!("mov rax, qword ptr [{:#x}]", VA + 0x17)
        );
        // addr32: mov 0x10(%eip),%eax is EIP-relative, retargeted modulo 2^32.
        let bytes = [0x67, 0x8b, 0x05, 0x10, 0x00, 0x00, 0x00];
        let o = out_of_line(&bytes);
        let d = o.rip_disp.expect("eip-relative");
        assert!(d.eip);
        let copy = o.relocate(VA, slot).unwrap();
        assert_eq!(
            target_of(&copy, 3, slot, true),
            target_of(&bytes, 3, VA, true)
        );
        // A target beyond +-2 GiB of the slot cannot be relocated.
        assert!(
            out_of_line(&[0x48, 0x8b, 0x05, 0x34, 0x12, 0x00, 0x00])
                .relocate(0xffff_8880_0000_0000, slot)
                .is_none()
        );
    }

    fn p_name(bytes: &[u8]) -> &'static str {
        plan(bytes).unwrap().name()
    }

    #[test]
    fn branches_and_flag_instructions_are_emulated_and_indirect_memory_branches_step() {
        let emulated: &[(&[u8], Emulation)] = &[
            (
                &[0xff, 0xd0],
                Emulation::CallIndirect {
                    reg: Gpr::Rax,
                    ret: VA + 2,
                },
            ),
            (
                &[0x41, 0xff, 0xe3],
                Emulation::JmpIndirect { reg: Gpr::R11 },
            ),
            (&[0xc3], Emulation::Ret { pop: 0 }),
            (&[0xc2, 0x08, 0x00], Emulation::Ret { pop: 8 }),
            (&[0x9c], Emulation::Pushf { next: VA + 1 }),
            (&[0x9d], Emulation::Popf { next: VA + 1 }),
            (&[0xfa], Emulation::Cli { next: VA + 1 }),
            (&[0xfb], Emulation::Sti { next: VA + 1 }),
            (
                &[0xe2, 0xfe],
                Emulation::Loop {
                    zf: None,
                    target: VA,
                    next: VA + 2,
                },
            ),
            (
                &[0xe1, 0x00],
                Emulation::Loop {
                    zf: Some(true),
                    target: VA + 2,
                    next: VA + 2,
                },
            ),
            (
                &[0xe0, 0x10],
                Emulation::Loop {
                    zf: Some(false),
                    target: VA + 0x12,
                    next: VA + 2,
                },
            ),
            (
                &[0xe3, 0x00],
                Emulation::Jrcxz {
                    ecx: false,
                    target: VA + 2,
                    next: VA + 2,
                },
            ),
            (
                &[0x67, 0xe3, 0x00],
                Emulation::Jrcxz {
                    ecx: true,
                    target: VA + 3,
                    next: VA + 3,
                },
            ),
        ];
        for (bytes, want) in emulated {
            assert_eq!(
                plan(bytes).unwrap(),
                StepPlan::Emulate(want.clone()),
                "{bytes:x?}"
            );
        }
        // Memory-indirect branches run boosted (the copy jumps where the original would) and
        // take no post handler.
        for bytes in [&[0xff, 0x10][..], &[0xff, 0x25, 0x10, 0x00, 0x00, 0x00][..]] {
            let o = out_of_line(bytes);
            assert!(o.untrappable.is_some(), "{bytes:x?}");
        }
        assert_eq!(p_name(&[0x48, 0x89, 0x07]), "xol"); // mov %rax,(%rdi)
        assert_eq!(p_name(&[0x31, 0xc0]), "xol"); // xor %eax,%eax
        assert!(out_of_line(&[0xf4]).untrappable.is_some(), "hlt");
        assert!(out_of_line(&[0x31, 0xc0]).untrappable.is_none());
    }

    #[test]
    fn an_emulated_stack_instruction_has_a_relocatable_fallback_copy() {
        let d = Decoder::new().unwrap();
        // call rel32: the copy's displacement is retargeted like a RIP-relative operand.
        let call = d.decode(&[0xe8, 0xfb, 0xff, 0xff, 0xff], VA).unwrap();
        let f = d.fallback_copy(&call).unwrap();
        let slot = crate::arch::x86_64::xol::XOL_VA_BASE;
        let copy = f.relocate(VA, slot).unwrap();
        assert_eq!(d.decode(&copy, slot).unwrap().text, format!("call {VA:#x}"));
        let push = d.decode(&[0x55], VA).unwrap();
        assert_eq!(d.fallback_copy(&push).unwrap().bytes, vec![0x55]);
        let jcc = d.decode(&[0x74, 0x05], VA).unwrap();
        assert!(d.fallback_copy(&jcc).is_none());
    }

    #[test]
    fn dangerous_instructions_are_refused_by_name() {
        for (bytes, name) in [
            (&[0xcc][..], "int3"),
            (&[0xcd, 0x80][..], "int"),
            (&[0x66, 0x9d][..], "popf"),
            (&[0x0f, 0x05][..], "syscall"),
            (&[0x48, 0xcf][..], "iretq"),
            (&[0x0f, 0x0b][..], "ud2"),
            (&[0x8e, 0xd0][..], "mov ss"),
            (&[0x0f, 0x01, 0xc2][..], "vmlaunch"),
            (&[0x0f, 0x01, 0xc3][..], "vmresume"),
            (&[0x0f, 0x01, 0xd8][..], "vmrun"),
            (&[0x66, 0xe9, 0x10, 0x00, 0x00, 0x00][..], "jmp"),
            (&[0x66, 0xc3][..], "ret"),
            (&[0x67, 0xe2, 0xfe][..], "loop"),
            (&[0xcb][..], "retf"),
        ] {
            let err = Decoder::new()
                .unwrap()
                .decode(bytes, VA)
                .map_err(|e| format!("{bytes:x?}: {e}"))
                .map(|i| Decoder::new().unwrap().plan(&i))
                .unwrap()
                .unwrap_err();
            assert!(err.to_string().contains(name), "{bytes:x?}: {err}");
            assert!(err.to_string().starts_with("refusing to probe"), "{err}");
        }
    }

    #[test]
    fn the_writer_of_a_trapped_store_is_the_instruction_ending_at_rip() {
        use crate::arch::InstructionDecoder;
        let d = <Decoder as InstructionDecoder<crate::arch::x86_64::X86_64>>::new(()).unwrap();
        // push %rbp; mov %rax,(%rdi); movb $0x0,0x1(%rdi); ret
        let code = [0x55, 0x48, 0x89, 0x07, 0xc6, 0x47, 0x01, 0x00, 0xc3];
        let (at, text) = d.instruction_ending_at(&code, VA, 4).unwrap();
        assert_eq!(at, VA + 1);
        assert!(text.starts_with("mov"), "{text}");
        assert_eq!(d.instruction_ending_at(&code, VA, 8).unwrap().0, VA + 4);
        // Not an instruction end, or past a breakpoint that hides the instruction under it.
        assert_eq!(d.instruction_ending_at(&code, VA, 3), None);
        let mut trapped = code;
        trapped[1] = 0xcc;
        assert_eq!(d.instruction_ending_at(&trapped, VA, 8), None);
    }

    #[test]
    fn boundaries_are_checked_from_the_function_start() {
        let d = Decoder::new().unwrap();
        // endbr64; push %rbp; mov %rsp,%rbp; ret
        let code = [0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0xc3];
        for ok in [0, 4, 5, 8] {
            d.check_boundary(&code, VA, ok, GuestBreakpoints::Unknown)
                .unwrap();
        }
        let err = d
            .check_boundary(&code, VA, 6, GuestBreakpoints::Unknown)
            .unwrap_err();
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
            d.check_boundary(&code, VA, 40, GuestBreakpoints::Unknown),
            Err(DecodeError::PastCode { .. })
        ));
        assert_eq!(decode(&code).len(), 4);
    }

    #[test]
    fn instructions_capstone_lacks_are_walked_over_by_length() {
        // serialize, pvalidate (f2 prefix), tilerelease (VEX 0f38), a 0f01 memory form with
        // SIB + disp32, and a VEX 0f3a form with its imm8.
        for (bytes, len) in [
            (&[0x0f, 0x01, 0xe8, 0xe9][..], 3),
            (&[0xf2, 0x0f, 0x01, 0xff][..], 4),
            (&[0xc4, 0xe2, 0x78, 0x49, 0xc0, 0x90][..], 5),
            (&[0x0f, 0x01, 0x84, 0x24, 1, 2, 3, 4, 0x90][..], 8),
            (&[0xc4, 0xe3, 0x79, 0x0f, 0xc1, 0x08][..], 6),
        ] {
            assert_eq!(fallback_length(bytes), Some(len), "{bytes:02x?}");
        }
        assert_eq!(fallback_length(&[0xea, 0xa7, 0x08]), None);
        assert_eq!(fallback_length(&[0x0f, 0x01]), None);
        // finish_task_switch: the walk goes on past a serialize to the pushf behind it.
        let d = Decoder::new().unwrap();
        let code = [
            0x0f, 0x01, 0xe8, 0xe9, 0x10, 0xfe, 0xff, 0xff, 0x8c, 0xd0, 0x50, 0x9c,
        ];
        d.check_boundary(&code, VA, 11, GuestBreakpoints::Unknown)
            .unwrap();
    }

    #[test]
    fn padding_int3_is_walked_over_and_a_guest_breakpoint_is_refused() {
        let d = Decoder::new().unwrap();
        // ret; int3; push %rbp; mov %rsp,%rbp; ret: SLS padding after the ret.
        let code = [0xc3, 0xcc, 0x55, 0x48, 0x89, 0xe5, 0xc3];
        d.check_boundary(&code, VA, 6, GuestBreakpoints::Unknown)
            .unwrap();
        // jmp rel8; int3; int3 (a run of padding); nop.
        let code = [0xeb, 0x02, 0xcc, 0xcc, 0x90, 0xc3];
        d.check_boundary(&code, VA, 5, GuestBreakpoints::Unknown)
            .unwrap();
        // jmp *%rax; int3; nop.
        let code = [0xff, 0xe0, 0xcc, 0x90, 0xc3];
        d.check_boundary(&code, VA, 4, GuestBreakpoints::Unknown)
            .unwrap();
        // push %rbp; int3 over `mov %rsp,%rbp` (48 89 e5): the guest's breakpoint.
        let code = [0x55, 0xcc, 0x89, 0xe5, 0xc3];
        let err = d
            .check_boundary(&code, VA, 4, GuestBreakpoints::Unknown)
            .unwrap_err();
        assert!(
            matches!(err, DecodeError::GuestBreakpoint { at: 1, offset: 4 }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("own breakpoint over an instruction"),
            "{err}"
        );
        // After a call that does not return (call __stack_chk_fail; int3): padding, which
        // only the guest's kprobe table can tell from a breakpoint.
        let code = [0xe8, 0, 0, 0, 0, 0xcc, 0x55, 0xc3];
        assert!(matches!(
            d.check_boundary(&code, VA, 7, GuestBreakpoints::Unknown),
            Err(DecodeError::GuestBreakpoint { at: 5, .. })
        ));
        d.check_boundary(&code, VA, 7, GuestBreakpoints::Known)
            .unwrap();
        // An int3 over the first instruction.
        let err = d
            .check_boundary(&[0xcc, 0x89, 0xe5, 0xc3], VA, 3, GuestBreakpoints::Unknown)
            .unwrap_err();
        assert!(
            matches!(err, DecodeError::GuestBreakpoint { at: 0, .. }),
            "{err}"
        );
        // Unknown bytes name themselves.
        let err = d
            .check_boundary(
                &[0x90, 0xea, 0xa7, 0x08, 0x00],
                VA,
                3,
                GuestBreakpoints::Known,
            )
            .unwrap_err();
        assert!(err.to_string().contains("+0x1 (ea a7 08 00)"), "{err}");
    }
}
