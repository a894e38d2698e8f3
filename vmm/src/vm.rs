//! Building a KVM virtual machine that boots a Linux bzImage: guest memory, in-kernel irqchip
//! and PIT, devices on the port-I/O bus, the kernel, initrd and command line in memory, and
//! vCPUs configured for the 64-bit boot protocol.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{self, x86_64::boot, x86_64::layout};
use crate::devices::cmos::{CmosRtc, WallClock};
use crate::devices::console::{ConsoleOut, ConsoleWatch};
use crate::devices::i8042::I8042;
use crate::devices::serial::{COM1_BASE, COM1_GSI, COM1_LEN, SerialPort};
use crate::devices::{BusDevice, MmioBus, PioBus};

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
    /// Too many or too few vCPUs.
    #[error("guest memory of {0} MiB is too large: the XOL area sits at 64 GiB")]
    MemoryTooLarge(u64),
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
    /// The kernel file is not a bzImage.
    #[error("kernel image {path} is not a bzImage: {detail}")]
    NotBzImage {
        /// The path given.
        path: PathBuf,
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
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
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
        let mem_size = config.memory_mib << 20;
        if mem_size > layout::XOL_GPA_BASE - layout::MMIO_GAP_END + layout::MMIO_GAP_START {
            return Err(VmError::MemoryTooLarge(config.memory_mib));
        }
        let mut ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_size)
            .into_iter()
            .map(|(s, l)| (GuestAddress(s), l as usize))
            .collect();
        if config.xol_bytes > 0 {
            ranges.push((
                GuestAddress(layout::XOL_GPA_BASE),
                config.xol_bytes as usize,
            ));
        }
        let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory {
            mib: config.memory_mib,
            detail: e.to_string(),
        })?;

        let (entry, kernel_end, mut info) = arch::load_kernel(&memory, &config.kernel)?;
        info.mem_size = mem_size;
        if let (Some(bytes), Some(path)) = (&initrd_bytes, &config.initrd) {
            let len = bytes.len() as u64;
            let addr = boot::initrd_address(&info.setup_header, mem_size, len, kernel_end)
                .ok_or_else(|| VmError::InitrdTooLarge {
                    path: path.clone(),
                    len,
                })?;
            vm_memory::Bytes::write_slice(&memory, bytes, GuestAddress(addr)).map_err(|e| {
                VmError::Boot(boot::BootError::Memory {
                    what: "initrd",
                    source: e,
                })
            })?;
            info.initrd = Some((addr, len));
        }
        info.cmdline_len = boot::write_cmdline(&memory, &info.setup_header, &config.cmdline)?;
        boot::write_zero_page(&memory, &info)?;
        boot::write_boot_tables(&memory, config.vcpus as u8)?;

        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // KVM memslots: one per RAM region; the XOL area as two, its page tables writable and
        // its code pages read-only, so the guest may execute the slots but never rewrite them.
        // (The tables are writable because QEMU's TCG, under the emulated runner, probes every
        // guest page-table page for write access during a walk even when Accessed and Dirty
        // are already set; a read-only table makes each walk a fault that KVM cannot emulate.)
        let mut slots = Vec::new();
        for region in memory.iter() {
            let start = region.start_addr().raw_value();
            let host = memory
                .get_host_address(region.start_addr())
                .expect("region start is inside guest memory") as u64;
            if start == layout::XOL_GPA_BASE && region.len() > probe_core::xol::TABLE_BYTES {
                let tables = probe_core::xol::TABLE_BYTES;
                slots.push((start, tables, host, 0));
                slots.push((
                    start + tables,
                    region.len() - tables,
                    host + tables,
                    kvm_bindings::KVM_MEM_READONLY,
                ));
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
            // SAFETY: the host range is a live mmap owned by `memory`, which the returned Vm
            // keeps for as long as the VM fd exists, and slots do not overlap.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let console = ConsoleWatch::default();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        fd.register_irqfd(&serial_irq, COM1_GSI)
            .map_err(kvm_err("KVM_IRQFD (COM1)"))?;
        let serial = Arc::new(Mutex::new(SerialPort::new(
            serial_irq,
            ConsoleOut::new(console_out, console.clone()),
        )));
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        let reset_signal = reset_evt.try_clone().map_err(VmError::EventFd)?;
        let i8042: Arc<Mutex<dyn BusDevice>> =
            Arc::new(Mutex::new(I8042::new(Box::new(move || {
                let _ = reset_signal.write(1);
            }))));
        let mut pio = PioBus::default();
        pio.insert(u64::from(COM1_BASE), u64::from(COM1_LEN), serial.clone());
        pio.insert(0x60, 5, i8042);
        pio.insert(
            0x70,
            2,
            Arc::new(Mutex::new(CmosRtc::new(Box::new(WallClock::now)))),
        );

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let vcpu = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            boot::setup_vcpu(&supported, &vcpu, id as u8, config.vcpus as u8)?;
            if id == 0 {
                boot::setup_boot_vcpu(&vcpu, entry)?;
            }
            vcpus.push(vcpu);
        }
        Ok(Vm {
            kvm,
            fd,
            memory,
            vcpus,
            pio,
            mmio: MmioBus::default(),
            serial,
            console,
            reset_evt,
        })
    }
}
