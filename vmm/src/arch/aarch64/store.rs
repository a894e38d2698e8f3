//! Stores KVM hands over undecoded (`KVM_EXIT_ARM_NISV`): a data abort on a read-only
//! memslot without an instruction syndrome (store pair, indexed stores, atomics,
//! store-exclusives, `DC ZVA`: what the kernel's `memcpy`, `memset` and atomics use). The VMM
//! reads the instruction, decodes it ([`probe_core::arch::aarch64::store`]), makes the store
//! through the engine's protected stores (reported, then completed or dropped), sets what it
//! leaves in registers and moves the PC on, as KVM does for the stores it decodes.

use std::cell::Cell;
use std::sync::OnceLock;

use kvm_ioctls::VcpuFd;
use probe_core::arch::Arch;
use probe_core::arch::aarch64::store::{StoreData, decode_store, registers_read};
use probe_core::arch::aarch64::uses;
use probe_core::engine::{ProtectedStore, read_guest_virtual};
use probe_core::protect::PAGE;
use probe_core::vm::VcpuAccess;
use vm_memory::{Bytes, GuestAddress};

use super::vcpu::{KvmVcpu, read_pc};
use crate::arch::Guest;
use crate::probing::{Engine, ProbingError};

/// `DCZID_EL0`: the block size `DC ZVA` zeroes.
const DCZID_EL0: u64 = super::vcpu::sys_reg(3, 3, 0, 0, 7);

/// The bytes `DC ZVA` zeroes on this vCPU, from `DCZID_EL0` (`None` if it cannot be read or
/// the instruction is prohibited).
fn zva_block(fd: &VcpuFd) -> Option<usize> {
    let v = super::vcpu::get(fd, DCZID_EL0).ok()?;
    (v & 0x10 == 0).then(|| 4usize << (v & 0xf))
}

/// Makes the store vCPU `id` exited on (`KVM_EXIT_ARM_NISV` at guest physical `fault_ipa`).
/// Refused, stopping the run with the instruction named: a store that is not to a protected
/// page (a device's), or one hvprobe does not decode. Returns the register ioctls made
/// (reads, writes), for figures.
pub fn emulate(
    id: u32,
    fd: &mut VcpuFd,
    fault_ipa: u64,
    engine: &Engine,
) -> Result<(u64, u64), ProbingError> {
    if !engine.is_protected(fault_ipa) {
        return Err(ProbingError::UnsyndromedStore(format!(
            "a store KVM could not decode at guest physical {fault_ipa:#x}, which is not a protected page"
        )));
    }
    let pc = read_pc(fd).map_err(|source| ProbingError::Kvm {
        what: "KVM_GET_ONE_REG (PC)",
        source,
    })?;
    // The same for every vCPU of the VM: read once.
    static ZVA: OnceLock<Option<usize>> = OnceLock::new();
    let zva = *ZVA.get_or_init(|| zva_block(fd));
    let mut code = [0u8; 4];
    let mut vcpu = KvmVcpu::new(id, fd, pc);
    // Registers read as needed (a neighbour write, the common case, reports nothing): the
    // kernel's page tables to read the instruction, the registers its encoding names, the
    // user half's tables only for a store there.
    let mut regs = vcpu.exit_registers()?;
    vcpu.complete_registers_in(&mut regs, uses::KERNEL_SPACE)?;
    read_guest_virtual::<Guest, _>(engine.memory(), &regs, pc, &mut code).map_err(|e| {
        ProbingError::UnsyndromedStore(format!("reading the store at {pc:#x}: {e}"))
    })?;
    let insn = u32::from_le_bytes(code);
    vcpu.complete_registers_in(&mut regs, registers_read(insn))?;
    let store = decode_store(insn, &regs, zva)
        .map_err(|e| ProbingError::UnsyndromedStore(e.to_string()))?;
    if store.va >> 63 == 0 {
        vcpu.complete_registers_in(&mut regs, uses::USER_SPACE)?;
    }
    let space = Guest::address_space(&regs);
    let mut old = Vec::with_capacity(store.len);
    let done = Cell::new(true);
    // Page by page (a plain store may cross into the next page; atomics are aligned).
    let mut at = 0usize;
    while at < store.len {
        let va = store.va.wrapping_add(at as u64);
        let n = (store.len - at).min((PAGE - (va & (PAGE - 1))) as usize);
        if n < store.len && !matches!(store.data, StoreData::Bytes(_)) {
            return Err(ProbingError::UnsyndromedStore(format!(
                "the atomic store at {pc:#x} to {:#x} crosses a page",
                store.va
            )));
        }
        let gpa = Guest::translate(engine.memory(), space, va)
            .map_err(|e| {
                ProbingError::UnsyndromedStore(format!("the store at {pc:#x} to {va:#x}: {e}"))
            })?
            .gpa;
        let part = |old: &[u8]| -> Option<Vec<u8>> {
            match &store.data {
                StoreData::Bytes(b) => Some(b[at..at + n].to_vec()),
                StoreData::Exclusive { .. } if !engine.exclusive_store_holds(id, gpa) => {
                    done.set(false);
                    None
                }
                _ => store.update(old),
            }
        };
        match engine.protected_update(&mut vcpu, true, gpa, n, part)? {
            ProtectedStore::Done { old: before } => old.extend(before),
            ProtectedStore::NotProtected => {
                // The rest of a store that crossed from a protected page into an ordinary one.
                let mut before = vec![0u8; n];
                let StoreData::Bytes(b) = &store.data else {
                    unreachable!("only plain stores cross pages")
                };
                engine
                    .memory()
                    .read_slice(&mut before, GuestAddress(gpa))
                    .and_then(|()| {
                        engine
                            .memory()
                            .write_slice(&b[at..at + n], GuestAddress(gpa))
                    })
                    .map_err(|e| {
                        ProbingError::UnsyndromedStore(format!("the store at {pc:#x}: {e}"))
                    })?;
                old.extend(before);
            }
        }
        at += n;
    }
    // Finished on every register read so far (the report of a protected write reads them
    // all), so only those the store changes are written back.
    let mut regs = vcpu.known_registers();
    store.finish(&mut regs, &old, done.get());
    vcpu.set_registers(&regs)?;
    engine.count_emulated_store();
    // The PC was read before the vCPU's register file.
    Ok((vcpu.reads + 1, vcpu.writes))
}
