//! The arm64 guest physical memory map (QEMU virt's, so that Linux sees a familiar board):
//! GICv3 distributor and redistributors, the UART, RAM from 1 GiB, and the XOL area far above.

/// GICv3 distributor.
pub const GIC_DIST_BASE: u64 = 0x0800_0000;
/// Its size.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// GICv3 redistributors, one 128 KiB frame pair per vCPU.
pub const GIC_REDIST_BASE: u64 = 0x080a_0000;
/// One vCPU's redistributor frames.
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
/// Most vCPUs: the redistributor region ends below the UART.
pub const MAX_VCPUS: u32 = ((UART_BASE - GIC_REDIST_BASE) / GIC_REDIST_SIZE_PER_CPU) as u32;
/// The ns16550a UART (vm-superio's 8250, as on x86).
pub const UART_BASE: u64 = 0x0900_0000;
/// Its MMIO window.
pub const UART_SIZE: u64 = 0x1000;
/// The UART's shared peripheral interrupt (SPI 1 = INTID 33); also its irqfd GSI.
pub const UART_SPI: u32 = 1;
/// The virtio-mmio device's page (QEMU virt's first virtio-mmio window).
pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;
/// Its interrupt: SPI 16 (INTID 48), QEMU virt's first virtio SPI; the irqfd GSI is the SPI
/// number, as the UART's.
pub const VIRTIO_MMIO_SPI: u32 = 16;
/// Shared peripheral interrupts the GIC offers (KVM_DEV_ARM_VGIC_GRP_NR_IRQS counts the 32
/// private ones too).
pub const GIC_SPIS: u32 = 96;
/// Start of RAM.
pub const DRAM_START: u64 = 0x4000_0000;
/// Most the FDT may take (the boot protocol's limit), at the end of RAM.
pub const FDT_MAX_SIZE: u64 = 2 << 20;
/// Where the XOL area sits: above any RAM the VMM gives a guest, inside the 40-bit IPA space
/// KVM gives a VM by default.
pub const XOL_GPA_BASE: u64 = 0x10_0000_0000;
