//! The x86_64 machine: guest memory around the PCI hole with the XOL area at 64 GiB, the
//! bzImage, initrd and command line in memory with the zero page, MP table and ACPI tables,
//! in-kernel irqchip and PIT, COM1, the i8042 (the guest's reset) and the CMOS clock on the
//! port-I/O bus, and vCPUs configured for the 64-bit boot protocol.

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::Kvm;
use probe_core::xol::XolArea;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::acpi::VirtioMmio;
use super::{Guest, boot, layout};
use crate::devices::cmos::{CmosRtc, WallClock};
use crate::devices::i8042::I8042;
use crate::devices::serial::{COM1_BASE, COM1_GSI, COM1_LEN};
use crate::devices::virtio::mmio::MMIO_LEN;
use crate::devices::{BusDevice, MmioBus, PioBus};
use crate::vm::{
    BootInputs, Vm, VmConfig, VmError, attach_block_device, console_uart, kvm_err, register_memory,
};

/// Builds the x86_64 VM of `config` (its initrd already read into `initrd_bytes`).
pub fn create_vm(
    kvm: Kvm,
    config: &VmConfig,
    inputs: BootInputs,
    console_out: Box<dyn Write + Send>,
) -> Result<Vm, VmError> {
    let BootInputs {
        initrd: initrd_bytes,
        disks,
    } = inputs;
    // One page and one I/O APIC pin per disk, from the first of each.
    let virtio: Vec<VirtioMmio> = (0..disks.len())
        .map(|i| VirtioMmio {
            base: layout::VIRTIO_MMIO_BASE + i as u64 * MMIO_LEN,
            len: MMIO_LEN,
            gsi: layout::VIRTIO_MMIO_GSI + i as u32,
        })
        .collect();
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

    let (entry, kernel_end, mut info) = super::kernel::load_kernel(&memory, &config.kernel)?;
    info.mem_size = mem_size;
    if let (Some(bytes), Some(path)) = (&initrd_bytes, &config.initrd) {
        let len = bytes.len() as u64;
        let addr = boot::initrd_address(&info.setup_header, mem_size, len, kernel_end).ok_or_else(
            || VmError::InitrdTooLarge {
                path: path.clone(),
                len,
            },
        )?;
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
    boot::write_boot_tables(&memory, config.vcpus as u8, &virtio)?;

    let fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    let slots = register_memory(
        &fd,
        &memory,
        layout::XOL_GPA_BASE,
        XolArea::new(
            <Guest as probe_core::arch::Arch>::XOL,
            layout::XOL_GPA_BASE,
            1,
        )
        .map(|x| x.table_bytes())
        .unwrap_or(0),
        config.xol_data_bytes,
    )?;
    fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    fd.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let (serial, console) = console_uart(&fd, COM1_GSI, console_out)?;
    let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    let reset_signal = reset_evt.try_clone().map_err(VmError::EventFd)?;
    let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(I8042::new(Box::new(move || {
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

    let mut mmio = MmioBus::default();
    for (i, (disk, v)) in disks.into_iter().zip(&virtio).enumerate() {
        attach_block_device(
            &fd,
            (&memory, &slots.read_only()),
            &mut mmio,
            (disk, i),
            v.base,
            v.gsi,
        )?;
    }

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
        slots: Arc::new(Mutex::new(slots)),
        memory,
        vcpus,
        pio,
        mmio,
        serial,
        console,
        reset_evt,
        devices: Vec::new(),
    })
}
