//! The x86_64 trap self-test: a real-mode guest `nop; int3; nop; hlt` whose every interrupt
//! vector lands on the `hlt`, run once per trap with guest debugging set for it.

use crate::arch::GuestDebug;
use kvm_bindings::kvm_regs;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use probe_core::vm::DebugEvent;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::debug::{GuestDebugSetup, debug_event};
use crate::selftest::{Reinjection, TrapSupport};

const CODE_AT: u64 = 0x1000;
// nop; int3; nop; hlt
const CODE: [u8; 4] = [0x90, 0xcc, 0x90, 0xf4];

fn describe(exit: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Result<DebugEvent, String> {
    match exit {
        Ok(VcpuExit::Debug(arch)) => {
            debug_event(&arch, 0).ok_or(format!("debug exit for vector {}", arch.exception))
        }
        Ok(VcpuExit::Hlt) => Err("the guest ran on to its hlt without an exit".into()),
        Ok(VcpuExit::InternalError) => Err("KVM_EXIT_INTERNAL_ERROR".into()),
        Ok(other) => Err(format!("unexpected exit {other:?}")),
        Err(e) => Err(format!("KVM_RUN: {e}")),
    }
}

fn run_to_exit(vcpu: &mut VcpuFd, rip: u64, setup: GuestDebugSetup) -> Result<DebugEvent, String> {
    let mut regs = vcpu.get_regs().map_err(|e| e.to_string())?;
    regs.rip = rip;
    vcpu.set_regs(&regs).map_err(|e| e.to_string())?;
    vcpu.set_guest_debug(&setup.to_kvm())
        .map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))?;
    describe(vcpu.run())
}

/// Runs the self-test on `kvm`.
pub fn probe_traps(kvm: &Kvm) -> Result<TrapSupport, String> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)])
        .map_err(|e| e.to_string())?;
    mem.write_slice(&CODE, GuestAddress(CODE_AT))
        .map_err(|e| e.to_string())?;
    // Real-mode IVT: every vector lands on the hlt, so a trap KVM does not intercept ends in
    // a KVM_EXIT_HLT rather than a runaway guest.
    for v in 0..32u64 {
        let entry = (CODE_AT + 3) as u32; // segment 0, offset of the hlt
        mem.write_obj(entry, GuestAddress(v * 4))
            .map_err(|e| e.to_string())?;
    }
    let (vm, mut vcpu) = crate::selftest::payload_vm(kvm, &mem, 0, 0x10000)?;
    let mut sregs = vcpu.get_sregs().map_err(|e| e.to_string())?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|e| e.to_string())?;
    vcpu.set_regs(&kvm_regs {
        rflags: 0x2,
        rsp: 0x8000,
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;

    // Each trap: where the vCPU starts, what is enabled, and the exit that proves delivery.
    let mut check = |rip: u64, setup: GuestDebugSetup, want: DebugEvent| match run_to_exit(
        &mut vcpu, rip, setup,
    ) {
        Ok(got) if got == want => Ok(()),
        Ok(other) => Err(format!("got {other:?}")),
        Err(e) => Err(e),
    };
    let hardware = check(
        CODE_AT + 2,
        GuestDebugSetup {
            hardware: [Some(CODE_AT + 2), None, None, None],
            ..Default::default()
        },
        DebugEvent::HardwareBreakpoint { pc: CODE_AT + 2 },
    );
    let software = check(
        CODE_AT,
        GuestDebugSetup {
            software_breakpoints: true,
            ..Default::default()
        },
        DebugEvent::Breakpoint { pc: CODE_AT + 1 },
    );
    let single_step = check(
        CODE_AT,
        GuestDebugSetup {
            single_step: true,
            ..Default::default()
        },
        DebugEvent::SingleStep { pc: CODE_AT + 1 },
    );
    drop(vcpu);
    drop(vm);
    Ok(TrapSupport {
        software,
        hardware,
        single_step,
        hardware_count: super::debug::HW_BREAKPOINTS,
        reinjection: Reinjection::ByKvm,
        breakpoint_name: <super::X86_64Vmm as crate::arch::VmmArch>::BREAKPOINT_NAME,
    })
}
