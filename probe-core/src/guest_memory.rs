//! Guest physical memory as everything in probe-core reads it: a leaf module, below the
//! architectures, the engine and the handlers.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Guest physical memory as probe-core reads it: the page walker, handlers, the engine. Every
/// `vm_memory::GuestMemory` is one; tests give the walker small fakes.
pub trait GuestPhysMemory: Send + Sync {
    /// Fills `buf` from guest physical `gpa`; false if any byte is not memory.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool;

    /// The little-endian u64 at guest physical `gpa`, or `None` if it is not memory.
    fn read_phys_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b).then(|| u64::from_le_bytes(b))
    }
}

impl<M: GuestMemory + Send + Sync> GuestPhysMemory for M {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.read_slice(buf, GuestAddress(gpa)).is_ok()
    }
}

/// The first eight (or fewer) of `bytes` as a little-endian number: a stored value as the
/// guest sees it.
pub fn le_value(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(b)
}
