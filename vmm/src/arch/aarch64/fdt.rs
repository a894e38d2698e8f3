//! The flattened device tree an arm64 guest boots with, written with vm-fdt: the CPUs (by the
//! MPIDRs KVM gave them), memory, `/chosen` (command line, initrd, a KASLR seed unless the
//! command line says `nokaslr`), the GICv3, the architected timer, PSCI 0.2 through HVC and the
//! ns16550a UART.

use vm_fdt::{Error as FdtError, FdtWriter};

use super::layout::*;

/// phandle of the interrupt controller.
const GIC_PHANDLE: u32 = 1;
/// Interrupt specifier types.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_TYPE_EDGE_RISING: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
/// The architected timer's PPIs: secure, non-secure, virtual, hypervisor physical.
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// The GIC maintenance interrupt's PPI.
const GIC_MAINTENANCE_PPI: u32 = 9;
/// The 8250's input clock: the PC's 1.8432 MHz, which its divisor values assume.
const UART_CLOCK: u32 = 1_843_200;

/// What the device tree describes.
#[derive(Debug, Clone)]
pub struct BoardDescription {
    /// Each vCPU's MPIDR_EL1, in vCPU order.
    pub mpidrs: Vec<u64>,
    /// RAM size from [`DRAM_START`].
    pub mem_size: u64,
    /// The kernel command line.
    pub cmdline: String,
    /// The initrd's guest physical range.
    pub initrd: Option<(u64, u64)>,
    /// A seed for the kernel's KASLR (`/chosen/kaslr-seed`); none means no randomization.
    pub kaslr_seed: Option<u64>,
    /// virtio-mmio devices: base, length, SPI.
    pub virtio: Vec<(u64, u64, u32)>,
}

/// The device tree blob.
pub fn create_fdt(board: &BoardDescription) -> Result<Vec<u8>, FdtError> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for mpidr in &board.mpidrs {
        // Affinity levels 0-3 (Aff3 in bits 39:32).
        let reg = mpidr & 0xff_00ff_ffff;
        let cpu = fdt.begin_node(&format!("cpu@{reg:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", reg)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let memory = fdt.begin_node(&format!("memory@{DRAM_START:x}"))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[DRAM_START, board.mem_size])?;
    fdt.end_node(memory)?;

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", &board.cmdline)?;
    fdt.property_string("stdout-path", &format!("/uart@{UART_BASE:x}"))?;
    if let Some((start, end)) = board.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    if let Some(seed) = board.kaslr_seed {
        fdt.property_u64("kaslr-seed", seed)?;
    }
    fdt.end_node(chosen)?;

    let redist_size = GIC_REDIST_SIZE_PER_CPU * board.mpidrs.len() as u64;
    let gic = fdt.begin_node(&format!("intc@{GIC_DIST_BASE:x}"))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    fdt.property_array_u64(
        "reg",
        &[GIC_DIST_BASE, GIC_DIST_SIZE, GIC_REDIST_BASE, redist_size],
    )?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_PPI, GIC_MAINTENANCE_PPI, IRQ_TYPE_LEVEL_HIGH],
    )?;
    fdt.property_phandle(GIC_PHANDLE)?;
    fdt.end_node(gic)?;

    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let irqs: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|ppi| [GIC_PPI, *ppi, IRQ_TYPE_LEVEL_HIGH])
        .collect();
    fdt.property_array_u32("interrupts", &irqs)?;
    fdt.end_node(timer)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string("compatible", "arm,psci-0.2")?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let uart = fdt.begin_node(&format!("uart@{UART_BASE:x}"))?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[UART_BASE, UART_SIZE])?;
    fdt.property_u32("clock-frequency", UART_CLOCK)?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, UART_SPI, IRQ_TYPE_EDGE_RISING])?;
    fdt.end_node(uart)?;

    // Linux's virtio_mmio matches `virtio,mmio` (Firecracker's and QEMU virt's node).
    for (base, len, spi) in &board.virtio {
        let node = fdt.begin_node(&format!("virtio_mmio@{base:x}"))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[*base, *len])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, *spi, IRQ_TYPE_EDGE_RISING])?;
        fdt.property_null("dma-coherent")?;
        fdt.end_node(node)?;
    }

    fdt.end_node(root)?;
    fdt.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_blob_describes_cpus_memory_chosen_and_devices() {
        let board = BoardDescription {
            mpidrs: vec![0x8000_0000, 0x8000_0001],
            mem_size: 512 << 20,
            cmdline: "console=ttyS0 quiet".into(),
            initrd: Some((0x5000_0000, 0x5010_0000)),
            kaslr_seed: Some(0x1234),
            virtio: vec![(0x0a00_0000, 0x1000, 16)],
        };
        let blob = create_fdt(&board).unwrap();
        // FDT magic, big-endian.
        assert_eq!(&blob[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
        assert!(blob.len() < FDT_MAX_SIZE as usize);
        for s in [
            &b"cpu@0"[..],
            b"cpu@1",
            b"memory@40000000",
            b"console=ttyS0 quiet",
            b"arm,gic-v3",
            b"arm,armv8-timer",
            b"arm,psci-0.2",
            b"ns16550a",
            b"uart@9000000",
            b"kaslr-seed",
            b"linux,initrd-start",
            b"virtio_mmio@a000000",
            b"virtio,mmio",
            b"dma-coherent",
        ] {
            assert!(contains(&blob, s), "{}", String::from_utf8_lossy(s));
        }
        // The virtio node's interrupt: GIC_SPI 16, edge rising (big-endian cells).
        assert!(contains(&blob, &[0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 1]));
        let no_seed = create_fdt(&BoardDescription {
            kaslr_seed: None,
            initrd: None,
            virtio: Vec::new(),
            ..board
        })
        .unwrap();
        assert!(!contains(&no_seed, b"virtio,mmio"));
        assert!(!contains(&no_seed, b"kaslr-seed"));
        assert!(!contains(&no_seed, b"linux,initrd-start"));
    }
}
