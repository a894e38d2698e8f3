//! Reading a stack from the host: guest virtual memory through the vCPU's page tables, each
//! page translated once per walk (a walk reads a few words from each of a few pages).

use crate::arch::Arch;
use crate::guest_memory::GuestPhysMemory;
use crate::probe::ProbeContext;
use crate::unwind::UnwindStop;

/// Pages a walk keeps translated (a walk touches the task stack, an IRQ stack and a few
/// kernel data pages).
const CACHED_PAGES: usize = 8;

/// Reads guest virtual memory of one hit's address space, caching page translations.
pub struct StackReader<'a, A: Arch> {
    mem: &'a dyn GuestPhysMemory,
    space: A::AddressSpace,
    /// (page virtual address, page guest physical address, page size), most recent last.
    pages: Vec<(u64, u64, u64)>,
    /// Page walks done (for figures and tests).
    pub walks: u32,
}

impl<'a, A: Arch> StackReader<'a, A> {
    /// A reader over the memory and address space of `ctx`'s hit.
    pub fn new(ctx: &ProbeContext<'a, A>) -> StackReader<'a, A> {
        StackReader::over(ctx.mem, A::address_space(ctx.regs))
    }

    /// A reader over `mem` through the page tables of `space`.
    pub fn over(mem: &'a dyn GuestPhysMemory, space: A::AddressSpace) -> StackReader<'a, A> {
        StackReader {
            mem,
            space,
            pages: Vec::with_capacity(CACHED_PAGES),
            walks: 0,
        }
    }

    fn physical(&mut self, va: u64) -> Result<(u64, u64), UnwindStop> {
        if let Some(&(page, gpa, size)) = self
            .pages
            .iter()
            .rev()
            .find(|(p, _, s)| va & !(s - 1) == *p)
        {
            return Ok((gpa + (va - page), size - (va - page)));
        }
        self.walks += 1;
        let t = A::translate(self.mem, self.space, va).map_err(|_| UnwindStop::Unreadable(va))?;
        let size = t.page_size;
        let page = va & !(size - 1);
        let gpa = t.gpa - (va - page);
        if self.pages.len() == CACHED_PAGES {
            self.pages.remove(0);
        }
        self.pages.push((page, gpa, size));
        Ok((t.gpa, size - (va - page)))
    }

    /// Fills `buf` from `va`.
    pub fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), UnwindStop> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = va.wrapping_add(done as u64);
            let (gpa, room) = self.physical(at)?;
            let n = (room as usize).min(buf.len() - done);
            if !self.mem.read_phys(gpa, &mut buf[done..done + n]) {
                return Err(UnwindStop::Unreadable(at));
            }
            done += n;
        }
        Ok(())
    }

    /// The little-endian u64 at `va`.
    pub fn read_u64(&mut self, va: u64) -> Result<u64, UnwindStop> {
        let mut b = [0u8; 8];
        self.read(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The little-endian u32 at `va`.
    pub fn read_u32(&mut self, va: u64) -> Result<u32, UnwindStop> {
        let mut b = [0u8; 4];
        self.read(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}
