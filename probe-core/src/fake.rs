//! Fake machines for tests and benchmarks of the engine, one per architecture: real
//! `GuestMemoryMmap` memory with hand-made page tables mapping a page of kernel text and a
//! stack page, an XOL area, and a vCPU whose registers live in a struct. No KVM.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{Gpr, Registers, X86_64};
use crate::arch::{Arch, RegisterFile};
use crate::engine::ProbeEngine;
use crate::probe::ProbeContext;
use crate::vm::{VcpuAccess, VcpuError};
use crate::xol::XolArea;

/// Virtual address of the fake kernel text.
pub const TEXT_VA: u64 = 0xffff_ffff_8100_0000;
/// Where the text lives in guest memory.
pub const TEXT_GPA: u64 = 0x10000;
/// Virtual address of the stack page.
pub const STACK_VA: u64 = 0xffff_ffff_8100_2000;
/// Where the stack page lives.
pub const STACK_GPA: u64 = 0x12000;
/// Guest physical base of the XOL area.
pub const XOL_GPA: u64 = 0x4000_0000;
/// The page-table root.
pub const CR3: u64 = 0x1000;

/// The fake text: `endbr64; push %rbp; mov %rsp,%rbp; mov 0x100(%rip),%rax; call *%rax; popfq; ret`.
pub const CODE: &[u8] = &[
    0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0xff,
    0xd0, 0x9d, 0xc3,
];
/// Offset of `push %rbp`.
pub const AT_PUSH: u64 = 4;
/// Offset of the RIP-relative `mov`.
pub const AT_RIPREL: u64 = 8;
/// Offset of `call *%rax`.
pub const AT_CALL: u64 = 15;
/// Offset of `popfq`.
pub const AT_POPF: u64 = 17;

/// A vCPU whose state is a struct.
pub struct FakeVcpu<A: Arch = X86_64> {
    /// Its registers.
    pub regs: A::Registers,
    /// How many times the engine asked for an interrupt shadow (emulated `sti`).
    pub interrupt_shadows: u32,
    /// Exits on which the engine read every register: a full read, or the control registers
    /// completed. Set back to zero by the test that counts.
    pub full_reads: u32,
    /// Whether [`VcpuAccess::exit_registers`] leaves the general-purpose registers unread
    /// (as [`UNREAD`]), as the arm64 VMM does, so that a test sees the engine use one it did
    /// not ask for. Benchmarks turn it off to time the engine alone.
    pub lazy: bool,
    /// Whether the engine holds registers whose general-purpose part it has not read.
    partial: bool,
}

/// What the fake vCPU gives for a general-purpose register the engine did not read.
pub const UNREAD: u64 = 0xdead_0000_dead_0000;

impl<A: Arch> FakeVcpu<A> {
    /// A vCPU with these registers.
    pub fn new(regs: A::Registers) -> FakeVcpu<A> {
        FakeVcpu {
            regs,
            interrupt_shadows: 0,
            full_reads: 0,
            lazy: true,
            partial: false,
        }
    }
}

impl<A: Arch> VcpuAccess<A> for FakeVcpu<A> {
    fn id(&self) -> u32 {
        1
    }
    fn registers(&mut self) -> Result<A::Registers, VcpuError> {
        self.full_reads += 1;
        self.partial = false;
        Ok(self.regs.clone())
    }
    /// As the arm64 VMM does: the general-purpose registers are left unread.
    fn exit_registers(&mut self) -> Result<A::Registers, VcpuError> {
        if !self.lazy {
            return self.registers();
        }
        let mut r = self.regs.clone();
        r.general_purpose_mut().fill(UNREAD);
        self.partial = true;
        Ok(r)
    }
    fn complete_registers(&mut self, regs: &mut A::Registers) -> Result<(), VcpuError> {
        if self.partial {
            regs.general_purpose_mut()
                .copy_from_slice(self.regs.general_purpose());
            self.partial = false;
            self.full_reads += 1;
        }
        Ok(())
    }
    /// The control registers came with the exit: only a general-purpose register in `used`
    /// makes it read the rest.
    fn complete_registers_in(
        &mut self,
        regs: &mut A::Registers,
        used: u64,
    ) -> Result<(), VcpuError> {
        let general = regs.general_purpose().len();
        if used & ((1u64 << general) - 1) != 0 {
            self.complete_registers(regs)?;
        }
        Ok(())
    }
    /// Refuses general-purpose registers the engine changed without having read them.
    fn set_registers(&mut self, regs: &A::Registers) -> Result<(), VcpuError> {
        if self.partial {
            if regs.general_purpose().iter().any(|&v| v != UNREAD) {
                return Err(VcpuError::UnreadRegistersWritten);
            }
            let mut written = regs.clone();
            written
                .general_purpose_mut()
                .copy_from_slice(self.regs.general_purpose());
            self.regs = written;
        } else {
            self.regs = regs.clone();
        }
        Ok(())
    }
    fn block_interrupts_once(&mut self) -> Result<(), VcpuError> {
        self.interrupt_shadows += 1;
        Ok(())
    }
}

/// Data pages of the x86_64 fake machine's XOL area: room for [`jump_rings`].
pub const JUMP_RING_PAGES: u64 = 2;

/// Per-CPU and `task_struct` offsets for the jump plan's trampolines, as in Debian's 6.1
/// x86_64 kernel.
pub fn jump_anchors() -> crate::jump::GuestAnchors {
    crate::jump::GuestAnchors {
        cpu_number: Some(0x19160),
        current_task: Some(0x1fb80),
        this_cpu_off: Some(0x19168),
        task: Some(crate::jump::TaskOffsets {
            pid: 0x5a8,
            tgid: 0x5ac,
            comm: 0x7a8,
            stack: 0x18,
        }),
        thread_size: 16384,
    }
}

/// The jump plan's rings in the x86_64 fake machine's XOL data pages: one CPU, 4 records.
pub fn jump_rings() -> crate::jump::RingLayout {
    let layout = <X86_64 as crate::arch::Arch>::XOL;
    let code = 4 * 4096;
    crate::jump::RingLayout::new(
        layout.va_base + code,
        XOL_GPA + layout.table_pages * 4096 + code,
        1,
        4,
    )
    .unwrap()
}

/// An x86_64 engine over the fake memory and a vCPU about to run the fake text.
pub fn machine() -> (ProbeEngine<X86_64, GuestMemoryMmap>, FakeVcpu) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x20_0000),
        (GuestAddress(XOL_GPA), 0x10_0000),
    ])
    .unwrap();
    let w = |gpa: u64, v: u64| mem.write_obj(v, GuestAddress(gpa)).unwrap();
    // PML4[511] -> PDPT 0x2000; PDPT[510] -> PD 0x3000; PD[8] -> PT 0x4000.
    w(CR3 + 511 * 8, 0x2000 | 3);
    w(0x2000 + 510 * 8, 0x3000 | 3);
    w(0x3000 + 8 * 8, 0x4000 | 3);
    w(0x4000, TEXT_GPA | 1); // text, read-only
    w(0x4000 + 2 * 8, STACK_GPA | 3); // stack page
    mem.write_slice(CODE, GuestAddress(TEXT_GPA)).unwrap();
    let engine = ProbeEngine::new(
        mem,
        XolArea::new(<X86_64 as crate::arch::Arch>::XOL, XOL_GPA, 4)
            .and_then(|x| x.with_data_pages(JUMP_RING_PAGES))
            .unwrap(),
    )
    .unwrap();
    let mut regs = Registers {
        cr3: CR3,
        rflags: 0x2,
        ..Default::default()
    };
    regs.set(Gpr::Rsp, STACK_VA + 0x800);
    regs.set(Gpr::Rbp, 0xb0b0);
    regs.set(Gpr::Rcx, 0xc0c0);
    (engine, FakeVcpu::new(regs))
}

/// A handler context over `mem` and `regs`, as the engine builds one at a hit on vCPU 0.
pub fn context<'a>(mem: &'a GuestMemoryMmap, regs: &'a Registers) -> ProbeContext<'a, X86_64> {
    ProbeContext {
        vcpu: 0,
        location: "f",
        address: 0,
        time: std::time::Duration::ZERO,
        regs,
        entry_regs: None,
        mem,
        returns: Default::default(),
        recorded: None,
        watch: None,
    }
}

/// The aarch64 fake machine: TTBR1 tables (4 KiB granule, 48-bit) mapping a text page and a
/// stack page of a kernel at the arm64 kernel image's usual address.
pub mod aarch64 {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::FakeVcpu;
    use crate::arch::aarch64::{Aarch64, NOP, Registers};
    use crate::engine::ProbeEngine;
    use crate::xol::XolArea;

    /// Virtual address of the fake kernel text.
    pub const TEXT_VA: u64 = 0xffff_8000_0801_0000;
    /// Where the text lives in guest memory.
    pub const TEXT_GPA: u64 = 0x10000;
    /// Virtual address of the stack page.
    pub const STACK_VA: u64 = TEXT_VA + 0x2000;
    /// Where the stack page lives.
    pub const STACK_GPA: u64 = 0x12000;
    /// The level-0 table (TTBR1_EL1).
    pub const TTBR1: u64 = 0x1000;
    /// TCR_EL1 for 4 KiB pages and 48-bit addresses in both halves.
    pub const TCR: u64 = 16 | (16 << 16) | (2 << 30);

    /// The fake text: `bti c; nop; stp x29, x30, [sp, #-16]!; mov x29, sp; ldr x0, [x1];
    /// ldxr x0, [x1]; ret`.
    pub const CODE: [u32; 7] = [
        0xd503_245f,
        NOP,
        0xa9bf_7bfd,
        0x9100_03fd,
        0xf940_0020,
        0xc85f_7c20,
        0xd65f_03c0,
    ];
    /// Offset of `nop`.
    pub const AT_NOP: u64 = 4;
    /// Offset of the `stp`.
    pub const AT_STP: u64 = 8;
    /// Offset of the `ldr` (run out of line).
    pub const AT_LDR: u64 = 16;
    /// Offset of the `ldxr` (refused).
    pub const AT_LDXR: u64 = 20;

    /// The text as bytes.
    pub fn code_bytes() -> Vec<u8> {
        CODE.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// A handler context over `mem` and `regs`, as the engine builds one at a hit on vCPU 0.
    pub fn context<'a>(
        mem: &'a GuestMemoryMmap,
        regs: &'a Registers,
    ) -> crate::probe::ProbeContext<'a, Aarch64> {
        crate::probe::ProbeContext {
            vcpu: 0,
            location: "f",
            address: regs.pc,
            time: std::time::Duration::ZERO,
            regs,
            entry_regs: None,
            mem,
            returns: Default::default(),
            recorded: None,
            watch: None,
        }
    }

    /// An aarch64 engine over the fake memory and a vCPU about to run the fake text.
    pub fn machine() -> (ProbeEngine<Aarch64, GuestMemoryMmap>, FakeVcpu<Aarch64>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x20_0000),
            (GuestAddress(super::XOL_GPA), 0x10_0000),
        ])
        .unwrap();
        let w = |gpa: u64, v: u64| mem.write_obj(v, GuestAddress(gpa)).unwrap();
        let idx = |level: u32| (TEXT_VA >> (39 - 9 * level)) & 0x1ff;
        // L0 -> L1 0x2000 -> L2 0x3000 -> L3 0x4000 (table descriptors: bits 1:0 = 0b11).
        w(TTBR1 + idx(0) * 8, 0x2000 | 3);
        w(0x2000 + idx(1) * 8, 0x3000 | 3);
        w(0x3000 + idx(2) * 8, 0x4000 | 3);
        // Text read-only (AP[2]), stack writable and never executable (PXN); AF set.
        w(0x4000 + idx(3) * 8, TEXT_GPA | (1 << 7) | (1 << 10) | 3);
        w(
            0x4000 + (idx(3) + 2) * 8,
            STACK_GPA | (1 << 53) | (1 << 10) | 3,
        );
        mem.write_slice(&code_bytes(), GuestAddress(TEXT_GPA))
            .unwrap();
        let engine = ProbeEngine::new(
            mem,
            XolArea::new(<Aarch64 as crate::arch::Arch>::XOL, super::XOL_GPA, 4).unwrap(),
        )
        .unwrap();
        let mut regs = Registers {
            ttbr1: TTBR1,
            tcr: TCR,
            sp: STACK_VA + 0x800,
            pstate: 0x3c5,
            ..Default::default()
        };
        regs.x[29] = 0xf0f0;
        regs.x[30] = TEXT_VA + 0x100;
        (engine, FakeVcpu::new(regs))
    }
}

/// An architecture's fake machine, as the engine conformance suite (`engine/tests/
/// conformance.rs`) drives it: every architecture plugs its own in and passes the same tests.
pub trait FakeMachine: Arch {
    /// Virtual address of the fake text.
    const TEXT_VA: u64;
    /// Where the text lives in guest memory.
    const TEXT_GPA: u64;
    /// Offset of an instruction the engine emulates, and the offset the guest goes on at.
    const EMULATED: (u64, u64);
    /// Offset of another instruction, on a boundary.
    const OTHER: u64;
    /// An offset that is not an instruction boundary.
    const INSIDE: u64;
    /// Offset past the function, where a test writes a breakpoint of the guest's own.
    const SPARE: u64;
    /// The fake text.
    fn code() -> Vec<u8>;
    /// The engine and a vCPU about to run the text.
    fn machine() -> (ProbeEngine<Self, GuestMemoryMmap>, FakeVcpu<Self>);
    /// A software breakpoint of the guest's own (x86's `int3`, arm64's BUG `BRK #0x800`).
    fn guest_breakpoint() -> Vec<u8>;
}

impl FakeMachine for X86_64 {
    const TEXT_VA: u64 = TEXT_VA;
    const TEXT_GPA: u64 = TEXT_GPA;
    const EMULATED: (u64, u64) = (AT_PUSH, AT_PUSH + 1);
    const OTHER: u64 = AT_RIPREL;
    const INSIDE: u64 = 6;
    const SPARE: u64 = 0x40;

    fn code() -> Vec<u8> {
        CODE.to_vec()
    }

    fn machine() -> (ProbeEngine<Self, GuestMemoryMmap>, FakeVcpu<Self>) {
        machine()
    }

    fn guest_breakpoint() -> Vec<u8> {
        vec![0xcc]
    }
}

impl FakeMachine for crate::arch::aarch64::Aarch64 {
    const TEXT_VA: u64 = aarch64::TEXT_VA;
    const TEXT_GPA: u64 = aarch64::TEXT_GPA;
    const EMULATED: (u64, u64) = (aarch64::AT_NOP, aarch64::AT_NOP + 4);
    const OTHER: u64 = aarch64::AT_LDR;
    const INSIDE: u64 = aarch64::AT_NOP + 2;
    const SPARE: u64 = 0x40;

    fn code() -> Vec<u8> {
        aarch64::code_bytes()
    }

    fn machine() -> (ProbeEngine<Self, GuestMemoryMmap>, FakeVcpu<Self>) {
        aarch64::machine()
    }

    fn guest_breakpoint() -> Vec<u8> {
        crate::arch::aarch64::brk(0x800).to_le_bytes().to_vec()
    }
}
