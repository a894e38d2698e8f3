//! The arm64 kernel image: an uncompressed `Image` (Documentation/arch/arm64/booting.rst),
//! checked before any VM or emulator starts and loaded with linux-loader's PE loader. A
//! compressed EFI_ZBOOT image (what some distributions ship as vmlinuz) is refused by name.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::KernelLoader;
use linux_loader::loader::pe::PE;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::vm::VmError;

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

/// Checks that `path` is an uncompressed arm64 Image.
pub fn check_kernel_image(path: &Path) -> Result<(), VmError> {
    read_image_header(path).map(|_| ())
}

/// Loads the Image at `path` into `mem` at the 2 MiB-aligned `base`: its entry point and the
/// end of the memory it will occupy running (load address + the header's `image_size`, which
/// counts BSS: the file is shorter), where an initrd may start.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path, base: u64) -> Result<(u64, u64), VmError> {
    let header = read_image_header(path)?;
    let mut file = File::open(path).map_err(|source| VmError::KernelFile {
        path: path.into(),
        source,
    })?;
    let loaded = PE::load(mem, Some(GuestAddress(base)), &mut file, None).map_err(|e| {
        VmError::BadKernel {
            path: path.into(),
            format: "arm64 Image",
            detail: e.to_string(),
        }
    })?;
    let entry = loaded.kernel_load.0;
    let end = loaded
        .kernel_end
        .max(entry.saturating_add(header.image_size));
    Ok((entry, end))
}
