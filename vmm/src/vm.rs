//! The VM as the rest of the VMM sees it (memory, vCPU fds, device buses, the console), the
//! checks of its configuration, and the memslot registration every architecture shares. What a
//! bootable VM is made of (memory layout, interrupt controller, devices, boot protocol, vCPU
//! set-up) is the architecture's: [`crate::arch::Host::create_vm`].

use crate::arch::VmmArch;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use probe_core::protect::SlotPiece;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch;
use crate::devices::console::{ConsoleOut, ConsoleWatch};
use crate::devices::serial::SerialPort;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MMIO_LEN, MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::{DiskError, DiskSpec, OpenDisk, VirtioIrq, open_disks};
use crate::devices::{MmioBus, PioBus, ReadOnlyRam};

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
    /// The `--disk` image cannot be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A device could not be set up.
    #[error("device: {0}")]
    Device(String),
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
    /// `--disk`: the images the guest sees as `/dev/vd*` (virtio-blk on virtio-mmio).
    pub disks: Vec<DiskSpec>,
}

/// What `create_vm` gets besides the configuration, checked before anything is allocated:
/// the initrd's bytes and the opened, locked disk image.
#[derive(Debug, Default)]
pub struct BootInputs {
    /// The initrd, read.
    pub initrd: Option<Vec<u8>>,
    /// The disks, opened and locked, in command-line order.
    pub disks: Vec<OpenDisk>,
}

/// A VM ready to run: memory loaded, devices attached, vCPUs configured.
pub struct Vm {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM handle.
    pub fd: Arc<VmFd>,
    /// Guest RAM's memslots, which `--protect` cuts into read-only and writable pieces.
    pub slots: Arc<Mutex<MemorySlots>>,
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
        let inputs = BootInputs {
            initrd: initrd_bytes,
            disks: open_disks(&config.disks)?,
        };
        arch::Host::create_vm(kvm, config, inputs, console_out)
    }
}

/// Puts a virtio-blk device serving `disk` (the guest's `index`th) on the MMIO bus at `base`
/// (a page), interrupting on `gsi` through an irqfd; queue notifications go to its I/O thread
/// through an ioeventfd, so they never exit to user space. The device writes no guest memory
/// that `read_only` holds.
pub fn attach_block_device(
    fd: &VmFd,
    (memory, read_only): (&GuestMemoryMmap, &Arc<ReadOnlyRam>),
    mmio: &mut MmioBus,
    (disk, index): (OpenDisk, usize),
    base: u64,
    gsi: u32,
) -> Result<(), VmError> {
    let irq = VirtioIrq::new().map_err(VmError::EventFd)?;
    fd.register_irqfd(&irq.evt, gsi)
        .map_err(kvm_err("KVM_IRQFD (virtio-blk)"))?;
    let transport = MmioTransport::new(
        Box::new(Block::new(disk, index, read_only.clone())),
        memory.clone(),
        irq,
    )
    .map_err(|e| VmError::Device(e.to_string()))?;
    fd.register_ioevent(
        transport.notify_event(),
        &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
        0u32,
    )
    .map_err(kvm_err("KVM_IOEVENTFD (virtio-blk queue notify)"))?;
    mmio.insert(base, MMIO_LEN, Arc::new(Mutex::new(transport)));
    Ok(())
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

/// Guest RAM's memslots: each RAM region as one slot, or as the pieces `--protect` cut it into
/// (read-only where a protected region's pages are). The XOL area's slots never change.
pub struct MemorySlots {
    fd: Arc<VmFd>,
    /// Each RAM region (guest physical start, length, host address) and its slots now.
    ram: Vec<RamSlots>,
    /// Slot numbers free for new pieces.
    free: Vec<u32>,
    /// The next slot number never used.
    next: u32,
    /// What of guest RAM the guest may not write, for the devices to honour too.
    read_only: Arc<ReadOnlyRam>,
}

struct RamSlots {
    gpa: u64,
    len: u64,
    host: u64,
    /// (slot number, piece).
    pieces: Vec<(u32, SlotPiece)>,
}

/// Errors while changing memslots at run time.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// KVM refused a memslot change.
    #[error(
        "KVM_SET_USER_MEMORY_REGION ({what} slot {slot} at {gpa:#x}, {len:#x} bytes): {source}"
    )]
    Kvm {
        /// Deleting or adding.
        what: &'static str,
        /// The slot number.
        slot: u32,
        /// Its guest physical start.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// A protected page is not in guest RAM.
    #[error("guest physical page {0:#x} is not in guest RAM")]
    OutsideRam(u64),
}

fn set_slot(
    fd: &VmFd,
    slot: u32,
    gpa: u64,
    len: u64,
    host: u64,
    flags: u32,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot,
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host,
        flags,
    };
    // SAFETY: the host range is a live mmap owned by the VM's guest memory, which outlives
    // the VM fd; pieces of one region cover it without overlapping, and a size of zero
    // deletes the slot.
    unsafe { fd.set_user_memory_region(region) }
}

impl MemorySlots {
    /// What of guest RAM the guest may not write, shared with the devices.
    pub fn read_only(&self) -> Arc<ReadOnlyRam> {
        self.read_only.clone()
    }

    /// Makes the guest physical page ranges `protected` (page-aligned) read-only to the guest
    /// and the rest of RAM writable again: only the regions whose pieces change are redone,
    /// each by deleting its slots and adding the new pieces. Every vCPU must be out of
    /// `KVM_RUN` (a vCPU running between the two would find no memory there). The contents
    /// of memory never change.
    pub fn protect(&mut self, protected: &[(u64, u64)]) -> Result<(), SlotError> {
        if let Some(&(page, _)) = protected
            .iter()
            .find(|(s, e)| !self.ram.iter().any(|r| *s >= r.gpa && *e <= r.gpa + r.len))
        {
            return Err(SlotError::OutsideRam(page));
        }
        // Devices refuse the new pages from now on, and a failure below leaves them refused
        // until the caller puts the old set back.
        self.read_only.set_protected(protected);
        for r in &mut self.ram {
            let layout = probe_core::protect::slot_layout(r.gpa, r.len, protected);
            if r.pieces.iter().map(|(_, p)| *p).eq(layout.iter().copied()) {
                continue;
            }
            for (slot, p) in r.pieces.drain(..) {
                set_slot(&self.fd, slot, p.gpa, 0, r.host + (p.gpa - r.gpa), 0).map_err(
                    |source| SlotError::Kvm {
                        what: "deleting",
                        slot,
                        gpa: p.gpa,
                        len: p.len,
                        source,
                    },
                )?;
                self.free.push(slot);
            }
            for p in layout {
                let slot = self.free.pop().unwrap_or_else(|| {
                    self.next += 1;
                    self.next - 1
                });
                let flags = if p.readonly {
                    kvm_bindings::KVM_MEM_READONLY
                } else {
                    0
                };
                set_slot(
                    &self.fd,
                    slot,
                    p.gpa,
                    p.len,
                    r.host + (p.gpa - r.gpa),
                    flags,
                )
                .map_err(|source| SlotError::Kvm {
                    what: "adding",
                    slot,
                    gpa: p.gpa,
                    len: p.len,
                    source,
                })?;
                r.pieces.push((slot, p));
            }
        }
        Ok(())
    }

    /// Memslots guest RAM takes now.
    pub fn ram_slots(&self) -> usize {
        self.ram.iter().map(|r| r.pieces.len()).sum()
    }
}

/// Registers guest memory with KVM: one memslot per RAM region; the XOL area as two or three,
/// its page tables writable, its code pages read-only, so the guest may execute the slots but
/// never rewrite them, and its data pages (the jump plan's rings, `xol_data_bytes` at its end)
/// writable. (The tables are writable because QEMU's TCG, under the emulated runner, probes
/// every guest page-table page for write access during a walk even when Accessed and Dirty are
/// already set; a read-only table makes each walk a fault that KVM cannot emulate.)
pub fn register_memory(
    fd: &Arc<VmFd>,
    memory: &GuestMemoryMmap,
    xol_gpa: u64,
    xol_table_bytes: u64,
    xol_data_bytes: u64,
) -> Result<MemorySlots, VmError> {
    let mut slots = Vec::new();
    let mut ram = Vec::new();
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
            ram.push(RamSlots {
                gpa: start,
                len: region.len(),
                host,
                pieces: vec![(
                    slots.len() as u32,
                    SlotPiece {
                        gpa: start,
                        len: region.len(),
                        readonly: false,
                    },
                )],
            });
            slots.push((start, region.len(), host, 0));
        }
    }
    let next = slots.len() as u32;
    let read_only = Arc::new(ReadOnlyRam::new(
        slots
            .iter()
            .filter(|s| s.3 & kvm_bindings::KVM_MEM_READONLY != 0)
            .map(|&(gpa, len, _, _)| (gpa, gpa + len))
            .collect(),
    ));
    for (slot, (gpa, len, host, flags)) in slots.into_iter().enumerate() {
        set_slot(fd, slot as u32, gpa, len, host, flags)
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(MemorySlots {
        fd: fd.clone(),
        ram,
        free: Vec::new(),
        next,
        read_only,
    })
}
