//! Loading the arm64 kernel: an uncompressed `Image` (Documentation/arch/arm64/booting.rst,
//! checked in `arch/image.rs`) with linux-loader's PE loader.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::KernelLoader;
use linux_loader::loader::pe::PE;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::image::read_image_header;
use crate::vm::VmError;

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
            format: "an arm64 Image",
            detail: e.to_string(),
        }
    })?;
    let entry = loaded.kernel_load.0;
    let end = loaded
        .kernel_end
        .max(entry.saturating_add(header.image_size));
    Ok((entry, end))
}
