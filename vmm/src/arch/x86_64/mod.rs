//! x86_64 specifics of the VMM: memory layout, boot protocol, MP table and ACPI, the VM and
//! vCPU set-up, guest debugging and the vCPU's registers as probe-core sees them.

pub mod acpi;
pub mod boot;
pub mod debug;
pub mod hostcheck;
pub mod kernel;
pub mod layout;
pub mod machine;
pub mod mptable;
pub mod selftest;
pub mod vcpu;

use std::io::Write;

use kvm_bindings::kvm_debug_exit_arch;
use kvm_ioctls::{Kvm, VcpuFd};
use probe_core::vm::DebugEvent;

use crate::arch::{KaslrAnchor, VmmArch};
use crate::probing::{PausedState, ProbingError};
use crate::selftest::TrapSupport;
use crate::vm::{BootInputs, Vm, VmConfig, VmError};

/// The probe engine's architecture for x86_64 guests.
pub type Guest = probe_core::arch::x86_64::X86_64;

/// The x86_64 VMM: KVM's x86 API (sync regs, `KVM_GUESTDBG_INJECT_*`, DR0-DR3).
pub struct X86_64Vmm;

impl VmmArch for X86_64Vmm {
    type Guest = Guest;
    type Debug = debug::GuestDebugSetup;
    type Vcpu<'a> = vcpu::KvmVcpu<'a>;

    const ARCH: hvprobe_guest::GuestArch = hvprobe_guest::GuestArch::X86_64;
    const REQUIRED_CAPS: &'static [(kvm_ioctls::Cap, &'static str)] = hostcheck::REQUIRED_CAPS;
    const XOL_GPA_BASE: u64 = layout::XOL_GPA_BASE;
    const KASLR_ANCHOR: KaslrAnchor = vcpu::KASLR_ANCHOR;
    /// None: x86_64's TF single-step is the guest's own while hvprobe does not single-step.
    const USER_RETURN_SYMBOL: Option<&'static str> = None;
    const KERNEL_ROOT_SYMBOL: Option<&'static str> = Some("init_top_pgt");
    const BREAKPOINT_NAME: &'static str = "int3";
    const STORE_EXIT_AT_WRITER: bool = false;

    fn create_vm(
        kvm: Kvm,
        config: &VmConfig,
        inputs: BootInputs,
        console_out: Box<dyn Write + Send>,
    ) -> Result<Vm, VmError> {
        machine::create_vm(kvm, config, inputs, console_out)
    }

    fn probe_traps(kvm: &Kvm) -> Result<TrapSupport, String> {
        selftest::probe_traps(kvm)
    }

    fn hw_breakpoint_count(kvm: &Kvm) -> usize {
        debug::hw_breakpoint_count(kvm)
    }

    /// DR0-3, shared with the breakpoints.
    fn hw_watchpoint_count(kvm: &Kvm) -> usize {
        debug::hw_breakpoint_count(kvm)
    }

    /// The exit's `pc` is not needed: the registers come all together.
    fn exit_vcpu(id: u32, fd: &mut VcpuFd, sync_regs: bool, _pc: u64) -> vcpu::KvmVcpu<'_> {
        vcpu::KvmVcpu::new(id, fd, sync_regs)
    }

    fn register_ioctls(vcpu: &vcpu::KvmVcpu<'_>) -> (u64, u64) {
        (vcpu.reads, vcpu.writes)
    }

    fn enable_register_sync(fd: &mut VcpuFd) {
        vcpu::enable_register_sync(fd)
    }

    fn flush_register_sync(fd: &mut VcpuFd) -> Result<(), ProbingError> {
        vcpu::flush_register_sync(fd)
    }

    fn paused_state(fd: &mut VcpuFd) -> Result<PausedState, ProbingError> {
        vcpu::paused_state(fd)
    }

    fn read_pc(fd: &VcpuFd) -> Result<u64, kvm_ioctls::Error> {
        vcpu::read_pc(fd)
    }

    /// x86 has the PC in the exit itself.
    fn decode_debug_exit(
        _: &VcpuFd,
        exit: &kvm_debug_exit_arch,
        watch_slots: u32,
    ) -> Option<DebugEvent> {
        debug::debug_event(exit, watch_slots)
    }

    /// x86 has no exit of its own that hvprobe handles.
    fn arch_exit(
        _: u32,
        _: &mut VcpuFd,
        _: u32,
        _: &crate::probing::Engine,
    ) -> Result<Option<(u64, u64)>, ProbingError> {
        Ok(None)
    }

    fn describe_debug_exit(exit: &kvm_debug_exit_arch) -> String {
        debug::describe_debug_exit(exit)
    }
}
