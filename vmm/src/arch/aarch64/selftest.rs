//! The arm64 trap self-test: an EL1 payload (`nop; brk #7; nop; b .`) with its own vector table,
//! run with the MMU off in a one-page VM, once per trap: a hardware breakpoint on the first
//! `nop` (EC 0x30), the `brk` with software breakpoints on (EC 0x3C), one software step (EC
//! 0x32), and the `brk` handed back to the guest by exception-entry emulation, whose vector
//! reports ESR_EL1 and ELR_EL1 through two MMIO writes the VMM checks.

use crate::arch::GuestDebug;
use kvm_bindings::{kvm_debug_exit_arch, kvm_guest_debug, kvm_vcpu_init};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Aarch64Vmm;
use super::debug::GuestDebugSetup;
use super::vcpu::{inject_sync_exception, read_pc, set_pc_and_vectors};
use crate::arch::VmmArch;
use crate::selftest::{Reinjection, TrapSupport};

/// Guest physical base of the payload's page (also VBAR_EL1: the vectors are at its start).
const BASE: u64 = 0x4000_0000;
/// Where the code starts.
const CODE_AT: u64 = BASE + 0x1000;
/// The immediate of the payload's BRK.
const BRK_IMM: u32 = 7;
/// Where the vector reports: no memory there, so each store is an MMIO exit.
const REPORT_AT: u64 = 0x0a00_0000;

/// `nop; brk #7; nop; b .`
const CODE: [u32; 4] = [
    0xd503_201f,
    0xd420_0000 | (BRK_IMM << 5),
    0xd503_201f,
    0x1400_0000,
];
/// At VBAR_EL1 + 0x200 (synchronous, current EL with SP_EL1): `mrs x0, esr_el1; mrs x1,
/// elr_el1; movz x2, #0x0a00, lsl #16; str x0, [x2]; str x1, [x2, #8]; b .`
const VECTOR: [u32; 6] = [
    0xd538_5200,
    0xd538_4021,
    0xd2a1_4002,
    0xf900_0040,
    0xf900_0441,
    0x1400_0000,
];

/// The guest debugging of one check, as probing sets it.
fn debug(software_breakpoints: bool, single_step: bool, hw_at: Option<u64>) -> kvm_guest_debug {
    let mut setup = GuestDebugSetup {
        software_breakpoints,
        single_step,
        ..Default::default()
    };
    setup.set_hardware(&[hw_at]);
    setup.to_kvm()
}

/// Runs from `pc` with `dbg` to the next exit: the debug exit's syndrome and PC.
fn run_to_debug_exit(
    vcpu: &mut VcpuFd,
    pc: u64,
    dbg: &kvm_guest_debug,
) -> Result<(kvm_debug_exit_arch, u64), String> {
    set_pc_and_vectors(vcpu, pc, BASE).map_err(|e| format!("KVM_SET_ONE_REG: {e}"))?;
    vcpu.set_guest_debug(dbg)
        .map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))?;
    let exit = match vcpu.run() {
        Ok(VcpuExit::Debug(exit)) => exit,
        Ok(other) => return Err(format!("unexpected exit {other:?}")),
        Err(e) => return Err(format!("KVM_RUN: {e}")),
    };
    let pc = read_pc(vcpu).map_err(|e| format!("reading the PC: {e}"))?;
    Ok((exit, pc))
}

/// Checks that a run from `pc` stops with exception class `ec` at `want_pc`.
fn expect(
    vcpu: &mut VcpuFd,
    pc: u64,
    dbg: &kvm_guest_debug,
    ec: u32,
    want_pc: u64,
) -> Result<(), String> {
    let (exit, at) = run_to_debug_exit(vcpu, pc, dbg)?;
    let got = exit.hsr >> 26;
    if got != ec || at != want_pc {
        return Err(format!(
            "expected EC {ec:#x} at {want_pc:#x}, got EC {got:#x} at {at:#x}"
        ));
    }
    Ok(())
}

/// The next MMIO write's address and value.
fn mmio_write(vcpu: &mut VcpuFd) -> Result<(u64, u64), String> {
    match vcpu.run() {
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            let mut b = [0u8; 8];
            let n = data.len().min(8);
            b[..n].copy_from_slice(&data[..n]);
            Ok((addr, u64::from_le_bytes(b)))
        }
        Ok(other) => Err(format!("expected the vector's MMIO report, got {other:?}")),
        Err(e) => Err(format!("KVM_RUN: {e}")),
    }
}

/// The BRK trapped, handed back, and seen by the guest's vector with its own syndrome and
/// return address.
fn reinjection(vcpu: &mut VcpuFd) -> Result<(), String> {
    let (exit, at) = run_to_debug_exit(vcpu, CODE_AT, &debug(true, false, None))?;
    if exit.hsr >> 26 != 0x3c || at != CODE_AT + 4 {
        return Err(format!(
            "the BRK did not exit (ESR {:#x} at {at:#x})",
            exit.hsr
        ));
    }
    inject_sync_exception(vcpu, exit.hsr).map_err(|e| format!("KVM_SET_ONE_REG: {e}"))?;
    let (addr, esr) = mmio_write(vcpu)?;
    let (_, elr) = mmio_write(vcpu)?;
    let want_esr = (0x3c << 26) | u64::from(BRK_IMM);
    if addr != REPORT_AT || esr & !(1 << 25) != want_esr || elr != CODE_AT + 4 {
        return Err(format!(
            "the guest's vector saw ESR {esr:#x} and ELR {elr:#x} (want {want_esr:#x} and {:#x})",
            CODE_AT + 4
        ));
    }
    Ok(())
}

/// Runs the self-test on `kvm`.
pub fn probe_traps(kvm: &Kvm) -> Result<TrapSupport, String> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(BASE), 0x2000)])
        .map_err(|e| e.to_string())?;
    let words = |ws: &[u32]| ws.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
    mem.write_slice(&words(&CODE), GuestAddress(CODE_AT))
        .map_err(|e| e.to_string())?;
    mem.write_slice(&words(&VECTOR), GuestAddress(BASE + 0x200))
        .map_err(|e| e.to_string())?;
    let (vm, mut vcpu) = crate::selftest::payload_vm(kvm, &mem, BASE, 0x2000)?;
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .map_err(|e| format!("KVM_ARM_PREFERRED_TARGET: {e}"))?;
    vcpu.vcpu_init(&kvi)
        .map_err(|e| format!("KVM_ARM_VCPU_INIT: {e}"))?;

    let count = Aarch64Vmm::hw_breakpoint_count(kvm);
    let hardware = if count == 0 {
        Err("KVM reports no hardware breakpoints".to_string())
    } else {
        // On the first instruction: past it the BRK would stop the vCPU first.
        expect(
            &mut vcpu,
            CODE_AT,
            &debug(false, false, Some(CODE_AT)),
            0x30,
            CODE_AT,
        )
    };
    let software = expect(
        &mut vcpu,
        CODE_AT,
        &debug(true, false, None),
        0x3c,
        CODE_AT + 4,
    );
    let single_step = expect(
        &mut vcpu,
        CODE_AT,
        &debug(false, true, None),
        0x32,
        CODE_AT + 4,
    );
    let reinjection = reinjection(&mut vcpu);
    drop(vcpu);
    drop(vm);
    Ok(TrapSupport {
        software,
        hardware,
        single_step,
        hardware_count: count,
        reinjection: Reinjection::Emulated(reinjection),
        breakpoint_name: Aarch64Vmm::BREAKPOINT_NAME,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_core::arch::InstructionDecoder;
    use probe_core::arch::aarch64::{Aarch64, Decoder};

    #[test]
    fn the_payload_is_the_code_it_claims_to_be() {
        let d = <Decoder as InstructionDecoder<Aarch64>>::new(Default::default()).unwrap();
        let text = |w: u32| d.decode(&w.to_le_bytes(), CODE_AT).unwrap().text;
        assert_eq!(text(CODE[1]), "brk #7");
        assert_eq!(text(VECTOR[0]), "mrs x0, esr_el1");
        assert_eq!(text(VECTOR[1]), "mrs x1, elr_el1");
        assert_eq!(text(VECTOR[2]), "mov x2, #0xa000000");
        assert_eq!(text(VECTOR[3]), "str x0, [x2]");
        assert_eq!(text(VECTOR[4]), "str x1, [x2, #8]");
    }
}
