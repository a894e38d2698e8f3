//! The arm64 vCPU as probe-core sees it: registers through `KVM_GET/SET_ONE_REG` (arm64 KVM has
//! no sync regs, so every register is an ioctl), read lazily (the control registers first,
//! x0-x30 only when a handler or the plan needs them) and written back only where the engine
//! changed them (a dirty-tracked cache: a hit that emulates a `nop` writes the PC alone), and
//! what the VMM reads from a paused vCPU (registers, VBAR_EL1 as the KASLR anchor: the kernel's
//! `vectors`, and the CPU features from the ID registers).

use kvm_bindings::{KVM_REG_ARM_CORE, KVM_REG_ARM64, KVM_REG_ARM64_SYSREG, KVM_REG_SIZE_U64};
use kvm_ioctls::VcpuFd;
use probe_core::arch::aarch64::{Aarch64, CpuFeatures, Registers, UNREAD_TABLE, uses};
use probe_core::vm::{VcpuAccess, VcpuError};

use crate::probing::vcpu_call;

use crate::arch::{AnchorTable, KaslrAnchor};
use crate::probing::{PausedState, ProbingError};

/// The running kernel's exception vectors (`VBAR_EL1`) against System.map's `vectors`; KASLR
/// moves the arm64 kernel by multiples of 64 KiB (its `MIN_KIMG_ALIGN` granule).
///
/// On CPUs affected by Spectre-BHB (Neoverse N1/V1/N2, Cortex-A76 and later) Linux points
/// VBAR_EL1 at one of the 2 KiB slots of `__bp_harden_el1_vectors` instead (a loop, a
/// firmware call or a clearing instruction before the vectors, and the KPTI slot), so those
/// are anchors too. (At EL0 under KPTI it holds the trampoline's alias: planting reads it
/// from a vCPU in the kernel.)
pub const KASLR_ANCHOR: KaslrAnchor = KaslrAnchor {
    symbol: "vectors",
    register: "exception vector base (VBAR_EL1)",
    align: 64 << 10,
    alternates: &[AnchorTable {
        symbol: "__bp_harden_el1_vectors",
        stride: 0x800,
        count: 4,
    }],
};

/// The id of the 64-bit core register at byte `offset` of `struct kvm_regs`.
const fn core_reg(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (offset / 4)
}

/// The id of system register `op0, op1, CRn, CRm, op2`.
pub(crate) const fn sys_reg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG as u64
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
}

/// `user_pt_regs.sp`: SP_EL0.
const SP_EL0: u64 = core_reg(31 * 8);
const PC: u64 = core_reg(32 * 8);
const PSTATE: u64 = core_reg(33 * 8);
/// PSTATE's register id, for the guest-debug code.
pub const PSTATE_REG: u64 = PSTATE;
/// `kvm_regs.sp_el1`.
const SP_EL1: u64 = core_reg(34 * 8);
const TTBR0_EL1: u64 = sys_reg(3, 0, 2, 0, 0);
const TTBR1_EL1: u64 = sys_reg(3, 0, 2, 0, 1);
const TCR_EL1: u64 = sys_reg(3, 0, 2, 0, 2);
/// VBAR_EL1: the exception vector base.
pub const VBAR_EL1: u64 = sys_reg(3, 0, 12, 0, 0);
const ID_AA64ISAR1_EL1: u64 = sys_reg(3, 0, 0, 6, 1);
const ID_AA64ISAR2_EL1: u64 = sys_reg(3, 0, 0, 6, 2);
/// The guest's virtual counter (CNTVCT_EL0, what the jump plan's trampolines read). KVM's
/// uapi names it `KVM_REG_ARM_TIMER_CNT` with the encoding (3, 3, 14, 3, 2), swapped with
/// CNTV_CVAL_EL0's by a historical mistake that the ABI keeps.
const TIMER_CNT: u64 = sys_reg(3, 3, 14, 3, 2);
/// MPIDR_EL1: the vCPU's affinity, for the device tree's `cpu` nodes.
pub const MPIDR_EL1: u64 = sys_reg(3, 0, 0, 0, 5);
/// PSTATE at boot: EL1h with D, A, I and F masked, as the boot protocol wants.
const BOOT_PSTATE: u64 = 0x3c5;

/// PSTATE.M[0]: the stack pointer is the current EL's (SP_ELx), not SP_EL0.
const PSTATE_SPSEL: u64 = 1;
/// `kvm_regs.elr_el1`.
pub const ELR_EL1: u64 = core_reg(35 * 8);
/// `kvm_regs.spsr[KVM_SPSR_EL1]`.
pub const SPSR_EL1: u64 = core_reg(36 * 8);
const ESR_EL1: u64 = sys_reg(3, 0, 5, 2, 0);
/// FAR_EL1: the address a watchpoint (or abort) reports.
pub const FAR_EL1: u64 = sys_reg(3, 0, 6, 0, 0);
/// MDSCR_EL1, as the guest wrote it (KVM keeps the guest's value apart from what it loads
/// while it debugs the guest).
pub const MDSCR_EL1: u64 = sys_reg(2, 0, 0, 2, 2);
/// PSTATE.SS: the software-step state bit (SPSR bit 21).
pub const PSTATE_SS: u64 = 1 << 21;
const SCTLR_EL1: u64 = sys_reg(3, 0, 1, 0, 0);
/// PSTATE.PAN.
const PSTATE_PAN: u64 = 1 << 22;
/// SCTLR_EL1.SPAN: when clear, taking an exception to EL1 sets PAN.
const SCTLR_SPAN: u64 = 1 << 23;

/// Where a synchronous exception taken to EL1 from `mode` (PSTATE.M[3:0]) enters the vector
/// table, and whether it comes from EL1 itself; `None` for a mode that cannot take one to EL1.
fn sync_vector(mode: u64) -> Option<(u64, bool)> {
    match mode {
        // EL1h: current EL with SP_EL1.
        0b0101 => Some((0x200, true)),
        // EL1t: current EL with SP_EL0.
        0b0100 => Some((0x000, true)),
        // EL0t: lower EL, AArch64.
        0b0000 => Some((0x400, false)),
        _ => None,
    }
}

/// The syndrome the guest sees for a debug exception KVM reported with `esr` (taken to EL2
/// from the guest, a "lower EL" for the hardware): from EL1 the guest's own EL1 takes it, so
/// breakpoint, step and watchpoint classes become their "current EL" twins (EC + 1). BRK has
/// one class for both.
fn guest_syndrome(esr: u32, from_el1: bool) -> u32 {
    let ec = esr >> 26;
    if from_el1 && matches!(ec, 0x30 | 0x32 | 0x34) {
        esr + (1 << 26)
    } else {
        esr
    }
}

/// PSTATE.{N,Z,C,V} and PSTATE.DIT: kept by exception entry.
const PSTATE_KEPT_ON_ENTRY: u64 = 0xf000_0000 | (1 << 24);
/// PSTATE.SSBS.
const PSTATE_SSBS: u64 = 1 << 12;
/// SCTLR_EL1.DSSBS: the SSBS value an exception to EL1 sets.
const SCTLR_DSSBS: u64 = 1 << 44;

/// PSTATE after a synchronous exception to EL1 taken with `pstate`, under `sctlr` (SCTLR_EL1),
/// as the Arm ARM's `AArch64.TakeException` sets it: EL1h with D, A, I and F masked; NZCV and
/// DIT kept; PAN set unless SCTLR_EL1.SPAN (else kept); SSBS from SCTLR_EL1.DSSBS; SS, IL,
/// BTYPE and UAO cleared. (TCO and ALLINT belong to MTE and FEAT_NMI, which hvprobe's guests
/// do not have.)
fn exception_entry_pstate(pstate: u64, sctlr: u64) -> u64 {
    let pan = if sctlr & SCTLR_SPAN == 0 {
        PSTATE_PAN
    } else {
        pstate & PSTATE_PAN
    };
    let ssbs = if sctlr & SCTLR_DSSBS != 0 {
        PSTATE_SSBS
    } else {
        0
    };
    BOOT_PSTATE | (pstate & PSTATE_KEPT_ON_ENTRY) | pan | ssbs
}

/// Emulates the guest taking a synchronous exception with syndrome `esr` at its current PC, as
/// the hardware would: ESR_EL1 and ELR_EL1 (the PC) and SPSR_EL1 (PSTATE) saved, PSTATE as
/// [`exception_entry_pstate`] makes it, PC to VBAR_EL1 plus the vector for where it came from.
/// arm64 KVM has no way to inject a debug exception itself.
/// Returns whether the exception came from EL0.
pub fn inject_sync_exception(fd: &VcpuFd, esr: u32) -> Result<bool, kvm_ioctls::Error> {
    inject_sync_exception_with(fd, esr, 0)
}

/// [`inject_sync_exception`], with the PSTATE bits `clear` cleared in the saved SPSR_EL1 (a
/// software step exception saves SS as 0).
pub fn inject_sync_exception_with(
    fd: &VcpuFd,
    esr: u32,
    clear: u64,
) -> Result<bool, kvm_ioctls::Error> {
    let pstate = get(fd, PSTATE)?;
    let pc = get(fd, PC)?;
    let vbar = get(fd, VBAR_EL1)?;
    let Some((offset, from_el1)) = sync_vector(pstate & 0xf) else {
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    };
    let sctlr = get(fd, SCTLR_EL1)?;
    set(fd, ESR_EL1, u64::from(guest_syndrome(esr, from_el1)))?;
    set(fd, ELR_EL1, pc)?;
    set(fd, SPSR_EL1, pstate & !clear)?;
    set(fd, PSTATE, exception_entry_pstate(pstate, sctlr))?;
    set(fd, PC, vbar + offset)?;
    Ok(!from_el1)
}

/// Reads the 64-bit register `id`.
pub fn get(fd: &VcpuFd, id: u64) -> Result<u64, kvm_ioctls::Error> {
    let mut b = [0u8; 8];
    fd.get_one_reg(id, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Writes the 64-bit register `id`.
pub fn set(fd: &VcpuFd, id: u64, v: u64) -> Result<(), kvm_ioctls::Error> {
    fd.set_one_reg(id, &v.to_le_bytes()).map(|_| ())
}

/// Sets the self-test vCPU's PC and VBAR_EL1 (EL1h, exceptions masked).
pub fn set_pc_and_vectors(fd: &VcpuFd, pc: u64, vbar: u64) -> Result<(), kvm_ioctls::Error> {
    set(fd, PSTATE, BOOT_PSTATE)?;
    set(fd, VBAR_EL1, vbar)?;
    set(fd, PC, pc)
}

/// Sets the boot vCPU's registers for the arm64 boot protocol: PC at the Image's entry, x0
/// the device tree's address, x1-x3 zero, EL1h with exceptions masked.
pub fn boot_registers(fd: &VcpuFd, entry: u64, fdt: u64) -> Result<(), kvm_ioctls::Error> {
    set(fd, PSTATE, BOOT_PSTATE)?;
    set(fd, PC, entry)?;
    set(fd, core_reg(0), fdt)?;
    for i in 1..4 {
        set(fd, core_reg(i * 8), 0)?;
    }
    Ok(())
}

/// The PC of a vCPU out of `KVM_RUN`.
pub fn read_pc(fd: &VcpuFd) -> Result<u64, kvm_ioctls::Error> {
    get(fd, PC)
}

/// Reads the register groups of the register-use mask `want` ([`uses`]) into `r`, one
/// `KVM_GET_ONE_REG` each, except those of `have`; PSTATE comes with the stack pointer (it
/// selects which one). Returns the groups read (including ones implied) and the reads made.
fn read_groups(
    fd: &VcpuFd,
    r: &mut Registers,
    have: u64,
    want: u64,
) -> Result<(u64, u64), kvm_ioctls::Error> {
    let mut want = want & !have;
    if want & uses::SP != 0 {
        want |= uses::PSTATE & !have;
    }
    let mut reads = 0;
    let mut read = |id| {
        reads += 1;
        get(fd, id)
    };
    for n in (0..31).filter(|n| want & (1 << n) != 0) {
        r.x[n] = read(core_reg(n as u64 * 8))?;
    }
    if want & uses::PSTATE != 0 {
        r.pstate = read(PSTATE)?;
    }
    let sp_is_sp_el0 = r.pstate & PSTATE_SPSEL == 0;
    if want & uses::SP != 0 {
        if sp_is_sp_el0 {
            // SP is SP_EL0 in this mode: its read gives both.
            want |= uses::SP_EL0 & !have;
        } else {
            r.sp = read(SP_EL1)?;
        }
    }
    if want & uses::SP_EL0 != 0 {
        r.sp_el0 = read(SP_EL0)?;
    }
    if want & uses::SP != 0 && sp_is_sp_el0 {
        r.sp = r.sp_el0;
    }
    let space = uses::KERNEL_SPACE | uses::USER_SPACE;
    if want & space != 0 && have & space == 0 {
        r.tcr = read(TCR_EL1)?;
    }
    if want & uses::KERNEL_SPACE != 0 {
        r.ttbr1 = read(TTBR1_EL1)?;
    }
    if want & uses::USER_SPACE != 0 {
        r.ttbr0 = read(TTBR0_EL1)?;
    }
    Ok((want, reads))
}

/// Copies the register groups of `groups` from `from` into `to`.
fn copy_groups(to: &mut Registers, from: &Registers, groups: u64) {
    for n in (0..31).filter(|n| groups & (1 << n) != 0) {
        to.x[n] = from.x[n];
    }
    if groups & uses::PSTATE != 0 {
        to.pstate = from.pstate;
    }
    if groups & uses::SP != 0 {
        to.sp = from.sp;
    }
    if groups & uses::SP_EL0 != 0 {
        to.sp_el0 = from.sp_el0;
    }
    if groups & (uses::KERNEL_SPACE | uses::USER_SPACE) != 0 {
        to.tcr = from.tcr;
    }
    if groups & uses::KERNEL_SPACE != 0 {
        to.ttbr1 = from.ttbr1;
    }
    if groups & uses::USER_SPACE != 0 {
        to.ttbr0 = from.ttbr0;
    }
}

/// The registers before anything is read: the PC, page-table roots no walk gets through.
fn unread_registers(pc: u64) -> Registers {
    Registers {
        pc,
        ttbr0: UNREAD_TABLE,
        ttbr1: UNREAD_TABLE,
        ..Registers::default()
    }
}

/// Every register the engine sees.
fn read_registers(fd: &VcpuFd) -> Result<Registers, kvm_ioctls::Error> {
    let mut r = unread_registers(get(fd, PC)?);
    read_groups(fd, &mut r, 0, uses::ALL)?;
    Ok(r)
}

/// One arm64 vCPU handling a debug exit. Registers are read lazily, by the groups of a
/// register-use mask ([`uses`]: the PC comes with the exit; x0-x30 one by one, PSTATE, the
/// stack pointers, the page-table roots only when the engine needs them) and written back only
/// where they changed; every `KVM_GET/SET_ONE_REG` is counted.
pub struct KvmVcpu<'a> {
    /// The vCPU index.
    pub id: u32,
    /// Its fd.
    pub fd: &'a mut VcpuFd,
    /// The registers as last read or written, to write back only what changed.
    cache: Registers,
    /// Which groups `cache` holds (a register-use mask; the PC always).
    read: u64,
    /// General-purpose registers the engine wrote whole without reading them: written back
    /// whatever `cache` has for them.
    overwritten: u64,
    /// `KVM_GET_ONE_REG` calls made for this exit.
    pub reads: u64,
    /// `KVM_SET_ONE_REG` calls made for this exit.
    pub writes: u64,
}

impl<'a> KvmVcpu<'a> {
    /// vCPU `id` out of `KVM_RUN` at `pc` (read when the exit was decoded), with nothing read
    /// yet.
    pub fn new(id: u32, fd: &'a mut VcpuFd, pc: u64) -> KvmVcpu<'a> {
        KvmVcpu {
            id,
            fd,
            cache: unread_registers(pc),
            read: 0,
            overwritten: 0,
            reads: 0,
            writes: 0,
        }
    }

    /// The registers as known now: every group read so far (by anyone) with its value, the
    /// rest as unread.
    pub fn known_registers(&self) -> Registers {
        self.cache.clone()
    }

    /// Reads the groups of `used` not read yet into the cache; returns which it read.
    fn read_in(&mut self, used: u64) -> Result<u64, VcpuError> {
        let (fresh, reads) = read_groups(self.fd, &mut self.cache, self.read, used)
            .map_err(vcpu_call("KVM_GET_ONE_REG"))?;
        self.reads += reads;
        self.read |= fresh;
        Ok(fresh)
    }
}

/// Whether `new` changes a register of a group outside `read` (one that cannot be compared
/// with the guest's value, so cannot be written back).
fn changes_unread(old: &Registers, new: &Registers, read: u64) -> bool {
    let unread = |group: u64| read & group == 0;
    (0..31).any(|n| unread(1 << n) && new.x[n] != old.x[n])
        || (unread(uses::PSTATE) && new.pstate != old.pstate)
        || (unread(uses::SP) && new.sp != old.sp)
        || (unread(uses::SP_EL0) && new.sp_el0 != old.sp_el0)
}

impl VcpuAccess<Aarch64> for KvmVcpu<'_> {
    fn id(&self) -> u32 {
        self.id
    }

    fn registers(&mut self) -> Result<Registers, VcpuError> {
        self.read_in(uses::ALL)?;
        Ok(self.cache.clone())
    }

    /// The PC, known from the exit: nothing read.
    fn exit_registers(&mut self) -> Result<Registers, VcpuError> {
        Ok(self.cache.clone())
    }

    fn complete_registers(&mut self, regs: &mut Registers) -> Result<(), VcpuError> {
        self.complete_registers_in(regs, uses::ALL)
    }

    /// Reads only the groups of `used` not read yet (one `KVM_GET_ONE_REG` each register: one
    /// for an emulated `mov x9, x30` and PSTATE for the trap, not thirty-seven); those read
    /// already keep the values `regs` has.
    fn complete_registers_in(&mut self, regs: &mut Registers, used: u64) -> Result<(), VcpuError> {
        let fresh = self.read_in(used)?;
        copy_groups(regs, &self.cache, fresh);
        Ok(())
    }

    /// Writes what differs from the cache. Registers never read cannot be compared: a change
    /// to one is refused rather than guessed at.
    fn set_registers(&mut self, regs: &Registers) -> Result<(), VcpuError> {
        let old = self.cache.clone();
        if changes_unread(&old, regs, self.read) {
            return Err(VcpuError::UnreadRegistersWritten);
        }
        let mut writes = 0;
        let mut w = |id: u64, new: u64, old: u64| -> Result<(), VcpuError> {
            if new != old {
                writes += 1;
                set(self.fd, id, new).map_err(vcpu_call("KVM_SET_ONE_REG"))?;
            }
            Ok(())
        };
        for (i, (new, old)) in regs.x.iter().zip(old.x.iter()).enumerate() {
            if self.overwritten & (1 << i) != 0 {
                w(core_reg(i as u64 * 8), *new, !*new)?;
            } else {
                w(core_reg(i as u64 * 8), *new, *old)?;
            }
        }
        self.overwritten = 0;
        w(PC, regs.pc, old.pc)?;
        w(PSTATE, regs.pstate, old.pstate)?;
        w(SP_EL0, regs.sp_el0, old.sp_el0)?;
        if self.read & uses::SP != 0 {
            let sp_reg = if regs.pstate & PSTATE_SPSEL != 0 {
                SP_EL1
            } else {
                SP_EL0
            };
            w(sp_reg, regs.sp, old.sp)?;
        }
        self.writes += writes;
        self.cache = regs.clone();
        Ok(())
    }

    /// Those not read yet count as read from now on, and are written back whatever value
    /// they get.
    fn overwrote(&mut self, registers: u64) {
        let fresh = registers & uses::GENERAL & !self.read;
        self.read |= fresh;
        self.overwritten |= fresh;
    }

    /// arm64 has no `sti` interrupt shadow; the engine never asks.
    fn block_interrupts_once(&mut self) -> Result<(), VcpuError> {
        Ok(())
    }
}

/// What the guest's ID registers say it can do (KVM hides pointer authentication unless the
/// vCPU was made with it, which hvprobe's VMM never asks for); if they cannot be read, the
/// safe default (it may authenticate).
fn cpu_features(fd: &VcpuFd) -> CpuFeatures {
    match (get(fd, ID_AA64ISAR1_EL1), get(fd, ID_AA64ISAR2_EL1)) {
        (Ok(isar1), Ok(isar2)) => CpuFeatures::from_id_registers(isar1, isar2),
        _ => CpuFeatures::default(),
    }
}

/// Reads the state of a vCPU that is out of `KVM_RUN`: registers, VBAR_EL1 and the CPU
/// features from the ID registers.
pub fn paused_state(fd: &mut VcpuFd) -> Result<PausedState, ProbingError> {
    let kvm = |what| move |source| ProbingError::Kvm { what, source };
    let regs = read_registers(fd).map_err(kvm("KVM_GET_ONE_REG"))?;
    Ok(PausedState {
        // At EL1 (at EL0 under KPTI, VBAR_EL1 holds the trampoline's alias and TTBR1 the
        // trampoline's tables).
        in_kernel: regs.pstate & 0xf != 0,
        regs,
        kaslr_anchor: get(fd, VBAR_EL1).map_err(kvm("KVM_GET_ONE_REG (VBAR_EL1)"))?,
        cpu_features: cpu_features(fd),
        counter: get(fd, TIMER_CNT)
            .ok()
            .zip(counter_khz())
            .filter(|(_, khz)| *khz > 0),
        control: match (get(fd, VBAR_EL1), get(fd, SCTLR_EL1)) {
            (Ok(vbar), Ok(sctlr)) => vec![
                ("VBAR_EL1", vbar),
                ("SCTLR_EL1.WXN", sctlr >> 19 & 1),
                ("SCTLR_EL1.SPAN", sctlr >> 23 & 1),
            ],
            _ => Vec::new(),
        },
    })
}

/// The system counter's rate in kHz: CNTFRQ_EL0, which the guest's virtual counter shares
/// (KVM offsets the guest's count, never its rate).
fn counter_khz() -> Option<u64> {
    let hz: u64;
    // SAFETY: reading CNTFRQ_EL0 has no side effects, and Linux lets EL0 read it (it enables
    // EL0 access to the virtual counter for the vDSO, which makes the frequency readable).
    unsafe {
        std::arch::asm!("mrs {}, cntfrq_el0", out(reg) hz, options(nomem, nostack, preserves_flags));
    }
    (hz > 0).then_some(hz / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceptions_enter_the_vector_of_where_they_came_from() {
        assert_eq!(sync_vector(0b0101), Some((0x200, true)));
        assert_eq!(sync_vector(0b0100), Some((0x000, true)));
        assert_eq!(sync_vector(0b0000), Some((0x400, false)));
        assert_eq!(sync_vector(0b1001), None);
        // A software step from EL1 is the guest's "current EL" class; BRK keeps its class.
        assert_eq!(guest_syndrome(0x32 << 26 | 1 << 25, true) >> 26, 0x33);
        assert_eq!(guest_syndrome(0x32 << 26, false) >> 26, 0x32);
        assert_eq!(guest_syndrome(0x3c << 26 | 0x800, true), 0x3c << 26 | 0x800);
    }

    #[test]
    fn exception_entry_keeps_the_flags_and_dit_and_takes_ssbs_from_sctlr() {
        // From EL1h with NZCV = 0b1010, DIT, SSBS, BTYPE 0b11, SS and PAN, interrupts on.
        let pstate =
            0xa000_0000 | 1 << 24 | 1 << 21 | PSTATE_PAN | PSTATE_SSBS | 0b11 << 10 | 0b0101;
        // SCTLR_EL1 with SPAN set (PAN kept) and DSSBS clear.
        let entry = exception_entry_pstate(pstate, SCTLR_SPAN);
        assert_eq!(entry, 0xa000_0000 | 1 << 24 | PSTATE_PAN | 0x3c5);
        // From EL0 with PAN clear: SPAN clear sets PAN; DSSBS sets SSBS.
        let entry = exception_entry_pstate(0x4000_0000, SCTLR_DSSBS);
        assert_eq!(entry, 0x4000_0000 | PSTATE_PAN | PSTATE_SSBS | 0x3c5);
    }

    #[test]
    fn registers_never_read_cannot_be_written_back() {
        let old = unread_registers(0x1000);
        let mut new = old.clone();
        new.pc = 0x1004;
        new.x[9] = 7;
        // x9 read: the change is written; unread, refused.
        assert!(!changes_unread(&old, &new, 1 << 9));
        assert!(changes_unread(&old, &new, 1 << 30));
        // The flags and stack pointers likewise; the PC always came with the exit.
        let mut flags = old.clone();
        flags.pstate = 0x3c5;
        assert!(changes_unread(&old, &flags, 0));
        assert!(!changes_unread(&old, &flags, uses::PSTATE));
        let mut sp = old.clone();
        sp.sp = 0x8000;
        assert!(changes_unread(&old, &sp, uses::PSTATE));
        assert!(!changes_unread(&old, &sp, uses::SP | uses::PSTATE));
        let mut pc_only = old.clone();
        pc_only.pc = 0x2000;
        assert!(!changes_unread(&old, &pc_only, 0));
    }

    #[test]
    fn register_ids_match_the_kernels_encoding() {
        // arch/arm64/include/uapi/asm/kvm.h: KVM_REG_ARM_CORE_REG(regs.pc) = 0x6030 0000 0010 0040.
        assert_eq!(PC, 0x6030_0000_0010_0040);
        assert_eq!(core_reg(0), 0x6030_0000_0010_0000);
        // ARM64_SYS_REG(3, 0, 12, 0, 0), VBAR_EL1 = 0x6030 0000 0013 c600.
        assert_eq!(VBAR_EL1, 0x6030_0000_0013_c600);
        assert_eq!(TTBR1_EL1, 0x6030_0000_0013_c101);
        // KVM_REG_ARM_CORE_REG(elr_el1) and spsr[0]: offsets 0x118 and 0x120 of kvm_regs.
        assert_eq!(ELR_EL1, 0x6030_0000_0010_0046);
        assert_eq!(SPSR_EL1, 0x6030_0000_0010_0048);
        assert_eq!(ESR_EL1, 0x6030_0000_0013_c290);
        // ARM64_SYS_REG(3, 0, 0, 6, 1): ID_AA64ISAR1_EL1 = 0x6030 0000 0013 c031.
        assert_eq!(ID_AA64ISAR1_EL1, 0x6030_0000_0013_c031);
    }
}
