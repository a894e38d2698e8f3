//! The A64 encodings hvprobe tells apart, in one table (as Linux's `asm/insn.h`,
//! `__AARCH64_INSN_FUNCS`): each a mask and the value the masked word has. Classification
//! (`decode.rs`) and the exclusive-window check name these; nothing else spells a mask.

/// An encoding: `word & mask == value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoding {
    /// The bits that identify it.
    pub mask: u32,
    /// Their value.
    pub value: u32,
}

impl Encoding {
    const fn new(mask: u32, value: u32) -> Encoding {
        Encoding { mask, value }
    }

    /// Whether `word` has this encoding.
    pub const fn matches(self, word: u32) -> bool {
        word & self.mask == self.value
    }
}

/// `nop`.
pub const NOP: Encoding = Encoding::new(0xffff_ffff, 0xd503_201f);
/// `bti`, `bti c`, `bti j`, `bti jc`.
pub const BTI: Encoding = Encoding::new(0xffff_ff3f, 0xd503_241f);
/// Any `hint #imm` (CRm:op2 in bits 11:5).
pub const HINT: Encoding = Encoding::new(0xffff_f01f, 0xd503_201f);
/// `yield`.
pub const YIELD: Encoding = Encoding::new(0xffff_ffff, 0xd503_203f);
/// `wfe`.
pub const WFE: Encoding = Encoding::new(0xffff_ffff, 0xd503_205f);
/// `csdb`.
pub const CSDB: Encoding = Encoding::new(0xffff_ffff, 0xd503_229f);
/// The barriers and `clrex` (CRm in bits 11:8, op2 in 7:5).
pub const BARRIER: Encoding = Encoding::new(0xffff_f01f, 0xd503_301f);
/// `clrex #imm`.
pub const CLREX: Encoding = Encoding::new(0xffff_f0ff, 0xd503_305f);
/// `mrs Xt, daif` (op0 3, op1 3, CRn 4, CRm 2, op2 1); the low five bits are Rt.
pub const MRS_DAIF: Encoding = Encoding::new(0xffff_ffe0, 0xd53b_4220);
/// `mrs Xt, <sysreg>`.
pub const MRS: Encoding = Encoding::new(0xfff0_0000, 0xd530_0000);
/// `sys`: cache and TLB maintenance, address translation (`dc`, `ic`, `tlbi`, `at`).
pub const SYS: Encoding = Encoding::new(0xfff8_0000, 0xd508_0000);
/// `mov Xd, Xm` = `orr Xd, xzr, Xm` without shift, either width.
pub const MOV_REGISTER: Encoding = Encoding::new(0x7fe0_ffe0, 0x2a00_03e0);
/// `add`/`sub` (immediate) not setting flags: sf op 0 100010 sh imm12 Rn Rd.
pub const ADD_SUB_IMMEDIATE: Encoding = Encoding::new(0x3f80_0000, 0x1100_0000);
/// `stp Xt, Xt2, [Xn, #imm]!` (64-bit, pre-index).
pub const STP_PRE_INDEX: Encoding = Encoding::new(0xffc0_0000, 0xa980_0000);
/// `b`/`bl imm26`.
pub const B_BL: Encoding = Encoding::new(0x7c00_0000, 0x1400_0000);
/// `b.cond`.
pub const B_COND: Encoding = Encoding::new(0xff00_0010, 0x5400_0000);
/// `cbz`/`cbnz`.
pub const CBZ_CBNZ: Encoding = Encoding::new(0x7e00_0000, 0x3400_0000);
/// `tbz`/`tbnz`.
pub const TBZ_TBNZ: Encoding = Encoding::new(0x7e00_0000, 0x3600_0000);
/// `br Xn`.
pub const BR: Encoding = Encoding::new(0xffff_fc1f, 0xd61f_0000);
/// `blr Xn`.
pub const BLR: Encoding = Encoding::new(0xffff_fc1f, 0xd63f_0000);
/// `br` or `blr` (bit 21 apart).
pub const BR_BLR: Encoding = Encoding::new(0xff9f_fc1f, 0xd61f_0000);
/// `ret Xn`.
pub const RET: Encoding = Encoding::new(0xffff_fc1f, 0xd65f_0000);
/// `ldr`/`ldrsw`/`prfm` (literal) to a general register: opc 011 0 00 imm19 Rt.
pub const LDR_LITERAL: Encoding = Encoding::new(0x3f00_0000, 0x1800_0000);
/// `ldr St|Dt|Qt, label`: an FP/SIMD load of a literal.
pub const LDR_LITERAL_SIMD: Encoding = Encoding::new(0x3f00_0000, 0x1c00_0000);
/// `adr`/`adrp`.
pub const ADR_ADRP: Encoding = Encoding::new(0x1f00_0000, 0x1000_0000);
/// Exception generation: `svc`, `hvc`, `smc`, `brk`, `hlt`, `dcps`.
pub const EXCEPTION: Encoding = Encoding::new(0xff00_0000, 0xd400_0000);
/// Branches through a register with pointer authentication, and exception returns.
pub const BRANCH_REGISTER: Encoding = Encoding::new(0xfe00_0000, 0xd600_0000);
/// `casp`/`caspa`/`caspl`/`caspal`.
pub const CASP: Encoding = Encoding::new(0xbfa0_7c00, 0x0820_7c00);
/// The load/store exclusive and ordered group (`casp` and the ordered forms included).
pub const EXCLUSIVE_GROUP: Encoding = Encoding::new(0x3f00_0000, 0x0800_0000);
/// `udf #imm16`.
pub const UDF: Encoding = Encoding::new(0xffff_0000, 0);

/// `v`'s low `bits` bits, sign-extended.
pub fn sign_extend(v: u64, bits: u32) -> i64 {
    ((v << (64 - bits)) as i64) >> (64 - bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_what_the_assembler_emits() {
        // From the default guest's vmlinux, as objdump shows them.
        for (enc, word) in [
            (NOP, 0xd503_201f),
            (BTI, 0xd503_245f),
            (HINT, 0xd503_233f),
            (MRS_DAIF, 0xd53b_4233),
            (MRS, 0xd538_4100),
            (STP_PRE_INDEX, 0xa9bf_7bfd),
            (B_BL, 0x9400_3170),
            (RET, 0xd65f_03c0),
            (BR_BLR, 0xd63f_0020),
            (CASP, 0x4820_7c82),
            (UDF, 0x0000_0000),
        ] {
            assert!(enc.matches(word), "{enc:x?} {word:#x}");
        }
        assert!(!MRS_DAIF.matches(0xd53b_4200));
        assert!(!EXCLUSIVE_GROUP.matches(0xa9bf_7bfd));
        assert_eq!(sign_extend(0x7_ffff, 19), -1);
    }
}
