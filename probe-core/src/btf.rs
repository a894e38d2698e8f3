//! Just enough of BTF (the BPF Type Format the kernel carries in vmlinux's `.BTF` section) to
//! find the byte offset of a named member of a named struct: how hvprobe learns where
//! `task_struct.comm`, `.pid` and `.tgid` are in the guest kernel without hard-coding them.
//! Format: Documentation/bpf/btf.rst.

/// Errors of BTF parsing and lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    /// Not BTF, or truncated.
    #[error("not valid BTF: {0}")]
    Invalid(&'static str),
    /// An unknown type kind.
    #[error("BTF type {index} has unknown kind {kind}")]
    UnknownKind {
        /// Index of the type.
        index: usize,
        /// Its kind.
        kind: u32,
    },
    /// No struct of that name.
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    /// No member of that name.
    #[error("struct {strukt} has no member {member} in BTF")]
    NoMember {
        /// The struct.
        strukt: String,
        /// The member.
        member: String,
    },
    /// The member is a bitfield.
    #[error("{strukt}.{member} is a bitfield")]
    Bitfield {
        /// The struct.
        strukt: String,
        /// The member.
        member: String,
    },
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// A struct as BTF describes it: name, size, members with their byte offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StructInfo {
    name_off: u32,
    size: u32,
    /// (name offset, bit offset, bitfield)
    members: Vec<(u32, u32, bool)>,
}

/// Parsed BTF: the structs and unions and the string table.
#[derive(Debug, Clone)]
pub struct Btf {
    strings: Vec<u8>,
    structs: Vec<StructInfo>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap_or([0; 4])))
        .ok_or(BtfError::Invalid("truncated"))
}

impl Btf {
    /// Parses a `.BTF` section.
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Invalid("bad magic"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Invalid("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Invalid("string section out of bounds"))?
            .to_vec();
        let mut structs = Vec::new();
        let mut at = 0usize;
        let mut index = 1usize;
        while at < types.len() {
            let name_off = u32_at(types, at)?;
            let info = u32_at(types, at + 4)?;
            let size_or_type = u32_at(types, at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let extra = match kind {
                1 | 14 | 17 => 4,          // INT, VAR, DECL_TAG
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF.., FUNC, FLOAT, TYPE_TAG
                3 => 12,                   // ARRAY
                KIND_STRUCT | KIND_UNION => 12 * vlen,
                6 | 13 => 8 * vlen,   // ENUM, FUNC_PROTO
                15 | 19 => 12 * vlen, // DATASEC, ENUM64
                _ => return Err(BtfError::UnknownKind { index, kind }),
            };
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for m in 0..vlen {
                    let base = at + 12 * m;
                    let mname = u32_at(types, base)?;
                    let offset = u32_at(types, base + 8)?;
                    let (bits, bitfield) = if kind_flag {
                        (offset & 0x00ff_ffff, offset >> 24 != 0)
                    } else {
                        (offset, false)
                    };
                    members.push((mname, bits, bitfield || bits % 8 != 0));
                }
                structs.push(StructInfo {
                    name_off,
                    size: size_or_type,
                    members,
                });
            }
            at += extra;
            index += 1;
        }
        Ok(Btf { strings, structs })
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// The size in bytes of `struct strukt` (the largest of that name, as for
    /// [`Btf::member_offset`]).
    pub fn struct_size(&self, strukt: &str) -> Result<u64, BtfError> {
        self.structs
            .iter()
            .filter(|s| self.name(s.name_off) == strukt)
            .map(|s| u64::from(s.size))
            .max()
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))
    }

    /// Byte offset of `member` in `struct strukt` (the largest struct of that name, since
    /// BTF may also hold an empty forward-declared one).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u64, BtfError> {
        let s = self
            .structs
            .iter()
            .filter(|s| self.name(s.name_off) == strukt)
            .max_by_key(|s| s.size)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_string()))?;
        let (_, bits, bitfield) = s
            .members
            .iter()
            .find(|(n, _, _)| self.name(*n) == member)
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.to_string(),
                member: member.to_string(),
            })?;
        if *bitfield {
            return Err(BtfError::Bitfield {
                strukt: strukt.to_string(),
                member: member.to_string(),
            });
        }
        Ok(u64::from(*bits / 8))
    }
}

/// A struct for [`build_test_btf`]: name, size, and (member, byte offset) pairs.
#[cfg(test)]
pub(crate) type TestStruct<'a> = (&'a str, u32, &'a [(&'a str, u32)]);

/// Builds BTF blobs for tests.
#[cfg(test)]
pub(crate) fn build_test_btf(structs: &[TestStruct<'_>]) -> Vec<u8> {
    let mut strings = vec![0u8];
    let mut add = |s: &str| {
        let off = strings.len() as u32;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        off
    };
    let mut types = Vec::new();
    let int = add("int");
    // INT: name, info(kind 1), size 4, then the int encoding word.
    for w in [int, 1 << 24, 4, 32] {
        types.extend_from_slice(&u32::to_le_bytes(w));
    }
    for (name, size, members) in structs {
        let n = add(name);
        for w in [n, (KIND_STRUCT << 24) | members.len() as u32, *size] {
            types.extend_from_slice(&w.to_le_bytes());
        }
        for (m, byte_off) in *members {
            let mn = add(m);
            for w in [mn, 1, byte_off * 8] {
                types.extend_from_slice(&w.to_le_bytes());
            }
        }
    }
    let mut out = Vec::new();
    for w in [
        u32::from(MAGIC) | (1 << 16),
        24,
        0,
        types.len() as u32,
        types.len() as u32,
    ] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
    out.extend_from_slice(&types);
    out.extend_from_slice(&strings);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_member_offsets_of_the_full_struct() {
        let blob = build_test_btf(&[
            ("task_struct", 0, &[]),
            (
                "task_struct",
                9000,
                &[("pid", 2448), ("tgid", 2452), ("comm", 3000)],
            ),
        ]);
        let btf = Btf::parse(&blob).unwrap();
        assert_eq!(btf.member_offset("task_struct", "comm").unwrap(), 3000);
        assert_eq!(btf.member_offset("task_struct", "tgid").unwrap(), 2452);
        assert!(matches!(
            btf.member_offset("task_struct", "nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("mm_struct", "pgd"),
            Err(BtfError::NoStruct(_))
        ));
        assert!(Btf::parse(&blob[..10]).is_err());
        assert!(Btf::parse(&[0u8; 64]).is_err());
    }
}
