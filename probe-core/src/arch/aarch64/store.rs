//! Stores KVM hands to the VMM undecoded: a data abort on read-only memory whose syndrome has
//! no instruction details (ISV = 0: store pair, pre- and post-indexed stores, atomics,
//! exclusives, `DC ZVA`) exits as `KVM_EXIT_ARM_NISV`, and the VMM must make the store and move
//! the PC on itself. Here such an instruction is decoded against the registers into what it
//! stores where, how the new bytes follow from the old (read-modify-write for atomics), and
//! what it leaves in registers. Anything else is refused, naming the instruction.
//!
//! Encodings: Arm ARM C4.1.94 (loads and stores): "Load/store register pair", "Load/store
//! register (immediate pre-/post-indexed)", "(unsigned immediate)", "(register offset)",
//! "Atomic memory operations", "Compare and swap (pair)", "Load/store exclusive"; C6.2 `DC`.

use super::Registers;
use crate::guest_memory::le_value;

/// How a store's new bytes follow from the bytes in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreData {
    /// Plain bytes.
    Bytes(Vec<u8>),
    /// An atomic read-modify-write (`LDADD`..`LDUMIN`, `SWP`): memory becomes `op(old,
    /// operand)`, and `Rt` receives the old value.
    Atomic {
        /// The operation.
        op: AtomicOp,
        /// `Rs`, cut to the access size.
        operand: u64,
    },
    /// `CAS`: memory becomes `new` if it equals `expected`; `Rs` receives the old value.
    CompareAndSwap {
        /// `Rs`, cut to the size.
        expected: u64,
        /// `Rt`, cut to the size.
        new: u64,
    },
    /// `CASP`: the pair form, each half `len / 2` bytes.
    CompareAndSwapPair {
        /// `Rs`, `Rs+1`.
        expected: [u64; 2],
        /// `Rt`, `Rt+1`.
        new: [u64; 2],
    },
    /// `STXR`/`STXP`: stores `bytes` if the exclusive monitor still holds, and writes 0 (done)
    /// or 1 (not done) to `Ws`.
    Exclusive {
        /// The bytes.
        bytes: Vec<u8>,
    },
}

/// The read-modify-write of an atomic memory operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomicOp {
    /// `LDADD`.
    Add,
    /// `LDCLR`: old AND NOT operand.
    Clear,
    /// `LDEOR`.
    Xor,
    /// `LDSET`: old OR operand.
    Set,
    /// `LDSMAX`.
    SignedMax,
    /// `LDSMIN`.
    SignedMin,
    /// `LDUMAX`.
    UnsignedMax,
    /// `LDUMIN`.
    UnsignedMin,
    /// `SWP`.
    Swap,
}

/// A decoded store: `len` bytes at `va`, and its register effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsyndromedStore {
    /// The first byte's virtual address.
    pub va: u64,
    /// Bytes stored.
    pub len: usize,
    /// What is stored.
    pub data: StoreData,
    /// The base register's new value (31: SP), for writeback forms.
    pub writeback: Option<(u8, u64)>,
    /// The register that receives the old value (atomics: `Rt`; compare-and-swap: `Rs`) or
    /// the exclusive status (`Ws`); 31 is XZR there (nothing written).
    pub result: Option<u8>,
    /// Whether `result` is a 32-bit register (its upper half is zeroed).
    pub result_is_w: bool,
}

/// Why a store cannot be emulated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the store at {pc:#x} ({insn:#010x}: {what}) cannot be emulated by hvprobe")]
pub struct StoreRefusal {
    /// The instruction's address.
    pub pc: u64,
    /// Its encoding.
    pub insn: u32,
    /// What it is.
    pub what: &'static str,
}

fn bits(insn: u32, lo: u32, n: u32) -> u32 {
    (insn >> lo) & ((1 << n) - 1)
}

fn sign_extend(v: u32, n: u32) -> i64 {
    let shift = 64 - n;
    ((u64::from(v) << shift) as i64) >> shift
}

/// `Xn` as a data register (31: XZR).
fn data_reg(regs: &Registers, r: u32) -> u64 {
    if r == 31 { 0 } else { regs.x[r as usize] }
}

/// `Xn` as a base register (31: SP).
fn base_reg(regs: &Registers, r: u32) -> u64 {
    if r == 31 { regs.sp } else { regs.x[r as usize] }
}

fn mask(len: usize) -> u64 {
    if len >= 8 {
        u64::MAX
    } else {
        (1u64 << (len * 8)) - 1
    }
}

fn le(v: u64, len: usize) -> Vec<u8> {
    v.to_le_bytes()[..len].to_vec()
}

/// The registers [`decode_store`] may read for `insn` and [`UnsyndromedStore::finish`] may
/// write, as a register-use mask ([`super::regs::uses`]): every register field a store
/// encoding has (Rt at bit 0, Rn at 5, Rt2 at 10, Rs or Rm at 16) and the next register (the
/// pairs of CASP), and SP when Rn is 31. KVM reads each register with its own ioctl, so an
/// emulated store asks for these and not the whole register file.
pub fn registers_read(insn: u32) -> u64 {
    let mut used = 0u64;
    for lo in [0, 5, 10, 16] {
        let r = bits(insn, lo, 5);
        if r < 31 {
            used |= 1 << r;
        }
        if r + 1 < 31 {
            used |= 1 << (r + 1);
        }
    }
    if bits(insn, 5, 5) == 31 {
        used |= super::regs::uses::SP;
    }
    used
}

/// Decodes `insn` at `regs.pc` as a store KVM could not decode, with `zva_block` the bytes
/// `DC ZVA` zeroes (from `DCZID_EL0`; `None` refuses it).
pub fn decode_store(
    insn: u32,
    regs: &Registers,
    zva_block: Option<usize>,
) -> Result<UnsyndromedStore, StoreRefusal> {
    let refuse = |what| StoreRefusal {
        pc: regs.pc,
        insn,
        what,
    };
    let rt = bits(insn, 0, 5);
    let rn = bits(insn, 5, 5);
    let plain = |va, bytes: Vec<u8>, writeback| UnsyndromedStore {
        va,
        len: bytes.len(),
        data: StoreData::Bytes(bytes),
        writeback,
        result: None,
        result_is_w: false,
    };
    // DC ZVA, Xt.
    if insn & !0x1f == 0xd50b_7420 {
        let block = zva_block.ok_or_else(|| refuse("DC ZVA with an unknown block size"))?;
        let va = data_reg(regs, rt) & !(block as u64 - 1);
        return Ok(plain(va, vec![0; block], None));
    }
    // Load/store register pair (general registers), store forms.
    if insn & 0x3c40_0000 == 0x2800_0000 {
        let opc = bits(insn, 30, 2);
        let index = bits(insn, 23, 3);
        let size = match opc {
            0 => 4,
            2 => 8,
            1 => return Err(refuse("STGP (memory tagging)")),
            _ => return Err(refuse("an unallocated store pair")),
        };
        if index > 3 {
            return Err(refuse("an unallocated store pair"));
        }
        let imm = sign_extend(bits(insn, 15, 7), 7) * size as i64;
        let base = base_reg(regs, rn);
        let at = base.wrapping_add_signed(imm);
        let va = if index == 1 { base } else { at };
        let rt2 = bits(insn, 10, 5);
        let mut bytes = le(data_reg(regs, rt), size);
        bytes.extend(le(data_reg(regs, rt2), size));
        let writeback = matches!(index, 1 | 3).then_some((rn as u8, at));
        return Ok(plain(va, bytes, writeback));
    }
    if insn & 0x3c40_0000 == 0x2c00_0000 {
        return Err(refuse("a store pair of SIMD&FP registers"));
    }
    let size = 1usize << bits(insn, 30, 2);
    // Store register (immediate: unscaled, post-indexed, unprivileged, pre-indexed).
    if insn & 0x3fe0_0000 == 0x3800_0000 {
        let imm = sign_extend(bits(insn, 12, 9), 9);
        let base = base_reg(regs, rn);
        let at = base.wrapping_add_signed(imm);
        let bytes = le(data_reg(regs, rt), size);
        return Ok(match bits(insn, 10, 2) {
            0 | 2 => plain(at, bytes, None),
            1 => plain(base, bytes, Some((rn as u8, at))),
            _ => plain(at, bytes, Some((rn as u8, at))),
        });
    }
    // Store register (unsigned immediate).
    if insn & 0x3fc0_0000 == 0x3900_0000 {
        let at = base_reg(regs, rn).wrapping_add(u64::from(bits(insn, 10, 12)) * size as u64);
        return Ok(plain(at, le(data_reg(regs, rt), size), None));
    }
    // Store register (register offset).
    if insn & 0x3fe0_0c00 == 0x3820_0800 {
        let rm = data_reg(regs, bits(insn, 16, 5));
        let option = bits(insn, 13, 3);
        let shift = if bits(insn, 12, 1) == 1 {
            bits(insn, 30, 2)
        } else {
            0
        };
        let offset = match option {
            0b010 => rm & 0xffff_ffff,
            0b110 => rm as u32 as i32 as i64 as u64,
            0b011 | 0b111 => rm,
            _ => return Err(refuse("an unallocated register-offset store")),
        } << shift;
        let at = base_reg(regs, rn).wrapping_add(offset);
        return Ok(plain(at, le(data_reg(regs, rt), size), None));
    }
    if insn & 0x3f00_0000 == 0x3c00_0000 || insn & 0x3f00_0000 == 0x3d00_0000 {
        return Err(refuse("a store of a SIMD&FP register"));
    }
    // Atomic memory operations.
    if insn & 0x3f20_0c00 == 0x3820_0000 {
        let rs = bits(insn, 16, 5);
        let op = match (bits(insn, 15, 1), bits(insn, 12, 3)) {
            (0, 0) => AtomicOp::Add,
            (0, 1) => AtomicOp::Clear,
            (0, 2) => AtomicOp::Xor,
            (0, 3) => AtomicOp::Set,
            (0, 4) => AtomicOp::SignedMax,
            (0, 5) => AtomicOp::SignedMin,
            (0, 6) => AtomicOp::UnsignedMax,
            (0, 7) => AtomicOp::UnsignedMin,
            (1, 0) => AtomicOp::Swap,
            _ => return Err(refuse("a load (LDAPR) or an unallocated atomic")),
        };
        return Ok(UnsyndromedStore {
            va: base_reg(regs, rn),
            len: size,
            data: StoreData::Atomic {
                op,
                operand: data_reg(regs, rs) & mask(size),
            },
            writeback: None,
            result: Some(rt as u8),
            result_is_w: size < 8,
        });
    }
    // Compare and swap.
    if insn & 0x3fa0_7c00 == 0x08a0_7c00 {
        let rs = bits(insn, 16, 5);
        return Ok(UnsyndromedStore {
            va: base_reg(regs, rn),
            len: size,
            data: StoreData::CompareAndSwap {
                expected: data_reg(regs, rs) & mask(size),
                new: data_reg(regs, rt) & mask(size),
            },
            writeback: None,
            result: Some(rs as u8),
            result_is_w: size < 8,
        });
    }
    // Compare and swap pair.
    if insn & 0xbfa0_7c00 == 0x0820_7c00 {
        let rs = bits(insn, 16, 5);
        if rs % 2 == 1 || rt % 2 == 1 {
            return Err(refuse("a compare-and-swap pair on odd registers"));
        }
        let half = if bits(insn, 30, 1) == 1 { 8 } else { 4 };
        let pair = |r: u32| {
            if r == 31 {
                [0, 0]
            } else {
                [
                    data_reg(regs, r) & mask(half),
                    data_reg(regs, r + 1) & mask(half),
                ]
            }
        };
        return Ok(UnsyndromedStore {
            va: base_reg(regs, rn),
            len: 2 * half,
            data: StoreData::CompareAndSwapPair {
                expected: pair(rs),
                new: pair(rt),
            },
            writeback: None,
            result: Some(rs as u8),
            result_is_w: half < 8,
        });
    }
    // Store exclusive (register: any size, L = 0, o1 = 0; pair: bit 31 set, o1 = 1), with or
    // without release. (CASP, bit 31 clear, was taken above.)
    if insn & 0x3fe0_0000 == 0x0800_0000 || insn & 0xbfe0_0000 == 0x8820_0000 {
        let rs = bits(insn, 16, 5);
        let pair = bits(insn, 21, 1) == 1;
        let (len, bytes) = if pair {
            let half = if bits(insn, 30, 1) == 1 { 8 } else { 4 };
            let mut b = le(data_reg(regs, rt), half);
            b.extend(le(data_reg(regs, bits(insn, 10, 5)), half));
            (2 * half, b)
        } else {
            (size, le(data_reg(regs, rt), size))
        };
        return Ok(UnsyndromedStore {
            va: base_reg(regs, rn),
            len,
            data: StoreData::Exclusive { bytes },
            writeback: None,
            result: Some(rs as u8),
            result_is_w: true,
        });
    }
    Err(refuse("not a store hvprobe decodes"))
}

impl UnsyndromedStore {
    /// The bytes memory holds after the store, from the bytes `old` there before (`len` of
    /// them); `None` when it stores nothing (a compare-and-swap that found another value).
    /// An exclusive store's monitor is the caller's: this gives its bytes.
    pub fn update(&self, old: &[u8]) -> Option<Vec<u8>> {
        let len = self.len;
        match &self.data {
            StoreData::Bytes(b) | StoreData::Exclusive { bytes: b } => Some(b.clone()),
            StoreData::Atomic { op, operand } => {
                let o = le_value(old);
                let bitsz = (len * 8) as u32;
                let signed = |v: u64| ((v << (64 - bitsz)) as i64) >> (64 - bitsz);
                let new = match op {
                    AtomicOp::Add => o.wrapping_add(*operand),
                    AtomicOp::Clear => o & !operand,
                    AtomicOp::Xor => o ^ operand,
                    AtomicOp::Set => o | operand,
                    AtomicOp::SignedMax => {
                        if signed(o) >= signed(*operand) {
                            o
                        } else {
                            *operand
                        }
                    }
                    AtomicOp::SignedMin => {
                        if signed(o) <= signed(*operand) {
                            o
                        } else {
                            *operand
                        }
                    }
                    AtomicOp::UnsignedMax => o.max(*operand),
                    AtomicOp::UnsignedMin => o.min(*operand),
                    AtomicOp::Swap => *operand,
                };
                Some(le(new & mask(len), len))
            }
            StoreData::CompareAndSwap { expected, new } => {
                (le_value(old) == *expected).then(|| le(*new, len))
            }
            StoreData::CompareAndSwapPair { expected, new } => {
                let half = len / 2;
                let now = [le_value(&old[..half]), le_value(&old[half..])];
                (now == *expected).then(|| {
                    let mut b = le(new[0], half);
                    b.extend(le(new[1], half));
                    b
                })
            }
        }
    }

    /// Sets what the instruction leaves in registers, given the bytes that were in memory
    /// (`old`) and, for an exclusive store, whether it was made; and moves the PC past it.
    pub fn finish(&self, regs: &mut Registers, old: &[u8], exclusive_done: bool) {
        let mut set = |r: u8, v: u64| match r {
            31 => {}
            r => regs.x[usize::from(r)] = v,
        };
        if let Some(r) = self.result {
            let w = |v: u64| {
                if self.result_is_w { v & 0xffff_ffff } else { v }
            };
            match &self.data {
                StoreData::Bytes(_) => {}
                StoreData::Atomic { .. } | StoreData::CompareAndSwap { .. } => {
                    set(r, w(le_value(old)))
                }
                StoreData::CompareAndSwapPair { .. } => {
                    let half = self.len / 2;
                    if r != 31 {
                        set(r, w(le_value(&old[..half])));
                        set(r + 1, w(le_value(&old[half..])));
                    }
                }
                StoreData::Exclusive { .. } => set(r, u64::from(!exclusive_done)),
            }
        }
        if let Some((rn, v)) = self.writeback {
            if rn == 31 {
                regs.sp = v;
            } else {
                regs.x[usize::from(rn)] = v;
            }
        }
        regs.pc = regs.pc.wrapping_add(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> Registers {
        let mut r = Registers {
            pc: 0xffff_8000_0800_0000,
            sp: 0xffff_0000_0000_1000,
            ..Registers::default()
        };
        for i in 0..31 {
            r.x[i] = 0x1111_1111_1111_1111 * (i as u64 % 15 + 1);
        }
        r.x[0] = 0xffff_0000_0000_2000;
        r.x[1] = 0x0102_0304_0506_0708;
        r.x[2] = 0x1112_1314_1516_1718;
        r
    }

    #[test]
    fn a_store_needs_no_register_beyond_those_it_says_it_reads() {
        // Random encodings and the known stores: decoded from registers where everything
        // outside `registers_read` is scrambled, each gives what the whole file gives, and
        // finishing it writes only registers inside the mask.
        let known = [
            0xa901_0801u32,
            0xa9bf_0801,
            0xa881_0801,
            0xa9be_7bfd,
            0x2901_0801,
            0xa900_7c1f,
            0xf800_8401,
            0x381f_fc01,
            0x7900_0401,
            0xb823_6801,
            0xf81f_8001,
            0xf821_0003,
            0xb861_3003,
            0xc8e4_fc01,
            0x4824_7c06,
            0xc803_7c01,
            0xc823_8801,
            0xd50b_7420,
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let random: Vec<u32> = (0..200_000).map(|_| next() as u32).collect();
        let full = regs();
        for &insn in known.iter().chain(&random) {
            let used = registers_read(insn);
            let mut partial = full.clone();
            for i in 0..31 {
                if used & (1 << i) == 0 {
                    partial.x[i] = next();
                }
            }
            if used & crate::arch::aarch64::regs::uses::SP == 0 {
                partial.sp = next();
            }
            let (a, b) = (
                decode_store(insn, &full, Some(64)),
                decode_store(insn, &partial, Some(64)),
            );
            assert_eq!(a, b, "{insn:#010x}");
            if let Ok(s) = a {
                let mut after = partial.clone();
                s.finish(&mut after, &vec![0; s.len], true);
                for i in 0..31 {
                    if used & (1 << i) == 0 {
                        assert_eq!(after.x[i], partial.x[i], "{insn:#010x} wrote x{i}");
                    }
                }
                if used & crate::arch::aarch64::regs::uses::SP == 0 {
                    assert_eq!(after.sp, partial.sp, "{insn:#010x} wrote sp");
                }
            }
        }
    }

    /// What the store leaves in memory (from `old`) and in registers.
    fn run(insn: u32, r: &Registers, old: &[u8]) -> (u64, Option<Vec<u8>>, Registers) {
        let s = decode_store(insn, r, Some(64)).unwrap();
        let new = s.update(old);
        let mut after = r.clone();
        s.finish(&mut after, old, true);
        (s.va, new, after)
    }

    #[test]
    fn store_pairs_store_both_registers_with_every_addressing_form() {
        let r = regs();
        let both: Vec<u8> = [r.x[1].to_le_bytes(), r.x[2].to_le_bytes()].concat();
        // stp x1, x2, [x0, #16]
        let (va, new, after) = run(0xa901_0801, &r, &[0; 16]);
        assert_eq!((va, new.unwrap()), (r.x[0] + 16, both.clone()));
        assert_eq!((after.x[0], after.pc), (r.x[0], r.pc + 4));
        // stp x1, x2, [x0, #-16]!  (pre-index: the base moves first)
        let (va, _, after) = run(0xa9bf_0801, &r, &[0; 16]);
        assert_eq!((va, after.x[0]), (r.x[0] - 16, r.x[0] - 16));
        // stp x1, x2, [x0], #16  (post-index: stores at the base, then moves it)
        let (va, _, after) = run(0xa881_0801, &r, &[0; 16]);
        assert_eq!((va, after.x[0]), (r.x[0], r.x[0] + 16));
        // stp x29, x30, [sp, #-32]!  (SP as the base)
        let (va, new, after) = run(0xa9be_7bfd, &r, &[0; 16]);
        assert_eq!((va, after.sp), (r.sp - 32, r.sp - 32));
        assert_eq!(new.unwrap()[..8], r.x[29].to_le_bytes());
        // stp w1, w2, [x0, #8]; stp xzr, xzr, [x0]
        let (va, new, _) = run(0x2901_0801, &r, &[0; 8]);
        assert_eq!(
            (va, new.unwrap()),
            (
                r.x[0] + 8,
                [0x0506_0708u32.to_le_bytes(), 0x1516_1718u32.to_le_bytes()].concat()
            )
        );
        let (_, new, _) = run(0xa900_7c1f, &r, &[9; 16]);
        assert_eq!(new.unwrap(), vec![0; 16]);
        // stnp x1, x2, [x0]
        let (va, new, _) = run(0xa800_0801, &r, &[0; 16]);
        assert_eq!((va, new.unwrap()), (r.x[0], both));
    }

    #[test]
    fn indexed_stores_move_their_base() {
        let r = regs();
        // str x1, [x0], #8
        let (va, new, after) = run(0xf800_8401, &r, &[0; 8]);
        assert_eq!(
            (va, new.unwrap(), after.x[0]),
            (r.x[0], r.x[1].to_le_bytes().to_vec(), r.x[0] + 8)
        );
        // strb w1, [x0, #-1]!
        let (va, new, after) = run(0x381f_fc01, &r, &[0]);
        assert_eq!(
            (va, new.unwrap(), after.x[0]),
            (r.x[0] - 1, vec![0x08], r.x[0] - 1)
        );
        // strh w1, [x0, #2]; str w1, [x0, x2, lsl #2]... as register offset: str w1, [x0, x3]
        let (va, new, _) = run(0x7900_0401, &r, &[0; 2]);
        assert_eq!((va, new.unwrap()), (r.x[0] + 2, vec![0x08, 0x07]));
        let (va, _, _) = run(0xb823_6801, &r, &[0; 4]);
        assert_eq!(va, r.x[0].wrapping_add(r.x[3]));
        // stur x1, [x0, #-8]
        let (va, _, after) = run(0xf81f_8001, &r, &[0; 8]);
        assert_eq!((va, after.x[0]), (r.x[0] - 8, r.x[0]));
    }

    #[test]
    fn atomics_compute_from_the_old_value_and_return_it() {
        let r = regs();
        let old = 5u64.to_le_bytes();
        // ldadd x1, x3, [x0]: memory old + x1, x3 = old.
        let (_, new, after) = run(0xf821_0003, &r, &old);
        assert_eq!(
            new.unwrap(),
            5u64.wrapping_add(r.x[1]).to_le_bytes().to_vec()
        );
        assert_eq!(after.x[3], 5);
        // stadd w1, [x0] (ldadd with xzr): 32-bit, no register written.
        let (_, new, after) = run(0xb821_001f, &r, &5u32.to_le_bytes());
        assert_eq!(
            new.unwrap(),
            5u32.wrapping_add(0x0506_0708).to_le_bytes().to_vec()
        );
        assert_eq!(after.x, r.x);
        // ldclral x1, x3, [x0]; ldsetl w1, w3, [x0]; swpal x1, x3, [x0]
        let (_, new, _) = run(0xf8e1_1003, &r, &u64::MAX.to_le_bytes());
        assert_eq!(new.unwrap(), (!r.x[1]).to_le_bytes().to_vec());
        let (_, new, after) = run(0xb861_3003, &r, &0x8000_0000u32.to_le_bytes());
        assert_eq!(new.unwrap(), 0x8506_0708u32.to_le_bytes().to_vec());
        assert_eq!(after.x[3], 0x8000_0000, "a W result is zero-extended");
        let (_, new, after) = run(0xf8e1_8003, &r, &old);
        assert_eq!(
            (new.unwrap(), after.x[3]),
            (r.x[1].to_le_bytes().to_vec(), 5)
        );
        // ldsmax w1, w3, [x0] with old = -1: the operand is larger.
        let (_, new, _) = run(0xb821_4003, &r, &u32::MAX.to_le_bytes());
        assert_eq!(new.unwrap(), 0x0506_0708u32.to_le_bytes().to_vec());
        // ldumin w1, w3, [x0] with old = 3.
        let (_, new, _) = run(0xb821_7003, &r, &3u32.to_le_bytes());
        assert_eq!(new.unwrap(), 3u32.to_le_bytes().to_vec());
    }

    #[test]
    fn compare_and_swap_stores_only_on_a_match_and_returns_the_old_value() {
        let mut r = regs();
        r.x[4] = 7;
        // casal x4, x1, [x0]
        let (_, new, after) = run(0xc8e4_fc01, &r, &7u64.to_le_bytes());
        assert_eq!(
            (new.unwrap(), after.x[4]),
            (r.x[1].to_le_bytes().to_vec(), 7)
        );
        let (_, new, after) = run(0xc8e4_fc01, &r, &8u64.to_le_bytes());
        assert_eq!((new, after.x[4]), (None, 8));
        // casp x4, x5, x6, x7, [x0]
        r.x[5] = 9;
        let old = [7u64.to_le_bytes(), 9u64.to_le_bytes()].concat();
        let (_, new, after) = run(0x4824_7c06, &r, &old);
        assert_eq!(
            new.unwrap(),
            [r.x[6].to_le_bytes(), r.x[7].to_le_bytes()].concat()
        );
        assert_eq!((after.x[4], after.x[5]), (7, 9));
    }

    #[test]
    fn exclusive_stores_report_their_status_and_the_rest_is_refused_by_name() {
        let r = regs();
        // stxr w3, x1, [x0]; stlxp w3, x1, x2, [x0]
        let s = decode_store(0xc803_7c01, &r, None).unwrap();
        assert_eq!((s.va, s.len, s.result), (r.x[0], 8, Some(3)));
        let mut after = r.clone();
        s.finish(&mut after, &[0; 8], false);
        assert_eq!(after.x[3], 1, "not done: 1");
        s.finish(&mut after, &[0; 8], true);
        assert_eq!(after.x[3], 0, "done: 0");
        let s = decode_store(0xc823_8801, &r, None).unwrap();
        assert_eq!(
            s.update(&[0; 16]).unwrap(),
            [r.x[1].to_le_bytes(), r.x[2].to_le_bytes()].concat()
        );
        // dc zva, x0: the block holding x0, zeroed.
        let s = decode_store(0xd50b_7420, &r, Some(64)).unwrap();
        assert_eq!(
            (s.va, s.update(&[1; 64]).unwrap()),
            (r.x[0] & !63, vec![0; 64])
        );
        let e = decode_store(0xd50b_7420, &r, None).unwrap_err();
        assert!(e.to_string().contains("DC ZVA"), "{e}");
        // stp q0, q1, [x0]; str q0, [x0]; ldr x1, [x0]: refused, named.
        for (insn, says) in [
            (0xad00_0400, "SIMD"),
            (0x3d80_0000, "SIMD"),
            (0xf940_0001, "not a store"),
        ] {
            let e = decode_store(insn, &r, Some(64)).unwrap_err();
            assert!(
                e.to_string().contains(says) && e.to_string().contains(&format!("{insn:#010x}")),
                "{e}"
            );
        }
    }
}
