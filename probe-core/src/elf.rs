//! Minimal ELF64 little-endian section lookup, to take the `.BTF` section out of a guest
//! kernel's vmlinux without a full ELF library.

/// Errors of section lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// Not a 64-bit little-endian ELF file, or truncated.
    #[error("not a 64-bit little-endian ELF file ({0})")]
    Invalid(&'static str),
    /// No section of that name.
    #[error("no {0} section")]
    NoSection(String),
}

fn u16_at(b: &[u8], at: usize) -> Result<usize, ElfError> {
    b.get(at..at + 2)
        .map(|s| usize::from(u16::from_le_bytes([s[0], s[1]])))
        .ok_or(ElfError::Invalid("truncated"))
}

fn u64_at(b: &[u8], at: usize) -> Result<usize, ElfError> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])) as usize)
        .ok_or(ElfError::Invalid("truncated"))
}

/// The bytes of section `name` in the ELF file `elf`.
pub fn section<'a>(elf: &'a [u8], name: &str) -> Result<&'a [u8], ElfError> {
    section_at(elf, name).map(|(bytes, _)| bytes)
}

/// The bytes of section `name` in the ELF file `elf`, and its address as linked.
pub fn section_at<'a>(elf: &'a [u8], name: &str) -> Result<(&'a [u8], u64), ElfError> {
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err(ElfError::Invalid("bad header"));
    }
    let shoff = u64_at(elf, 0x28)?;
    let shentsize = u16_at(elf, 0x3a)?;
    let shnum = u16_at(elf, 0x3c)?;
    let shstrndx = u16_at(elf, 0x3e)?;
    let header = |i: usize| shoff + i * shentsize;
    let strtab_off = u64_at(elf, header(shstrndx) + 0x18)?;
    for i in 0..shnum {
        let h = header(i);
        let name_off = elf
            .get(h..h + 4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap_or([0; 4])) as usize)
            .ok_or(ElfError::Invalid("truncated"))?;
        let n = elf
            .get(strtab_off + name_off..)
            .ok_or(ElfError::Invalid("bad section name"))?;
        let end = n.iter().position(|b| *b == 0).unwrap_or(n.len());
        if &n[..end] == name.as_bytes() {
            let addr = u64_at(elf, h + 0x10)? as u64;
            let off = u64_at(elf, h + 0x18)?;
            let size = u64_at(elf, h + 0x20)?;
            return elf
                .get(off..off.saturating_add(size))
                .map(|b| (b, addr))
                .ok_or(ElfError::Invalid("section out of bounds"));
        }
    }
    Err(ElfError::NoSection(name.to_string()))
}

/// The `count` 64-bit words at virtual address `va` as the kernel sees them once relocated:
/// a relocatable kernel (arm64's is linked `-pie` and leaves its dynamic relocations
/// unapplied in the file) keeps a pointer as a zero word with an `R_*_RELATIVE` entry in
/// `.rela.dyn` whose addend is the address; such words take the addend.
pub fn relocated_words(elf: &[u8], va: u64, count: usize) -> Result<Vec<u64>, ElfError> {
    let bytes = bytes_at(elf, va, count * 8)?;
    let mut words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    if let Ok(rela) = section(elf, ".rela.dyn") {
        // R_AARCH64_RELATIVE (1027), R_X86_64_RELATIVE (8).
        for r in rela.chunks_exact(24) {
            let word = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().unwrap_or([0; 8]));
            let (offset, kind, addend) = (word(0), word(8) & 0xffff_ffff, word(16));
            if matches!(kind, 1027 | 8) && offset >= va && offset < va + 8 * count as u64 {
                let i = ((offset - va) / 8) as usize;
                if words[i] == 0 {
                    words[i] = addend;
                }
            }
        }
    }
    Ok(words)
}

/// The file bytes at virtual address `va` (`len` of them), from the `PROGBITS` section that
/// holds them: the kernel's text as linked, read from its vmlinux.
pub fn bytes_at(elf: &[u8], va: u64, len: usize) -> Result<&[u8], ElfError> {
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err(ElfError::Invalid("bad header"));
    }
    let shoff = u64_at(elf, 0x28)?;
    let shentsize = u16_at(elf, 0x3a)?;
    let shnum = u16_at(elf, 0x3c)?;
    for i in 0..shnum {
        let h = shoff + i * shentsize;
        let kind = elf
            .get(h + 4..h + 8)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap_or([0; 4])))
            .ok_or(ElfError::Invalid("truncated"))?;
        let (addr, off, size) = (
            u64_at(elf, h + 0x10)? as u64,
            u64_at(elf, h + 0x18)?,
            u64_at(elf, h + 0x20)? as u64,
        );
        if kind == 1 && (addr..addr + size).contains(&va) && va + len as u64 <= addr + size {
            let at = off + (va - addr) as usize;
            return elf
                .get(at..at + len)
                .ok_or(ElfError::Invalid("section out of bounds"));
        }
    }
    Err(ElfError::NoSection(format!("section holding {va:#x}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sections_of_this_test_binary_and_rejects_junk() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!section(&me, ".text").unwrap().is_empty());
        assert!(matches!(
            section(&me, ".no-such"),
            Err(ElfError::NoSection(_))
        ));
        assert!(section(b"junk", ".text").is_err());
        // bytes_at on junk and on an address no section holds (the runner tests read the
        // guest kernel's text with it).
        assert!(bytes_at(b"junk", 0, 1).is_err());
        assert!(matches!(
            bytes_at(&me, u64::MAX - 8, 4),
            Err(ElfError::NoSection(_))
        ));
        assert!(section(&me[..100], ".text").is_err());
    }
}
