//! Decides whether this host's KVM can boot and debug a stock guest kernel, and says why not in
//! one line when it cannot.

use crate::arch::VmmArch;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Why the host's KVM cannot do hvprobe's job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostCheckError {
    /// There is no `/dev/kvm`.
    #[error("/dev/kvm does not exist: this host offers no KVM")]
    NoDevKvm,
    /// `/dev/kvm` exists but cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    CannotOpen(String),
    /// `/dev/kvm` is the software PVM module.
    #[error(
        "/dev/kvm is the software kvm_pvm module, which cannot boot an unmodified kernel or deliver int3 exits"
    )]
    Pvm,
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    /// A capability hvprobe needs is missing.
    #[error("KVM lacks {0}, which hvprobe needs")]
    MissingCap(&'static str),
}

/// What hvprobe learned about a usable host KVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFacts {
    /// Guest-debug flags this KVM accepts (`KVM_CAP_SET_GUEST_DEBUG2`), 0 if it does not say.
    pub guest_debug_flags: u32,
    /// Whether registers can travel in the shared `kvm_run` page (`KVM_CAP_SYNC_REGS`).
    pub sync_regs: bool,
    /// Whether the CPU offers SVM or VMX (false under PVM or a software CPU).
    pub hardware_virt: bool,
}

const KVM_CAP_SET_GUEST_DEBUG2: i32 = 195;

/// Whether `/proc/cpuinfo` lists `flag` (e.g. `svm`, `vmx`) for this machine's CPUs.
pub fn cpu_flag(flag: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == flag))
        })
        .unwrap_or(false)
}

/// Checks `/dev/kvm` and the capabilities hvprobe needs.
pub fn check_host() -> Result<KvmFacts, HostCheckError> {
    check_host_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

/// [`check_host`] with the device node and sysfs module directory given, for tests.
pub fn check_host_at(dev_kvm: &Path, sys_module: &Path) -> Result<KvmFacts, HostCheckError> {
    if !dev_kvm.exists() {
        return Err(HostCheckError::NoDevKvm);
    }
    if sys_module.join("kvm_pvm").exists() {
        return Err(HostCheckError::Pvm);
    }
    let kvm = Kvm::new_with_path(
        std::ffi::CString::new(dev_kvm.as_os_str().as_encoded_bytes())
            .map_err(|e| HostCheckError::CannotOpen(e.to_string()))?
            .as_c_str(),
    )
    .map_err(|e| HostCheckError::CannotOpen(e.to_string()))?;
    let api = kvm.get_api_version();
    if api != 12 {
        return Err(HostCheckError::ApiVersion(api));
    }
    for &(cap, name) in crate::arch::Host::REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(HostCheckError::MissingCap(name));
        }
    }
    let sync_reg_flags = kvm.check_extension_int(Cap::SyncRegs);
    let debug2 = kvm.check_extension_raw(KVM_CAP_SET_GUEST_DEBUG2 as libc::c_ulong);
    let hardware_virt = cpu_flag("svm") || cpu_flag("vmx");
    if cfg!(target_arch = "x86_64") && !hardware_virt {
        // An x86 KVM that is not backed by SVM or VMX is PVM under another name.
        return Err(HostCheckError::Pvm);
    }
    Ok(KvmFacts {
        guest_debug_flags: debug2.max(0) as u32,
        sync_regs: sync_reg_flags > 0,
        hardware_virt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_node_and_pvm_module_are_named() {
        let dir = std::env::temp_dir().join(format!("hvprobe-hostcheck-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("module/kvm_pvm")).unwrap();
        let err = check_host_at(&dir.join("no-such-kvm"), &dir.join("module")).unwrap_err();
        assert_eq!(err, HostCheckError::NoDevKvm);
        std::fs::write(dir.join("kvm"), b"").unwrap();
        let err = check_host_at(&dir.join("kvm"), &dir.join("module")).unwrap_err();
        assert_eq!(err, HostCheckError::Pvm);
        assert!(err.to_string().contains("kvm_pvm"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
