//! What a user of the library writes: a [`Probe`] (where, and the Rust handlers to run), and
//! the [`ProbeContext`] a handler sees at a hit (registers, guest memory, which probe, which
//! vCPU).

use std::sync::Arc;
use std::time::Duration;

use crate::arch::{Arch, Host, RegisterFile};
use crate::guest_memory::GuestPhysMemory;

/// An error a handler returns; counted per probe and reported, the guest goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

impl From<String> for HandlerError {
    fn from(s: String) -> Self {
        HandlerError(s)
    }
}

impl From<&str> for HandlerError {
    fn from(s: &str) -> Self {
        HandlerError(s.to_string())
    }
}

/// A pre- or post-handler.
pub type Handler<A = Host> =
    Arc<dyn Fn(&ProbeContext<'_, A>) -> Result<(), HandlerError> + Send + Sync>;

/// Which trap a probe uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrapKind {
    /// A breakpoint instruction written over the probed one (`int3`, `BRK`); unlimited.
    #[default]
    Software,
    /// A hardware execute breakpoint (debug registers); as many addresses as the CPU has
    /// breakpoints (four on x86_64), guest text untouched.
    Hardware,
}

/// A probe: a location in guest kernel text and what to run when a vCPU reaches it.
pub struct Probe<A: Arch = Host> {
    /// Where, as the user wrote it (`SYMBOL[+OFF]` or an address).
    pub location: String,
    /// Which trap.
    pub trap: TrapKind,
    /// Runs before the probed instruction.
    pub pre: Option<Handler<A>>,
    /// Runs after the probed instruction.
    pub post: Option<Handler<A>>,
    /// Makes this a return probe (the location must be a function entry): runs when the
    /// function returns, with the entry registers in [`ProbeContext::entry_regs`].
    pub on_return: Option<Handler<A>>,
    /// Most live instances of a return probe; further entries are counted as `nmissed`.
    pub max_active: usize,
    /// The handlers need nothing but what a jump record holds (registers, the current task,
    /// stack words; [`crate::jump`]): the engine may plant a jump instead of a trap where the
    /// site allows, and run the handlers when the host drains the record. No exit.
    pub in_guest: bool,
    /// For a probe that may run in the guest: its handlers' task filter, evaluated in the
    /// trampoline so that hits it leaves out take no ring space (they still count as hits).
    pub record_filter: Option<crate::definition::TaskFilter>,
    /// Makes this a data watchpoint on the location's bytes (a hardware debug slot): the
    /// handlers run after each access, with [`ProbeContext::watch`] saying what changed.
    pub watch: Option<crate::definition::WatchSpec>,
    /// Makes this a write-protected region of the location's bytes (the pages holding them
    /// read-only to the guest): the handlers run at each write to them, with
    /// [`ProbeContext::watch`] saying what was written and whether it was let through.
    pub protect: Option<crate::protect::ProtectSpec>,
}

/// Live return-probe instances per probe when not set (kretprobe's floor).
pub use crate::definition::DEFAULT_MAX_ACTIVE;

impl<A: Arch> Clone for Probe<A> {
    fn clone(&self) -> Self {
        Probe {
            location: self.location.clone(),
            trap: self.trap,
            pre: self.pre.clone(),
            post: self.post.clone(),
            on_return: self.on_return.clone(),
            max_active: self.max_active,
            in_guest: self.in_guest,
            record_filter: self.record_filter.clone(),
            watch: self.watch,
            protect: self.protect,
        }
    }
}

impl<A: Arch> std::fmt::Debug for Probe<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("location", &self.location)
            .field("trap", &self.trap)
            .field("pre", &self.pre.is_some())
            .field("post", &self.post.is_some())
            .field("on_return", &self.on_return.is_some())
            .field("max_active", &self.max_active)
            .field("in_guest", &self.in_guest)
            .finish()
    }
}

impl<A: Arch> Probe<A> {
    /// A probe at `location` with no handlers yet (it still counts hits).
    pub fn new(location: impl Into<String>) -> Probe<A> {
        Probe {
            location: location.into(),
            trap: TrapKind::Software,
            pre: None,
            post: None,
            on_return: None,
            max_active: DEFAULT_MAX_ACTIVE,
            in_guest: false,
            record_filter: None,
            watch: None,
            protect: None,
        }
    }

    /// Lets the engine run this probe without an exit (a jump plan) where its site allows:
    /// say so only when every handler reads no more than a jump record holds.
    pub fn in_guest(mut self) -> Probe<A> {
        self.in_guest = true;
        self
    }

    /// A probe from a kprobe_events definition (`p:grp/ev do_sys_openat2 ...`,
    /// `r16 vfs_read ...`), with the definition for the caller's handlers to evaluate its
    /// fetch arguments ([`crate::fetch::format_args`]). A return definition gives a return
    /// probe with its MAXACTIVE; add handlers with [`Probe::on_hit`] / [`Probe::on_return`].
    pub fn parse(
        definition: &str,
    ) -> Result<(Probe<A>, crate::definition::ProbeDefinition), crate::definition::DefinitionError>
    {
        let def = crate::definition::ProbeDefinition::parse(definition)?;
        let mut probe = Probe::new(def.location_text());
        probe.watch = def.watch();
        if let Some(n) = def.max_active() {
            probe = probe.on_return(|_| Ok(())).max_active(n);
        }
        Ok((probe, def))
    }

    /// Makes this a return probe with handler `f`.
    pub fn on_return(
        mut self,
        f: impl Fn(&ProbeContext<'_, A>) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Probe<A> {
        self.on_return = Some(Arc::new(f));
        self
    }

    /// Sets the most live instances of a return probe.
    pub fn max_active(mut self, n: usize) -> Probe<A> {
        self.max_active = n.max(1);
        self
    }

    /// Sets the handler that runs before the probed instruction.
    pub fn on_hit(
        mut self,
        f: impl Fn(&ProbeContext<'_, A>) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Probe<A> {
        self.pre = Some(Arc::new(f));
        self
    }

    /// Sets the handler that runs after the probed instruction.
    pub fn after(
        mut self,
        f: impl Fn(&ProbeContext<'_, A>) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Probe<A> {
        self.post = Some(Arc::new(f));
        self
    }

    /// Uses a hardware breakpoint instead of `int3`.
    pub fn hardware(mut self) -> Probe<A> {
        self.trap = TrapKind::Hardware;
        self
    }
}

/// Reads guest virtual memory through the page tables of `space`, page by page.
pub(crate) fn read_virt<A: Arch>(
    mem: &dyn GuestPhysMemory,
    space: A::AddressSpace,
    va: u64,
    buf: &mut [u8],
) -> Result<(), HandlerError> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = va.wrapping_add(done as u64);
        let t = A::translate(mem, space, at)
            .map_err(|e| HandlerError(format!("reading guest memory: {e}")))?;
        let in_page = (t.page_size - (at & (t.page_size - 1))) as usize;
        let n = in_page.min(buf.len() - done);
        if !mem.read_phys(t.gpa, &mut buf[done..done + n]) {
            return Err(HandlerError(format!(
                "reading guest memory: {at:#x} maps to {:#x}, outside guest memory",
                t.gpa
            )));
        }
        done += n;
    }
    Ok(())
}

/// What a handler sees at a hit.
pub struct ProbeContext<'a, A: Arch = Host> {
    /// The vCPU that hit the probe.
    pub vcpu: u32,
    /// The probe's location as the user wrote it.
    pub location: &'a str,
    /// The probed address.
    pub address: u64,
    /// Time since the engine started.
    pub time: Duration,
    /// The registers at the hit (before the probed instruction for pre-handlers, after it for
    /// post-handlers).
    pub regs: &'a A::Registers,
    /// For a return probe's handler: the registers at function entry.
    pub entry_regs: Option<&'a A::Registers>,
    pub(crate) mem: &'a dyn GuestPhysMemory,
    /// The real return addresses behind hvprobe's return-probe trampoline, for stack walks.
    pub(crate) returns: ReturnRecovery<'a>,
    /// For a hit drained from a jump record: the only guest memory the handlers may read
    /// (the live memory has moved on since).
    pub(crate) recorded: Option<&'a crate::jump::RecordedMemory>,
    /// For a watchpoint's handler: the access it saw.
    pub watch: Option<WatchRecord>,
}

/// What a watchpoint or a protected region saw: the bytes before and after the access. For a
/// watchpoint's write, `old` is what the engine last saw there (at planting or the previous
/// hit), so a write through another mapping of the same memory in between shows up in `old`
/// rather than as a hit of its own. For a protected region, `new` is what the guest wrote,
/// whether or not it was let through (`action`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRecord {
    /// The address of the first byte (the watched one, or the first protected byte written).
    pub address: u64,
    /// The bytes before.
    pub old: Vec<u8>,
    /// The bytes after (the guest's, for a protected region).
    pub new: Vec<u8>,
    /// The accessing instruction, where the architecture reports it (arm64: the PC of the
    /// watchpoint exception or the faulting store); on x86_64 only the PC after it is known.
    pub writer: Option<u64>,
    /// For a write to a protected region: whether it was completed or dropped.
    pub action: Option<crate::protect::ProtectAction>,
}

impl WatchRecord {
    /// Bytes accessed.
    pub fn len(&self) -> usize {
        self.new.len()
    }

    /// Whether no byte was accessed.
    pub fn is_empty(&self) -> bool {
        self.new.is_empty()
    }

    /// The bytes before as a little-endian number (the first eight).
    pub fn old_value(&self) -> u64 {
        crate::guest_memory::le_value(&self.old)
    }

    /// The bytes after as a little-endian number (the first eight).
    pub fn new_value(&self) -> u64 {
        crate::guest_memory::le_value(&self.new)
    }
}

/// How a stack walk gets back a return address that one of hvprobe's return probes replaced
/// with its trampoline (Linux's `unwind_recover_ret_addr` for its own kretprobes).
#[derive(Clone, Copy, Default)]
pub struct ReturnRecovery<'a> {
    /// The trampoline's address, once return probes are in use.
    pub(crate) trampoline: Option<u64>,
    /// The live instance whose frame holds stack address `at` (the nearest entry key at or
    /// above it on the same stack): its real return address.
    pub(crate) lookup: Option<&'a (dyn Fn(u64) -> Option<u64> + Sync)>,
    /// A return probe's own instance, gone from the table by its handler: (key, address).
    pub(crate) own: Option<(u64, u64)>,
}

impl ReturnRecovery<'_> {
    /// The return address `value`, read at stack address `at`, with the trampoline replaced
    /// by the address it stands for (unchanged when no instance is known).
    pub fn real(&self, at: u64, value: u64) -> u64 {
        if self.trampoline != Some(value) {
            return value;
        }
        if let Some((key, real)) = self.own
            && key >= at
            && key - at < A_STACK
        {
            return real;
        }
        self.lookup.and_then(|f| f(at)).unwrap_or(value)
    }
}

/// No frame of one function spans more than a task stack.
const A_STACK: u64 = 16 << 10;

impl<'a, A: Arch> ProbeContext<'a, A> {
    /// For a return probe: the same hit seen with the entry registers (to evaluate the entry's
    /// arguments at return time).
    pub fn entry_context(&self) -> Option<ProbeContext<'a, A>> {
        self.entry_regs.map(|regs| ProbeContext {
            vcpu: self.vcpu,
            location: self.location,
            address: self.address,
            time: self.time,
            regs,
            entry_regs: None,
            mem: self.mem,
            returns: self.returns,
            recorded: self.recorded,
            watch: self.watch.clone(),
        })
    }

    /// Argument `n` (0-based) of the probed function (the kernel's calling convention), valid
    /// at its entry.
    pub fn arg(&self, n: usize) -> Option<u64> {
        self.regs.arg(n)
    }

    /// Reads guest virtual memory of the current address space.
    pub fn read_memory(&self, va: u64, buf: &mut [u8]) -> Result<(), HandlerError> {
        if let Some(r) = self.recorded {
            return if r.read(va, buf) {
                Ok(())
            } else {
                Err(HandlerError(format!(
                    "{va:#x} was not recorded at the hit (a jump-plan hit holds registers, the task and stack words)"
                )))
            };
        }
        read_virt::<A>(self.mem, A::address_space(self.regs), va, buf)
    }

    /// Reads a little-endian u64 at `va`.
    pub fn read_u64(&self, va: u64) -> Result<u64, HandlerError> {
        let mut b = [0u8; 8];
        self.read_memory(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a NUL-terminated string at `va`, at most `max` bytes, lossily as UTF-8.
    pub fn read_c_string(&self, va: u64, max: usize) -> Result<String, HandlerError> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 64];
        while out.len() < max {
            let at = va.wrapping_add(out.len() as u64);
            // Stay inside the page so an unmapped next page does not fail a short string.
            let room = (4096 - (at & 4095)) as usize;
            let n = room.min(chunk.len()).min(max - out.len());
            self.read_memory(at, &mut chunk[..n])?;
            if let Some(end) = chunk[..n].iter().position(|b| *b == 0) {
                out.extend_from_slice(&chunk[..end]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&chunk[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse_from_definitions() {
        let (p, def) = Probe::<crate::arch::x86_64::X86_64>::parse(
            "p:hv/open do_sys_openat2+4 name=+0($arg2):ustring",
        )
        .unwrap();
        assert_eq!(p.location, "do_sys_openat2+0x4");
        assert!(p.on_return.is_none());
        assert_eq!(def.args[0].name, "name");
        let (r, _) = Probe::<crate::arch::x86_64::X86_64>::parse("r8 vfs_read").unwrap();
        assert!(r.on_return.is_some());
        assert_eq!(r.max_active, 8);
        let err = Probe::<crate::arch::x86_64::X86_64>::parse("q vfs_read").unwrap_err();
        assert_eq!(err.column, 0);
    }
}
