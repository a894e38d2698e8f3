//! The jump plan (zero-exit probes): a probed instruction replaced by a jump into a trampoline
//! the host wrote into its own read-only guest pages. The trampoline records the hit in a
//! per-CPU ring in hvprobe's writable guest pages, runs the displaced instruction and jumps
//! back; a host thread drains the rings into the same handlers as an exit's hit. No exit.
//!
//! This module holds what every architecture shares: the ring area's layout, the record
//! format, what a trampoline is told when it is generated ([`TrampolineSpec`]), the memory a
//! record stands for at drain time ([`RecordedMemory`]), and which definitions can run this
//! way ([`in_guest_refusal`]). Each architecture generates its trampolines
//! ([`crate::arch::Arch::jump_patch`]).
//!
//! Ring area (guest physical and virtual, contiguous): two counters pages (a `u64` of missed
//! hits per jump site, by tag, the last `u64` counting hits on a CPU past the last ring; then a
//! `u64` per site of hits its task filter left out), then
//! one ring per CPU: a 64-byte header (`head` written by the trampoline, `tail` by the host,
//! `missed` when full, `nesting` the recursion guard), then `records` records of
//! [`RECORD_SIZE`] bytes. A record is published by advancing `head` after its bytes are
//! written; the host reads records up to `head` and then stores `tail`.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::definition::{Fetch, FetchType, ProbeDefinition, TaskField, TaskFilter};

/// Bytes of one record.
pub const RECORD_SIZE: u64 = 512;
/// Bytes of a ring's header.
pub const RING_HEADER: u64 = 64;
/// Most jump sites in one run: one missed counter each in the counters page.
pub const MAX_JUMP_SITES: u32 = 511;
/// Stack words a record holds (`$stack0` .. `$stack15`).
pub const STACK_WORDS: usize = 16;
/// Register words a record holds (the architecture decides their order).
pub const REG_WORDS: usize = 36;

/// Offsets in a ring's header.
pub mod header {
    /// Records published (the trampoline's write index).
    pub const HEAD: u64 = 0;
    /// Records consumed (the host's read index).
    pub const TAIL: u64 = 8;
    /// Hits dropped because the ring was full or the trampoline was nested.
    pub const MISSED: u64 = 16;
    /// The recursion guard: non-zero while a trampoline on this CPU is recording.
    pub const NESTING: u64 = 24;
}

/// Offsets in a record.
pub mod record {
    /// `u32`: the jump site's tag.
    pub const TAG: u64 = 0;
    /// `u32`: [`super::FLAG_TASK`] and one bit per stack word read.
    pub const FLAGS: u64 = 4;
    /// `u64`: the CPU's time stamp counter (TSC, CNTVCT_EL0).
    pub const TIME: u64 = 8;
    /// [`super::REG_WORDS`] `u64`s: the registers at the hit.
    pub const REGS: u64 = 16;
    /// `u64`: the current task pointer.
    pub const TASK: u64 = REGS + 8 * super::REG_WORDS as u64;
    /// `u64`: where the task pointer was read from (x86_64: the per-CPU base).
    pub const TASK_FROM: u64 = TASK + 8;
    /// `u32` pid, then `u32` tgid.
    pub const PID: u64 = TASK_FROM + 8;
    /// `u32` tgid.
    pub const TGID: u64 = PID + 4;
    /// 16 bytes: `comm`.
    pub const COMM: u64 = TGID + 4;
    /// [`super::STACK_WORDS`] `u64`s from the stack pointer up.
    pub const STACK: u64 = COMM + 16;
}

/// Flag: the task's pid, tgid and comm were read.
pub const FLAG_TASK: u32 = 1 << 31;

const PAGE: u64 = 4096;
/// Pages of per-site counters before the rings.
const COUNTER_PAGES: u64 = 2;

/// Errors of the jump plan's set-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JumpError {
    /// The ring size is not a power of two in range.
    #[error("a ring of {0} records: give a power of two from 2 to 65536")]
    RingSize(u64),
    /// Too many jump sites.
    #[error("more than {MAX_JUMP_SITES} jump sites")]
    TooManySites,
}

/// Where the rings are and how big.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Guest virtual address of the area (the counters page).
    pub va: u64,
    /// Guest physical address of the area.
    pub gpa: u64,
    /// CPUs (one ring each).
    pub cpus: u32,
    /// Records per ring (a power of two).
    pub records: u64,
}

impl RingLayout {
    /// A layout of `cpus` rings of `records` records at `va`/`gpa`.
    pub fn new(va: u64, gpa: u64, cpus: u32, records: u64) -> Result<RingLayout, JumpError> {
        if !records.is_power_of_two() || !(2..=65536).contains(&records) {
            return Err(JumpError::RingSize(records));
        }
        Ok(RingLayout {
            va,
            gpa,
            cpus: cpus.max(1),
            records,
        })
    }

    /// Bytes the area needs for `cpus` rings of `records` records, in whole pages.
    pub fn bytes_for(cpus: u32, records: u64) -> u64 {
        let stride = RING_HEADER + records * RECORD_SIZE;
        (COUNTER_PAGES * PAGE + u64::from(cpus.max(1)) * stride).div_ceil(PAGE) * PAGE
    }

    /// Bytes of the area.
    pub fn bytes(&self) -> u64 {
        RingLayout::bytes_for(self.cpus, self.records)
    }

    /// Bytes from one ring to the next.
    pub fn stride(&self) -> u64 {
        RING_HEADER + self.records * RECORD_SIZE
    }

    /// Offset of CPU `cpu`'s ring header from the area's start.
    pub fn ring_offset(&self, cpu: u32) -> u64 {
        COUNTER_PAGES * PAGE + u64::from(cpu) * self.stride()
    }

    /// Offset of jump site `tag`'s missed counter.
    pub fn site_missed_offset(tag: u32) -> u64 {
        u64::from(tag) * 8
    }

    /// Offset of jump site `tag`'s count of hits its task filter left out.
    pub fn site_filtered_offset(tag: u32) -> u64 {
        PAGE + u64::from(tag) * 8
    }

    /// The count of hits site `tag`'s task filter left out (hits all the same).
    pub fn site_filtered<M: GuestMemory>(&self, mem: &M, tag: u32) -> u64 {
        read_u64(mem, self.gpa + RingLayout::site_filtered_offset(tag))
    }

    /// Offset of the counter of hits on a CPU that has no ring.
    pub const NO_RING_OFFSET: u64 = PAGE - 8;

    /// Zeroes the area (at set-up, before any trampoline exists).
    pub fn clear<M: GuestMemory>(&self, mem: &M) -> bool {
        mem.write_slice(&vec![0u8; self.bytes() as usize], GuestAddress(self.gpa))
            .is_ok()
    }

    /// The missed count of site `tag` as the trampolines left it.
    pub fn site_missed<M: GuestMemory>(&self, mem: &M, tag: u32) -> u64 {
        read_u64(mem, self.gpa + RingLayout::site_missed_offset(tag))
    }

    /// Hits dropped on a CPU past the last ring, and hits dropped by full or nested rings.
    pub fn dropped<M: GuestMemory>(&self, mem: &M) -> (u64, u64) {
        let no_ring = read_u64(mem, self.gpa + RingLayout::NO_RING_OFFSET);
        let full = (0..self.cpus)
            .map(|c| read_u64(mem, self.gpa + self.ring_offset(c) + header::MISSED))
            .sum();
        (no_ring, full)
    }

    /// Takes every record published in CPU `cpu`'s ring, oldest first, and hands each to `f`;
    /// then tells the trampolines the space is free. Returns how many.
    pub fn drain<M: GuestMemory>(
        &self,
        mem: &M,
        cpu: u32,
        mut f: impl FnMut(&JumpRecord),
    ) -> usize {
        let ring = self.gpa + self.ring_offset(cpu);
        let head: u64 = mem
            .load(
                GuestAddress(ring + header::HEAD),
                std::sync::atomic::Ordering::Acquire,
            )
            .unwrap_or(0);
        let tail = read_u64(mem, ring + header::TAIL);
        // The guest writes these pages and could write anything: never read more than a ring.
        let count = head.wrapping_sub(tail).min(self.records);
        let mut buf = [0u8; RECORD_SIZE as usize];
        for i in 0..count {
            let index = tail.wrapping_add(head.wrapping_sub(tail) - count + i) & (self.records - 1);
            let at = ring + RING_HEADER + index * RECORD_SIZE;
            if mem.read_slice(&mut buf, GuestAddress(at)).is_ok() {
                f(&JumpRecord::parse(&buf));
            }
        }
        let _ = mem.store(
            head,
            GuestAddress(ring + header::TAIL),
            std::sync::atomic::Ordering::Release,
        );
        count as usize
    }
}

fn read_u64<M: GuestMemory>(mem: &M, gpa: u64) -> u64 {
    mem.read_obj::<u64>(GuestAddress(gpa)).unwrap_or(0)
}

/// Where the guest keeps what a trampoline reads about the current CPU and task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestAnchors {
    /// Per-CPU offset of the CPU's number (x86_64 `cpu_number`).
    pub cpu_number: Option<u64>,
    /// Per-CPU offset of the current task pointer (x86_64 `current_task`).
    pub current_task: Option<u64>,
    /// Per-CPU offset of the per-CPU base (x86_64 `this_cpu_off`).
    pub this_cpu_off: Option<u64>,
    /// `task_struct` offsets of pid, tgid, comm and the stack pointer (`stack`), from BTF.
    pub task: Option<TaskOffsets>,
    /// Bytes of a task's kernel stack (THREAD_SIZE).
    pub thread_size: u64,
}

/// `task_struct` member offsets a trampoline reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `pid`.
    pub pid: u64,
    /// `tgid`.
    pub tgid: u64,
    /// `comm`.
    pub comm: u64,
    /// `stack`: the base of the task's kernel stack.
    pub stack: u64,
}

/// A task filter as a trampoline tests it: the words of `task_struct` compared with constants,
/// each architecture encoding the comparisons its own way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterTest {
    /// `comm`: the 16 bytes at `at` (the kernel pads the name with NULs, as `strscpy_pad`
    /// leaves it) against the name's two NUL-padded little-endian halves.
    Comm {
        /// Offset of `comm` in `task_struct`.
        at: u64,
        /// The name's first and second eight bytes.
        halves: [u64; 2],
    },
    /// `pid` or `tgid`: the `u32` at `at` against `value`.
    Word {
        /// Offset of the field in `task_struct`.
        at: u64,
        /// The number compared with.
        value: u32,
    },
    /// A name longer than any task's (TASK_COMM_LEN - 1): never equal.
    NeverEqual,
}

impl FilterTest {
    /// The test of filter `f` against a task laid out as `t`, and whether a match passes
    /// (`==`) or is left out (`!=`).
    pub fn of(f: &TaskFilter, t: &TaskOffsets) -> Result<(FilterTest, bool), &'static str> {
        let test = match f.field {
            TaskField::Comm => {
                let name = f.value.as_bytes();
                if name.len() >= 16 {
                    FilterTest::NeverEqual
                } else {
                    let mut padded = [0u8; 16];
                    padded[..name.len()].copy_from_slice(name);
                    let half = |h: usize| {
                        u64::from_le_bytes(padded[h * 8..h * 8 + 8].try_into().expect("8 bytes"))
                    };
                    FilterTest::Comm {
                        at: t.comm,
                        halves: [half(0), half(1)],
                    }
                }
            }
            TaskField::Pid | TaskField::Tgid => FilterTest::Word {
                at: if f.field == TaskField::Pid {
                    t.pid
                } else {
                    t.tgid
                },
                value: f
                    .value
                    .parse()
                    .map_err(|_| "a pid filter compares with a number")?,
            },
        };
        Ok((test, f.equal))
    }
}

/// What a trampoline is generated for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrampolineSpec {
    /// The site's tag, written into each record.
    pub tag: u32,
    /// The probed address.
    pub site: u64,
    /// Where the trampoline starts.
    pub at: u64,
    /// The rings.
    pub rings: RingLayout,
    /// The guest's per-CPU and task anchors.
    pub anchors: GuestAnchors,
    /// The probe's task filter, evaluated in the trampoline: a hit it leaves out is only
    /// counted, never recorded.
    pub filter: Option<TaskFilter>,
}

/// A jump site: the trampoline's bytes and the bytes that replace the probed instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpPatch {
    /// The trampoline, to be written at [`TrampolineSpec::at`].
    pub trampoline: Vec<u8>,
    /// What is written over the start of the probed instruction.
    pub site: Vec<u8>,
}

/// One hit as a trampoline recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpRecord {
    /// The jump site's tag.
    pub tag: u32,
    /// [`FLAG_TASK`] and the stack words read.
    pub flags: u32,
    /// The time stamp counter.
    pub time: u64,
    /// The registers, in the architecture's order.
    pub regs: [u64; REG_WORDS],
    /// The current task pointer.
    pub task: u64,
    /// Where it was read from.
    pub task_from: u64,
    /// The task's pid.
    pub pid: u32,
    /// The task's tgid.
    pub tgid: u32,
    /// The task's comm.
    pub comm: [u8; 16],
    /// Stack words from the stack pointer up.
    pub stack: [u64; STACK_WORDS],
}

impl JumpRecord {
    /// A record from its bytes.
    pub fn parse(b: &[u8; RECORD_SIZE as usize]) -> JumpRecord {
        let u32_at = |o: u64| u32::from_le_bytes(b[o as usize..o as usize + 4].try_into().unwrap());
        let u64_at = |o: u64| u64::from_le_bytes(b[o as usize..o as usize + 8].try_into().unwrap());
        JumpRecord {
            tag: u32_at(record::TAG),
            flags: u32_at(record::FLAGS),
            time: u64_at(record::TIME),
            regs: std::array::from_fn(|i| u64_at(record::REGS + 8 * i as u64)),
            task: u64_at(record::TASK),
            task_from: u64_at(record::TASK_FROM),
            pid: u32_at(record::PID),
            tgid: u32_at(record::TGID),
            comm: b[record::COMM as usize..record::COMM as usize + 16]
                .try_into()
                .unwrap(),
            stack: std::array::from_fn(|i| u64_at(record::STACK + 8 * i as u64)),
        }
    }

    /// The guest memory this record stands for: the task pointer where it was read, the task's
    /// pid, tgid and comm, and the stack words read, at their guest virtual addresses.
    pub fn memory(&self, sp: u64, anchors: &GuestAnchors) -> RecordedMemory {
        let mut m = RecordedMemory::default();
        if self.flags & FLAG_TASK != 0
            && let Some(t) = anchors.task
        {
            if let Some(off) = anchors.current_task {
                m.add(self.task_from.wrapping_add(off), &self.task.to_le_bytes());
            }
            m.add(self.task.wrapping_add(t.pid), &self.pid.to_le_bytes());
            m.add(self.task.wrapping_add(t.tgid), &self.tgid.to_le_bytes());
            m.add(self.task.wrapping_add(t.comm), &self.comm);
        }
        for (k, w) in self.stack.iter().enumerate() {
            if self.flags & (1 << k) != 0 {
                m.add(sp.wrapping_add(8 * k as u64), &w.to_le_bytes());
            }
        }
        m
    }
}

/// Guest virtual memory as a record holds it: reads of anything else fail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedMemory {
    ranges: Vec<(u64, Vec<u8>)>,
}

impl RecordedMemory {
    /// Adds `bytes` at `va`.
    pub fn add(&mut self, va: u64, bytes: &[u8]) {
        self.ranges.push((va, bytes.to_vec()));
    }

    /// Fills `buf` from `va`, byte by byte from whichever range holds it; false if any byte
    /// was not recorded.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> bool {
        buf.iter_mut().enumerate().all(|(i, b)| {
            let at = va.wrapping_add(i as u64);
            self.ranges.iter().any(|(start, bytes)| {
                match at.checked_sub(*start).map(|o| o as usize) {
                    Some(o) if o < bytes.len() => {
                        *b = bytes[o];
                        true
                    }
                    _ => false,
                }
            })
        })
    }
}

/// Why a definition's work cannot run in the guest (so its probe takes an exit), or `None`:
/// registers, `$argN`, `$stackN` (N < 16), `$stack`, `$comm`, `$retval` and the task filter
/// are recorded; a memory dereference, a string, or `@SYMBOL` would read memory the
/// trampoline cannot read without risking a fault.
pub fn in_guest_refusal(def: &ProbeDefinition) -> Option<&'static str> {
    if def.max_active().is_some() {
        return Some("return probes take exits");
    }
    if def.stacktrace {
        return Some("stacktrace is unwound from the host at an exit");
    }
    for a in &def.args {
        if matches!(a.ty, FetchType::String | FetchType::UserString) && a.fetch != Fetch::Comm {
            return Some("a string fetch reads guest memory");
        }
        match &a.fetch {
            // A trampoline reads NZCV, DAIF and the mode, not PAN, SSBS, BTYPE and the other
            // PSTATE bits (no one instruction reads them on every CPU).
            Fetch::Register(r) if r == "pstate" => {
                return Some("PSTATE is read whole at an exit");
            }
            Fetch::Register(_)
            | Fetch::StackPointer
            | Fetch::ReturnValue
            | Fetch::Argument(_)
            | Fetch::Comm => {}
            Fetch::StackEntry(n) if (*n as usize) < STACK_WORDS => {}
            Fetch::StackEntry(_) => return Some("$stackN past $stack15 is read at an exit"),
            Fetch::Memory(_) | Fetch::SymbolMemory { .. } | Fetch::Dereference { .. } => {
                return Some("a memory dereference is read at an exit");
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn records_round_trip_through_a_ring_and_a_full_ring_is_never_overread() {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).unwrap();
        let rings = RingLayout::new(0xffff_0000, 0x10_0000, 2, 4).unwrap();
        assert!(rings.bytes() <= 0x10_0000 && rings.clear(&mem));
        let ring = rings.gpa + rings.ring_offset(1);
        // Six records published into a ring of four: only the last four are there.
        for n in 0..6u64 {
            let at = ring + RING_HEADER + (n & 3) * RECORD_SIZE;
            mem.write_obj(n as u32 + 100, GuestAddress(at)).unwrap();
        }
        mem.write_obj(6u64, GuestAddress(ring + header::HEAD))
            .unwrap();
        let mut tags = Vec::new();
        assert_eq!(rings.drain(&mem, 1, |r| tags.push(r.tag)), 4);
        assert_eq!(tags, vec![102, 103, 104, 105]);
        assert_eq!(rings.drain(&mem, 1, |_| panic!("nothing new")), 0);
        assert_eq!(rings.drain(&mem, 0, |_| panic!("ring 0 is empty")), 0);
    }

    #[test]
    fn recorded_memory_serves_only_what_was_recorded() {
        let mut rec = JumpRecord::parse(&[0u8; RECORD_SIZE as usize]);
        rec.flags = FLAG_TASK | 0b101;
        rec.task = 0x1000;
        rec.task_from = 0x500;
        rec.pid = 7;
        rec.comm[..3].copy_from_slice(b"sh\0");
        rec.stack[0] = 11;
        rec.stack[2] = 33;
        let anchors = GuestAnchors {
            current_task: Some(0x20),
            task: Some(TaskOffsets {
                pid: 0x10,
                tgid: 0x14,
                comm: 0x40,
                stack: 0x8,
            }),
            ..Default::default()
        };
        let m = rec.memory(0x9000, &anchors);
        let mut b = [0u8; 8];
        assert!(m.read(0x520, &mut b) && u64::from_le_bytes(b) == 0x1000);
        assert!(m.read(0x9010, &mut b) && u64::from_le_bytes(b) == 33);
        assert!(!m.read(0x9008, &mut b), "stack word 1 was not read");
        let mut p = [0u8; 4];
        assert!(m.read(0x1010, &mut p) && u32::from_le_bytes(p) == 7);
        assert!(!m.read(0x1030, &mut p));
    }

    #[test]
    fn definitions_that_read_memory_take_exits() {
        let ok = |s: &str| in_guest_refusal(&ProbeDefinition::parse(s).unwrap());
        assert_eq!(
            ok("p:a/b f a=$arg1 c=$comm s=$stack3 r=%di:x32 sp=$stack"),
            None
        );
        assert!(ok("p:a/b f s=+0($arg2):ustring").is_some());
        assert!(ok("p:a/b f s=+8($arg3)").is_some());
        assert!(ok("p:a/b f s=@jiffies").is_some());
        assert!(ok("p:a/b f s=$stack16").is_some());
        assert!(ok("r:a/b f").is_some());
        assert!(ok("p:a/b f stacktrace").is_some());
        assert!(ok("p:a/b f p=%pstate").unwrap().contains("PSTATE"));
        assert_eq!(ok("p:a/b f x=%x30 pc=%pc"), None);
    }
}
