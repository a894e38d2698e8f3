//! What the unwinders take from the guest kernel's vmlinux, in a small file of its own
//! (`HVUNWND1`): the release (which ORC layout), the ORC sections on x86_64, and the kernel's
//! `.notes` (its build id), to check that the vmlinux is the running kernel's. The emulated
//! runner carries this file into its L1 instead of the whole vmlinux (hundreds of MiB with
//! debug info).

use crate::elf;
use crate::symbols::SymbolMap;
use crate::unwind::UnwindError;

const MAGIC: &[u8; 8] = b"HVUNWND1";

/// The ORC sections as linked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrcSections {
    /// `.orc_unwind_ip`'s address.
    pub ip_va: u64,
    /// `.orc_unwind_ip`.
    pub ip: Vec<u8>,
    /// `.orc_unwind`.
    pub orc: Vec<u8>,
}

/// A kernel's unwind tables and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnwindTables {
    /// `major.minor` of the release, from `linux_banner`.
    pub release: (u32, u32),
    /// The ORC sections, if the vmlinux has them.
    pub orc: Option<OrcSections>,
    /// `.notes`, which holds the build id.
    pub notes: Vec<u8>,
}

fn tables_err(e: impl std::fmt::Display) -> UnwindError {
    UnwindError::Tables(e.to_string())
}

/// `major.minor` from a `Linux version 6.1.0-57-cloud-amd64 ...` banner.
pub fn release_of(banner: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(banner.get(..64.min(banner.len()))?).ok()?;
    let version = text.strip_prefix("Linux version ")?;
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

impl UnwindTables {
    /// The tables of the vmlinux `elf`, whose System.map is `map`.
    pub fn from_vmlinux(elf: &[u8], map: &SymbolMap) -> Result<UnwindTables, UnwindError> {
        let banner = map
            .lookup("linux_banner")
            .map_err(|_| UnwindError::MissingSymbol("linux_banner"))?;
        let bytes = elf::bytes_at(elf, banner.addr, 64).map_err(tables_err)?;
        let release = release_of(bytes).ok_or_else(|| {
            UnwindError::Tables("the vmlinux's linux_banner names no release".into())
        })?;
        let orc = match (
            elf::section_at(elf, ".orc_unwind_ip"),
            elf::section(elf, ".orc_unwind"),
        ) {
            (Ok((ip, ip_va)), Ok(orc)) => Some(OrcSections {
                ip_va,
                ip: ip.to_vec(),
                orc: orc.to_vec(),
            }),
            _ => None,
        };
        let notes = elf::section(elf, ".notes").map_err(tables_err)?.to_vec();
        Ok(UnwindTables {
            release,
            orc,
            notes,
        })
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.release.0.to_le_bytes());
        out.extend_from_slice(&self.release.1.to_le_bytes());
        let empty = OrcSections {
            ip_va: 0,
            ip: Vec::new(),
            orc: Vec::new(),
        };
        let orc = self.orc.as_ref().unwrap_or(&empty);
        out.push(u8::from(self.orc.is_some()));
        out.extend_from_slice(&orc.ip_va.to_le_bytes());
        for part in [&orc.ip, &orc.orc, &self.notes] {
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    /// Reads the file's bytes back.
    pub fn from_bytes(b: &[u8]) -> Result<UnwindTables, UnwindError> {
        let bad = || UnwindError::Tables("not an hvprobe unwind-tables file".into());
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], UnwindError> {
            let s = b
                .get(at..at.checked_add(n).ok_or_else(bad)?)
                .ok_or_else(bad)?;
            at += n;
            Ok(s)
        };
        if take(8)? != MAGIC {
            return Err(bad());
        }
        let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap_or([0; 4]));
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
        let release = (u32_of(take(4)?), u32_of(take(4)?));
        let has_orc = take(1)?[0] != 0;
        let ip_va = u64_of(take(8)?);
        let mut parts = Vec::new();
        for _ in 0..3 {
            let n = usize::try_from(u64_of(take(8)?)).map_err(|_| bad())?;
            parts.push(take(n)?.to_vec());
        }
        let notes = parts.pop().unwrap_or_default();
        let orc_bytes = parts.pop().unwrap_or_default();
        let ip = parts.pop().unwrap_or_default();
        Ok(UnwindTables {
            release,
            orc: has_orc.then_some(OrcSections {
                ip_va,
                ip,
                orc: orc_bytes,
            }),
            notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_and_banners_give_releases() {
        let t = UnwindTables {
            release: (6, 1),
            orc: Some(OrcSections {
                ip_va: 0xffff_ffff_8240_0000,
                ip: vec![1, 2, 3, 4],
                orc: vec![5; 6],
            }),
            notes: b"GNU\0build".to_vec(),
        };
        assert_eq!(UnwindTables::from_bytes(&t.to_bytes()).unwrap(), t);
        let none = UnwindTables { orc: None, ..t };
        assert_eq!(UnwindTables::from_bytes(&none.to_bytes()).unwrap(), none);
        assert!(UnwindTables::from_bytes(b"HVUNWND1\x06").is_err());
        assert!(UnwindTables::from_bytes(b"garbage!garbage!").is_err());
        assert_eq!(
            release_of(b"Linux version 6.1.0-57-cloud-amd64 (debian-kernel@"),
            Some((6, 1))
        );
        assert_eq!(release_of(b"Linux version 10.12"), Some((10, 12)));
        assert_eq!(release_of(b"Not a banner"), None);
    }
}
