//! Loading the x86_64 guest kernel: a bzImage through the 64-bit boot protocol.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::{KernelLoader, bzimage::BzImage};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use super::{boot, layout};
use crate::vm::VmError;

/// Loads the bzImage at `path` into `mem` (linux-loader's `BzImage`, 64-bit boot protocol):
/// the entry point, the end of the loaded kernel, and the boot information for the zero page.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<(u64, u64, boot::BootInfo), VmError> {
    let mut file = File::open(path).map_err(|source| VmError::KernelFile {
        path: path.into(),
        source,
    })?;
    let loaded = BzImage::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|e| VmError::BadKernel {
        format: "bzImage",
        path: path.into(),
        detail: e.to_string(),
    })?;
    let header = loaded.setup_header.ok_or_else(|| VmError::BadKernel {
        format: "bzImage",
        path: path.into(),
        detail: "no setup header".into(),
    })?;
    let entry = loaded.kernel_load.raw_value() + layout::BZIMAGE_64BIT_ENTRY_OFFSET;
    Ok((
        entry,
        loaded.kernel_end,
        boot::BootInfo {
            setup_header: header,
            cmdline_len: 0,
            initrd: None,
            mem_size: 0,
        },
    ))
}

/// Checks that `path` is a bzImage the 64-bit boot protocol can load, without loading it, so
/// that a wrong file is reported before any VM or emulator starts.
pub fn check_kernel_image(path: &Path) -> Result<(), VmError> {
    use std::io::{Read, Seek, SeekFrom};
    let not = |detail: &str| VmError::BadKernel {
        format: "bzImage",
        path: path.into(),
        detail: detail.into(),
    };
    let mut file = File::open(path).map_err(|source| VmError::KernelFile {
        path: path.into(),
        source,
    })?;
    let mut header = [0u8; 0x46];
    file.seek(SeekFrom::Start(0x1f1))
        .and_then(|_| file.read_exact(&mut header))
        .map_err(|_| not("file too short for a setup header"))?;
    // Offsets relative to 0x1f1: `header` magic at 0x202, `version` at 0x206,
    // `loadflags` at 0x211, `xloadflags` at 0x236 (bit 0: has the 64-bit entry point).
    if &header[0x11..0x15] != b"HdrS" {
        return Err(not("no \"HdrS\" boot-protocol magic at offset 0x202"));
    }
    let version = u16::from_le_bytes([header[0x15], header[0x16]]);
    if version < 0x020c {
        return Err(not(&format!(
            "boot protocol {}.{:02} is older than 2.12, the first with a 64-bit entry",
            version >> 8,
            version & 0xff
        )));
    }
    if header[0x20] & 1 == 0 {
        return Err(not("kernel is not loaded high (zImage, not bzImage)"));
    }
    if header[0x45] & 1 == 0 {
        return Err(not("no 64-bit entry point (XLF_KERNEL_64 clear)"));
    }
    Ok(())
}
