//! The arm64 machine: RAM from 1 GiB with the XOL area far above, vCPUs initialised with
//! `KVM_ARM_VCPU_INIT` (PSCI 0.2; every vCPU but the first powered off until the guest starts
//! it through PSCI, which KVM handles), an in-kernel GICv3 created after the vCPUs, the
//! architected timer, the ns16550a UART on the MMIO bus with its interrupt through an irqfd, and
//! the Image, initrd and device tree in memory. The guest leaves through PSCI SYSTEM_OFF or
//! SYSTEM_RESET, which KVM reports as system events.

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST, kvm_create_device, kvm_device_attr,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_vcpu_init,
};
use kvm_ioctls::{DeviceFd, Kvm, VmFd};
use probe_core::xol::XolArea;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::fdt::{BoardDescription, create_fdt};
use super::layout::*;
use super::vcpu::{MPIDR_EL1, boot_registers, get};
use super::{Guest, kernel};
use crate::devices::virtio::mmio::MMIO_LEN;
use crate::devices::{MmioBus, PioBus};
use crate::vm::{
    BootInputs, Vm, VmConfig, VmError, attach_block_device, console_uart, kvm_err, register_memory,
};

/// Builds the arm64 VM of `config` (its initrd already read into `initrd_bytes`).
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
    if config.vcpus > MAX_VCPUS {
        return Err(VmError::VcpuCount(config.vcpus));
    }
    let mem_size = config.memory_mib << 20;
    if DRAM_START + mem_size > XOL_GPA_BASE {
        return Err(VmError::MemoryTooLarge(config.memory_mib));
    }
    let mut ranges = vec![(GuestAddress(DRAM_START), mem_size as usize)];
    if config.xol_bytes > 0 {
        ranges.push((GuestAddress(XOL_GPA_BASE), config.xol_bytes as usize));
    }
    let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory {
        mib: config.memory_mib,
        detail: e.to_string(),
    })?;

    let (entry, kernel_end) = kernel::load_kernel(&memory, &config.kernel, DRAM_START)?;
    let fdt_addr = DRAM_START + mem_size - FDT_MAX_SIZE;
    let initrd = match (&initrd_bytes, &config.initrd) {
        (Some(bytes), Some(path)) => {
            let len = bytes.len() as u64;
            let addr = fdt_addr
                .checked_sub(len)
                .map(|a| a & !0xfff)
                .filter(|a| *a >= kernel_end)
                .ok_or_else(|| VmError::InitrdTooLarge {
                    path: path.clone(),
                    len,
                })?;
            memory
                .write_slice(bytes, GuestAddress(addr))
                .map_err(|e| VmError::Memory {
                    mib: config.memory_mib,
                    detail: format!("writing the initrd: {e}"),
                })?;
            Some((addr, addr + len))
        }
        _ => None,
    };

    let fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    // Stores KVM cannot decode (no syndrome) to read-only memory come to the VMM, which makes
    // them for `--protect` (without the capability KVM_RUN fails with ENOSYS).
    if kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_ARM_NISV_TO_USER)) > 0 {
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_ARM_NISV_TO_USER,
            ..Default::default()
        };
        fd.enable_cap(&cap)
            .map_err(kvm_err("KVM_ENABLE_CAP (KVM_CAP_ARM_NISV_TO_USER)"))?;
    }
    let slots = register_memory(
        &fd,
        &memory,
        XOL_GPA_BASE,
        XolArea::new(<Guest as probe_core::arch::Arch>::XOL, XOL_GPA_BASE, 1)
            .map(|x| x.table_bytes())
            .unwrap_or(0),
        config.xol_data_bytes,
    )?;

    let mut kvi = kvm_vcpu_init::default();
    fd.get_preferred_target(&mut kvi)
        .map_err(kvm_err("KVM_ARM_PREFERRED_TARGET"))?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    let mut vcpus = Vec::new();
    let mut mpidrs = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut init = kvi;
        if id > 0 {
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        vcpu.vcpu_init(&init)
            .map_err(kvm_err("KVM_ARM_VCPU_INIT"))?;
        mpidrs.push(get(&vcpu, MPIDR_EL1).map_err(kvm_err("KVM_GET_ONE_REG (MPIDR_EL1)"))?);
        vcpus.push(vcpu);
    }
    let gic = create_gic(&fd)?;

    let (serial, console) = console_uart(&fd, UART_SPI, console_out)?;
    let mut mmio = MmioBus::default();
    mmio.insert(UART_BASE, UART_SIZE, serial.clone());
    let mut virtio = Vec::new();
    for (i, disk) in disks.into_iter().enumerate() {
        let (base, spi) = (
            VIRTIO_MMIO_BASE + i as u64 * MMIO_LEN,
            VIRTIO_MMIO_SPI + i as u32,
        );
        attach_block_device(
            &fd,
            (&memory, &slots.read_only()),
            &mut mmio,
            (disk, i),
            base,
            spi,
        )?;
        virtio.push((base, MMIO_LEN, spi));
    }

    let kaslr_seed = (!config.cmdline.split_whitespace().any(|w| w == "nokaslr"))
        .then(random_seed)
        .flatten();
    let blob = create_fdt(&BoardDescription {
        mpidrs,
        mem_size,
        cmdline: config.cmdline.clone(),
        initrd,
        kaslr_seed,
        virtio,
    })
    .map_err(|e| VmError::Fdt(e.to_string()))?;
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(VmError::Fdt(format!(
            "the device tree is {} bytes, more than the boot protocol's 2 MiB",
            blob.len()
        )));
    }
    memory
        .write_slice(&blob, GuestAddress(fdt_addr))
        .map_err(|e| VmError::Fdt(format!("writing it to guest memory: {e}")))?;
    boot_registers(&vcpus[0], entry, fdt_addr)
        .map_err(kvm_err("KVM_SET_ONE_REG (boot registers)"))?;

    Ok(Vm {
        kvm,
        fd,
        slots: Arc::new(Mutex::new(slots)),
        memory,
        vcpus,
        pio: PioBus::default(),
        mmio,
        serial,
        console,
        // No reset line: the guest resets through PSCI.
        reset_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?,
        devices: vec![gic],
    })
}

/// The in-kernel GICv3, created after the vCPUs (its redistributors follow their count) and
/// initialised.
fn create_gic(fd: &VmFd) -> Result<DeviceFd, VmError> {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = fd
        .create_device(&mut dev)
        .map_err(kvm_err("KVM_CREATE_DEVICE (GICv3)"))?;
    let dist = GIC_DIST_BASE;
    let redist = GIC_REDIST_BASE;
    let nr_irqs: u32 = 32 + GIC_SPIS;
    let attrs = [
        (
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            u64::from(KVM_VGIC_V3_ADDR_TYPE_DIST),
            &dist as *const u64 as u64,
            "GICv3 distributor address",
        ),
        (
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            u64::from(KVM_VGIC_V3_ADDR_TYPE_REDIST),
            &redist as *const u64 as u64,
            "GICv3 redistributor address",
        ),
        (
            KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
            0,
            &nr_irqs as *const u32 as u64,
            "GICv3 interrupt count",
        ),
        (
            KVM_DEV_ARM_VGIC_GRP_CTRL,
            u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
            0,
            "GICv3 init",
        ),
    ];
    for (group, attr, addr, what) in attrs {
        gic.set_device_attr(&kvm_device_attr {
            group,
            attr,
            addr,
            flags: 0,
        })
        .map_err(|source| VmError::Kvm { what, source })?;
    }
    Ok(gic)
}

/// A seed for the guest's KASLR, from the host's random source.
fn random_seed() -> Option<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .ok()?;
    Some(u64::from_le_bytes(b))
}
