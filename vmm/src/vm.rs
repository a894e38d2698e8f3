//! The VM as the rest of the VMM sees it (memory, vCPU fds, device buses, the console), the
//! checks of its configuration, and the memslot registration every architecture shares. What a
//! bootable VM is made of (memory layout, interrupt controller, devices, boot protocol, vCPU
//! set-up) is the architecture's: [`crate::arch::Host::create_vm`].

use crate::arch::VmmArch;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch;
use crate::devices::console::{ConsoleOut, ConsoleWatch};
use crate::devices::serial::SerialPort;
use crate::devices::{MmioBus, PioBus};

/// Errors while building the VM. Each names the input or the KVM call that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The memory size is unusable.
    #[error("guest memory of {0} MiB is too small: at least 64 MiB are needed to boot Linux")]
    MemoryTooSmall(u64),
    /// The memory size reaches into the XOL area.
    #[error("guest memory of {0} MiB is too large: the XOL area sits at 64 GiB")]
    MemoryTooLarge(u64),
    /// Too many or too few vCPUs.
    #[error("vCPU count {0} is out of range: 1 to 254")]
    VcpuCount(u32),
    /// Guest memory could not be allocated.
    #[error("allocating {mib} MiB of guest memory: {detail}")]
    Memory {
        /// Size asked.
        mib: u64,
        /// The error.
        detail: String,
    },
    /// The kernel file could not be opened.
    #[error("kernel image {path}: {source}")]
    KernelFile {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The kernel file is not an image of the format the architecture boots.
    #[error("kernel image {path} is not {format}: {detail}")]
    BadKernel {
        /// The path given.
        path: PathBuf,
        /// The format expected, with its article (`a bzImage`, `an arm64 Image`).
        format: &'static str,
        /// What the loader said.
        detail: String,
    },
    /// The initrd could not be read.
    #[error("initrd {path}: {source}")]
    InitrdFile {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({len} bytes) does not fit in guest memory below the kernel's limit")]
    InitrdTooLarge {
        /// The path given.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// Writing a boot structure failed.
    #[cfg(target_arch = "x86_64")]
    #[error(transparent)]
    Boot(#[from] crate::arch::x86_64::boot::BootError),
    /// The device tree could not be written.
    #[error("device tree: {0}")]
    Fdt(String),
    /// This build's architecture cannot build a VM yet.
    #[error("{0}")]
    Unsupported(&'static str),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Maps a failed KVM call to [`VmError::Kvm`] naming it.
pub fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What to boot and how big the machine is.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initrd, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Size of the XOL area to reserve (0: none), outside the guest's RAM map.
    pub xol_bytes: u64,
    /// Bytes at the XOL area's end that the guest may write (the jump plan's rings).
    pub xol_data_bytes: u64,
}

/// A VM ready to run: memory loaded, devices attached, vCPUs configured.
pub struct Vm {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM handle.
    pub fd: VmFd,
    /// Guest RAM.
    pub memory: GuestMemoryMmap,
    /// The vCPUs, in APIC ID order; vCPU 0 boots, the others wait for INIT/SIPI.
    pub vcpus: Vec<VcpuFd>,
    /// The port-I/O bus shared by the vCPU threads.
    pub pio: PioBus,
    /// MMIO devices, shared by the vCPU threads (empty on x86: its devices are on ports).
    pub mmio: MmioBus,
    /// COM1, also reachable here for console input.
    pub serial: Arc<Mutex<SerialPort>>,
    /// What the console has shown.
    pub console: ConsoleWatch,
    /// Signalled by the i8042 when the guest resets itself.
    pub reset_evt: EventFd,
    /// In-kernel devices (arm64's GIC), kept open for the VM's life.
    pub devices: Vec<kvm_ioctls::DeviceFd>,
}

const MIN_MEMORY_MIB: u64 = 64;

impl Vm {
    /// Creates the VM, loads the kernel and initrd, and configures the vCPUs; the console
    /// output goes to `console_out`.
    pub fn new(
        kvm: Kvm,
        config: &VmConfig,
        console_out: Box<dyn Write + Send>,
    ) -> Result<Vm, VmError> {
        if config.memory_mib < MIN_MEMORY_MIB {
            return Err(VmError::MemoryTooSmall(config.memory_mib));
        }
        if config.vcpus == 0 || config.vcpus > 254 {
            return Err(VmError::VcpuCount(config.vcpus));
        }
        // Check the inputs before anything is allocated.
        let initrd_bytes = match &config.initrd {
            Some(p) => Some(std::fs::read(p).map_err(|source| VmError::InitrdFile {
                path: p.clone(),
                source,
            })?),
            None => None,
        };
        arch::Host::create_vm(kvm, config, initrd_bytes, console_out)
    }
}

/// The console UART (vm-superio's 8250) raising `gsi` through an irqfd, writing to
/// `console_out`, and the watcher of what it shows.
pub fn console_uart(
    fd: &VmFd,
    gsi: u32,
    console_out: Box<dyn Write + Send>,
) -> Result<(Arc<Mutex<SerialPort>>, ConsoleWatch), VmError> {
    let console = ConsoleWatch::default();
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    fd.register_irqfd(&irq, gsi)
        .map_err(kvm_err("KVM_IRQFD (console UART)"))?;
    let serial = Arc::new(Mutex::new(
        SerialPort::new(irq, ConsoleOut::new(console_out, console.clone()))
            .map_err(VmError::EventFd)?,
    ));
    Ok((serial, console))
}

/// Registers guest memory with KVM: one memslot per RAM region; the XOL area as two or three,
/// its page tables writable, its code pages read-only, so the guest may execute the slots but
/// never rewrite them, and its data pages (the jump plan's rings, `xol_data_bytes` at its end)
/// writable. (The tables are writable because QEMU's TCG, under the emulated runner, probes
/// every guest page-table page for write access during a walk even when Accessed and Dirty are
/// already set; a read-only table makes each walk a fault that KVM cannot emulate.)
pub fn register_memory(
    fd: &VmFd,
    memory: &GuestMemoryMmap,
    xol_gpa: u64,
    xol_table_bytes: u64,
    xol_data_bytes: u64,
) -> Result<(), VmError> {
    let mut slots = Vec::new();
    for region in memory.iter() {
        let start = region.start_addr().raw_value();
        let host = memory
            .get_host_address(region.start_addr())
            .expect("region start is inside guest memory") as u64;
        if start == xol_gpa && region.len() > xol_table_bytes + xol_data_bytes {
            let code = region.len() - xol_table_bytes - xol_data_bytes;
            slots.push((start, xol_table_bytes, host, 0));
            slots.push((
                start + xol_table_bytes,
                code,
                host + xol_table_bytes,
                kvm_bindings::KVM_MEM_READONLY,
            ));
            if xol_data_bytes > 0 {
                let at = xol_table_bytes + code;
                slots.push((start + at, xol_data_bytes, host + at, 0));
            }
        } else {
            slots.push((start, region.len(), host, 0));
        }
    }
    for (slot, (guest_phys_addr, memory_size, userspace_addr, flags)) in
        slots.into_iter().enumerate()
    {
        let region_desc = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            flags,
        };
        // SAFETY: the host range is a live mmap owned by `memory`, which the returned Vm keeps
        // for as long as the VM fd exists, and slots do not overlap.
        unsafe { fd.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}
