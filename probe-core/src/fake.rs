//! A fake machine for tests and benchmarks of the engine: real `GuestMemoryMmap` memory with
//! hand-made 4-level page tables mapping a page of kernel text and a stack page, an XOL area,
//! and a vCPU whose registers live in a struct. No KVM.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{Gpr, Registers};
use crate::engine::ProbeEngine;
use crate::probe::ProbeContext;
use crate::vm::{VcpuAccess, VmError};
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
pub struct FakeVcpu {
    /// Its registers.
    pub regs: Registers,
    /// How many times the engine asked for an interrupt shadow (emulated `sti`).
    pub interrupt_shadows: u32,
}

impl VcpuAccess for FakeVcpu {
    fn id(&self) -> u32 {
        1
    }
    fn registers(&mut self) -> Result<Registers, VmError> {
        Ok(self.regs.clone())
    }
    fn set_registers(&mut self, regs: &Registers) -> Result<(), VmError> {
        self.regs = regs.clone();
        Ok(())
    }
    fn block_interrupts_once(&mut self) -> Result<(), VmError> {
        self.interrupt_shadows += 1;
        Ok(())
    }
}

/// An engine over the fake memory and a vCPU about to run the fake text.
pub fn machine() -> (ProbeEngine<GuestMemoryMmap>, FakeVcpu) {
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
    let engine = ProbeEngine::new(mem, XolArea::new(XOL_GPA, 4).unwrap()).unwrap();
    let mut regs = Registers {
        cr3: CR3,
        rflags: 0x2,
        ..Default::default()
    };
    regs.set(Gpr::Rsp, STACK_VA + 0x800);
    regs.set(Gpr::Rbp, 0xb0b0);
    regs.set(Gpr::Rcx, 0xc0c0);
    (
        engine,
        FakeVcpu {
            regs,
            interrupt_shadows: 0,
        },
    )
}

/// A handler context over `mem` and `regs`, as the engine builds one at a hit on vCPU 0.
pub fn context<'a>(mem: &'a GuestMemoryMmap, regs: &'a Registers) -> ProbeContext<'a> {
    ProbeContext {
        vcpu: 0,
        location: "f",
        address: 0,
        time: std::time::Duration::ZERO,
        regs,
        entry_regs: None,
        mem,
    }
}
