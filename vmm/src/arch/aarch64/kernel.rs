//! The arm64 kernel image: the header of an uncompressed `Image` (Documentation/arch/arm64/
//! booting.rst), checked before any VM or emulator starts. A compressed EFI_ZBOOT image (what
//! some distributions ship as vmlinuz) is refused by name.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use vm_memory::GuestMemoryMmap;

use crate::vm::VmError;

/// `ARM\x64`, at offset 56 of the Image header.
const IMAGE_MAGIC: u32 = 0x644d_5241;

/// Checks that `path` is an uncompressed arm64 Image.
pub fn check_kernel_image(path: &Path) -> Result<(), VmError> {
    let bad = |detail: &str| VmError::BadKernel {
        path: path.into(),
        format: "arm64 Image",
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
            "it is a compressed EFI_ZBOOT image; give the uncompressed Image (decompress the payload, or use the -dbg package's vmlinux build of the same version)",
        ));
    }
    let magic = u32::from_le_bytes(header[56..60].try_into().unwrap_or([0; 4]));
    if magic != IMAGE_MAGIC {
        return Err(bad("no \"ARM\\x64\" magic at offset 56"));
    }
    Ok(())
}

/// Loads the Image at `path` into `mem`: not written yet (the arm64 VMM comes with its own
/// issue).
pub fn load_kernel(_mem: &GuestMemoryMmap, path: &Path) -> Result<(u64, u64), VmError> {
    check_kernel_image(path)?;
    Err(VmError::Unsupported(
        "loading an arm64 Image is not written yet",
    ))
}
