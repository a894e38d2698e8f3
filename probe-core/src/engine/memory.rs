//! Guest virtual memory for the engine: reads and writes through a vCPU's page tables, the
//! stack as emulation sees it, and the hash of a range (the kernel text check).

use super::*;
use crate::probe::read_virt;

/// The guest stack through the page tables of one vCPU, for emulation.
pub(super) struct VirtualStack<'a, A: Arch, M: GuestMemory + Send + Sync> {
    pub(super) mem: &'a M,
    pub(super) space: A::AddressSpace,
}

impl<A: Arch, M: GuestMemory + Send + Sync> GuestStack for VirtualStack<'_, A, M> {
    fn read_u64(&mut self, va: u64) -> Result<u64, EmulationError> {
        let mut b = [0u8; 8];
        read_virt::<A>(self.mem, self.space, va, &mut b)
            .map_err(|e| EmulationError::Stack { va, why: e.0 })?;
        Ok(u64::from_le_bytes(b))
    }

    fn write_u64(&mut self, va: u64, value: u64) -> Result<(), EmulationError> {
        write_virt::<A, M>(self.mem, self.space, va, &value.to_le_bytes())
    }
}

/// Writes guest virtual memory (the stack, for emulated pushes) through the page tables.
pub(super) fn write_virt<A: Arch, M: GuestMemory + Send + Sync>(
    mem: &M,
    space: A::AddressSpace,
    va: u64,
    bytes: &[u8],
) -> Result<(), EmulationError> {
    let err = |why: String| EmulationError::Stack { va, why };
    // Translate every byte's page first so a split write is all or nothing.
    let mut parts = Vec::new();
    let mut done = 0usize;
    while done < bytes.len() {
        let at = va.wrapping_add(done as u64);
        let t = A::translate(mem, space, at).map_err(|e| err(e.to_string()))?;
        if !t.writable {
            return Err(err("not writable".into()));
        }
        let n = ((t.page_size - (at & (t.page_size - 1))) as usize).min(bytes.len() - done);
        parts.push((t.gpa, done, n));
        done += n;
    }
    for (gpa, off, n) in parts {
        mem.write_slice(&bytes[off..off + n], GuestAddress(gpa))
            .map_err(|_| err(format!("guest physical {gpa:#x} is not memory")))?;
    }
    Ok(())
}

/// Reads guest virtual memory through the page tables the registers `regs` select, for the
/// VMM's own checks.
pub fn read_guest_virtual<A: Arch, M: GuestMemory + Send + Sync>(
    mem: &M,
    regs: &A::Registers,
    va: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    read_virt::<A>(mem, A::address_space(regs), va, buf).map_err(|e| e.0)
}

/// FNV-1a hash of guest virtual memory `[start, end)` as mapped by the page tables `regs`
/// select: the check that removing probes leaves kernel text byte-for-byte as it was.
pub fn hash_guest_virtual<A: Arch, M: GuestMemory + Send + Sync>(
    mem: &M,
    regs: &A::Registers,
    start: u64,
    end: u64,
) -> Result<u64, String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 4096];
    let mut at = start;
    while at < end {
        let n = ((4096 - (at & 4095)).min(end - at)) as usize;
        read_guest_virtual::<A, M>(mem, regs, at, &mut buf[..n])?;
        for b in &buf[..n] {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        at += n as u64;
    }
    Ok(h)
}
