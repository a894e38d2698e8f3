//! The kernel image formats hvprobe boots, checked on any host before anything starts (the
//! emulated runner of another architecture included): an x86_64 bzImage (64-bit boot protocol)
//! and an uncompressed arm64 `Image` (a compressed EFI_ZBOOT image is refused by name).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use hvprobe_guest::GuestArch;

use crate::vm::VmError;

/// Checks that `path` is a kernel image that guests of `arch` boot.
pub fn check_kernel_image(arch: GuestArch, path: &Path) -> Result<(), VmError> {
    match arch {
        GuestArch::X86_64 => check_bzimage(path),
        GuestArch::Aarch64 => read_image_header(path).map(|_| ()),
    }
}

/// Checks that `path` is a bzImage the 64-bit boot protocol can load, without loading it, so
/// that a wrong file is reported before any VM or emulator starts.
fn check_bzimage(path: &Path) -> Result<(), VmError> {
    use std::io::{Read, Seek, SeekFrom};
    let not = |detail: &str| VmError::BadKernel {
        format: "a bzImage",
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

/// `ARM\x64`, at offset 56 of the Image header.
const IMAGE_MAGIC: u32 = 0x644d_5241;

/// What the Image header says about loading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset from a 2 MiB-aligned base where the Image goes.
    pub text_offset: u64,
    /// Bytes the kernel occupies once running, BSS included (more than the file).
    pub image_size: u64,
}

/// Reads and checks the header of the arm64 Image at `path`.
pub fn read_image_header(path: &Path) -> Result<ImageHeader, VmError> {
    let bad = |detail: &str| VmError::BadKernel {
        path: path.into(),
        format: "an arm64 Image",
        detail: detail.into(),
    };
    let mut file = File::open(path).map_err(|source| VmError::KernelFile {
        path: path.into(),
        source,
    })?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header)
        .map_err(|_| bad("file too short for an Image header (64 bytes)"))?;
    if &header[..2] == b"MZ" && &header[4..8] == b"zimg" {
        return Err(bad(
            "it is a compressed EFI_ZBOOT image; give the uncompressed Image (decompress its payload)",
        ));
    }
    let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    let magic = u32::from_le_bytes(header[56..60].try_into().unwrap_or([0; 4]));
    if magic != IMAGE_MAGIC {
        return Err(bad("no \"ARM\\x64\" magic at offset 56"));
    }
    let image_size = word(16);
    Ok(ImageHeader {
        // An Image with no size predates the field: its text offset is 0x80000.
        text_offset: if image_size == 0 { 0x8_0000 } else { word(8) },
        image_size,
    })
}
