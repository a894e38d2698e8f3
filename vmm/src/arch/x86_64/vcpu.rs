//! The x86_64 vCPU as probe-core sees it: registers through `KVM_CAP_SYNC_REGS` where KVM offers
//! it (else `KVM_GET/SET_(S)REGS`), the `sti` interrupt shadow through `KVM_SET_VCPU_EVENTS`,
//! and what the VMM reads from a paused vCPU before planting (registers, and `MSR_LSTAR` as the
//! KASLR anchor).

use kvm_ioctls::{SyncReg, VcpuFd};
use probe_core::arch::x86_64::{Registers, X86_64};
use probe_core::vm::{VcpuAccess, VcpuError};

use crate::probing::vcpu_call;

use super::debug::{registers_from_kvm, registers_to_kvm};
use crate::arch::KaslrAnchor;
use crate::probing::{PausedState, ProbingError};

/// `MSR_LSTAR`: the 64-bit syscall entry point.
const MSR_LSTAR: u32 = 0xc000_0082;

/// The running kernel's `entry_SYSCALL_64`, read from `MSR_LSTAR`, against System.map; KASLR
/// moves the x86_64 kernel by multiples of CONFIG_PHYSICAL_ALIGN (2 MiB).
pub const KASLR_ANCHOR: KaslrAnchor = KaslrAnchor {
    symbol: "entry_SYSCALL_64",
    register: "the syscall entry point (MSR_LSTAR)",
    align: 2 << 20,
    alternates: &[],
};

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ProbingError {
    move |source| ProbingError::Kvm { what, source }
}

/// One x86_64 vCPU handling a debug exit.
pub struct KvmVcpu<'a> {
    /// The vCPU index.
    pub id: u32,
    /// Its fd.
    pub fd: &'a mut VcpuFd,
    /// Registers travel through the `kvm_run` page.
    pub sync_regs: bool,
    /// Register ioctls made for this exit (`KVM_GET_REGS`, `KVM_GET_SREGS`; none with sync
    /// regs).
    pub reads: u64,
    /// `KVM_SET_REGS` calls made for this exit (none with sync regs).
    pub writes: u64,
}

impl<'a> KvmVcpu<'a> {
    /// vCPU `id` with its fd; `sync_regs` if registers travel through `kvm_run`.
    pub fn new(id: u32, fd: &'a mut VcpuFd, sync_regs: bool) -> KvmVcpu<'a> {
        KvmVcpu {
            id,
            fd,
            sync_regs,
            reads: 0,
            writes: 0,
        }
    }
}

impl VcpuAccess<X86_64> for KvmVcpu<'_> {
    fn id(&self) -> u32 {
        self.id
    }

    fn registers(&mut self) -> Result<Registers, VcpuError> {
        if self.sync_regs {
            let s = self.fd.sync_regs();
            return Ok(registers_from_kvm(&s.regs, &s.sregs));
        }
        self.reads += 2;
        let r = self.fd.get_regs().map_err(vcpu_call("KVM_GET_REGS"))?;
        let s = self.fd.get_sregs().map_err(vcpu_call("KVM_GET_SREGS"))?;
        Ok(registers_from_kvm(&r, &s))
    }

    fn set_registers(&mut self, regs: &Registers) -> Result<(), VcpuError> {
        let r = registers_to_kvm(regs);
        if self.sync_regs {
            self.fd.sync_regs_mut().regs = r;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            return Ok(());
        }
        self.writes += 1;
        self.fd.set_regs(&r).map_err(vcpu_call("KVM_SET_REGS"))
    }

    fn block_interrupts_once(&mut self) -> Result<(), VcpuError> {
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(vcpu_call("KVM_GET_VCPU_EVENTS"))?;
        events.interrupt.shadow = kvm_bindings::KVM_X86_SHADOW_INT_STI as u8;
        events.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW;
        self.fd
            .set_vcpu_events(&events)
            .map_err(vcpu_call("KVM_SET_VCPU_EVENTS"))
    }
}

/// The PC of a vCPU out of `KVM_RUN`.
pub fn read_pc(fd: &VcpuFd) -> Result<u64, kvm_ioctls::Error> {
    fd.get_regs().map(|r| r.rip)
}

/// Turns on register syncing through `kvm_run` (general and system registers).
pub fn enable_register_sync(fd: &mut VcpuFd) {
    fd.set_sync_valid_reg(SyncReg::Register);
    fd.set_sync_valid_reg(SyncReg::SystemRegister);
}

/// Hands registers the engine left in the sync area to KVM now: `KVM_SET_GUEST_DEBUG` computes
/// TF from the registers KVM holds, so they must reach it first.
pub fn flush_register_sync(fd: &mut VcpuFd) -> Result<(), ProbingError> {
    if fd.get_kvm_run().kvm_dirty_regs & u64::from(kvm_bindings::KVM_SYNC_X86_REGS) != 0 {
        let regs = fd.sync_regs().regs;
        fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        fd.get_kvm_run().kvm_dirty_regs &= !u64::from(kvm_bindings::KVM_SYNC_X86_REGS);
    }
    Ok(())
}

/// The time stamp counter (`IA32_TIME_STAMP_COUNTER`), what RDTSC reads.
const MSR_IA32_TSC: u32 = 0x10;

/// Reads the state of a vCPU that is out of `KVM_RUN`: registers and the syscall entry point
/// (`MSR_LSTAR`), from which the KASLR slide follows.
pub fn paused_state(fd: &mut VcpuFd) -> Result<PausedState, ProbingError> {
    let r = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let s = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let mut msrs = kvm_bindings::Msrs::from_entries(&[
        kvm_bindings::kvm_msr_entry {
            index: MSR_LSTAR,
            ..Default::default()
        },
        kvm_bindings::kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        },
    ])
    .map_err(|e| ProbingError::RegisterList(format!("{e:?}")))?;
    let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    let kaslr_anchor = if n >= 1 { msrs.as_slice()[0].data } else { 0 };
    let counter = match (n, fd.get_tsc_khz()) {
        (2, Ok(khz)) if khz > 0 => Some((msrs.as_slice()[1].data, u64::from(khz))),
        _ => None,
    };
    Ok(PausedState {
        counter,
        regs: registers_from_kvm(&r, &s),
        kaslr_anchor,
        cpu_features: (),
        // CPL 0 (under PTI, user mode runs on a CR3 without the kernel's text).
        in_kernel: s.cs.selector & 3 == 0,
        control: vec![
            ("CR0.WP", s.cr0 >> 16 & 1),
            ("CR4.SMEP", s.cr4 >> 20 & 1),
            ("CR4.SMAP", s.cr4 >> 21 & 1),
            ("IDT base", s.idt.base),
        ],
    })
}
