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
        format: "a bzImage",
        path: path.into(),
        detail: e.to_string(),
    })?;
    let header = loaded.setup_header.ok_or_else(|| VmError::BadKernel {
        format: "a bzImage",
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
