//! The trap self-test: a tiny guest (a few instructions in one page, the architecture's:
//! [`crate::arch::Host::probe_traps`]) run on this KVM to learn which debug traps it actually
//! delivers: software-breakpoint exits, hardware execute breakpoints and single-steps. Nested
//! or emulated KVMs differ here (QEMU's TCG, for one, hides a nested x86 guest's int3 unless
//! patched), so hvprobe measures instead of assuming. Takes a few milliseconds.

use crate::arch::VmmArch;
use kvm_ioctls::Kvm;

/// Which traps this KVM delivers; each is `Err(why)` when it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrapSupport {
    /// The software breakpoint instruction reaches the VMM as a debug exit (`int3` as #BP,
    /// `BRK` as EC 0x3C).
    pub software: Result<(), String>,
    /// A hardware execute breakpoint reaches the VMM as a debug exit.
    pub hardware: Result<(), String>,
    /// Single-stepping reaches the VMM as a debug exit after one instruction.
    pub single_step: Result<(), String>,
    /// How many hardware breakpoints a vCPU has (arm64: `KVM_CAP_GUEST_DEBUG_HW_BPS`; x86: its
    /// four debug registers).
    pub hardware_count: usize,
    /// How a trap that was not hvprobe's goes back to the guest.
    pub reinjection: Reinjection,
    /// The software breakpoint's name (`int3`, `brk`).
    pub breakpoint_name: &'static str,
}

/// How a trap that was not hvprobe's goes back to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reinjection {
    /// KVM injects it (x86's `KVM_GUESTDBG_INJECT_BP`).
    ByKvm,
    /// The VMM emulates the exception entry (arm64); the self-test checks that it reaches the
    /// guest's own vector with the right syndrome and return address.
    Emulated(Result<(), String>),
}

impl TrapSupport {
    /// One line for the user.
    pub fn summary(&self) -> String {
        let f = |r: &Result<(), String>| match r {
            Ok(()) => "yes".to_string(),
            Err(e) => format!("no ({e})"),
        };
        let hw = match &self.hardware {
            Ok(()) => self.hardware_count.to_string(),
            Err(e) => format!("0 (of {}: {e})", self.hardware_count),
        };
        format!(
            "{} exits {}, step {}, hw breakpoints {hw}, reinjection {}",
            self.breakpoint_name,
            f(&self.software),
            f(&self.single_step),
            match &self.reinjection {
                Reinjection::ByKvm => "by KVM".to_string(),
                Reinjection::Emulated(r) => f(r),
            }
        )
    }
}

/// A VM for a self-test payload: `mem` (one region at `base`) as its only memslot, and one vCPU.
/// The caller keeps `mem` alive for as long as the VM.
pub fn payload_vm(
    kvm: &Kvm,
    mem: &vm_memory::GuestMemoryMmap,
    base: u64,
    size: u64,
) -> Result<(kvm_ioctls::VmFd, kvm_ioctls::VcpuFd), String> {
    use vm_memory::GuestMemoryBackend;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let host = mem
        .get_host_address(vm_memory::GuestAddress(base))
        .map_err(|e| e.to_string())?;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: base,
        memory_size: size,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: `mem` maps `size` bytes at `host`, and the caller keeps it alive past the VM.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    Ok((vm, vcpu))
}

/// Runs the self-test on `kvm`.
pub fn probe_traps(kvm: &Kvm) -> Result<TrapSupport, String> {
    crate::arch::Host::probe_traps(kvm)
}
