//! Guest physical memory layout of an x86_64 hvprobe VM.
//!
//! The low megabyte follows what a PC-compatible Linux guest expects (EBDA, MP table), the
//! kernel is loaded at 1 MiB, and the range between 3 GiB and 4 GiB is left as the MMIO gap.

/// GDT used for the 64-bit boot entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT installed at boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table of the identity map used at entry.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the identity map (2 MiB pages, first GiB).
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Start of the extended BIOS data area, where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the bzImage's protected-mode kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (no RAM from here to 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The virtio-mmio device's page: the first of the MMIO gap (Firecracker's MMIO32 start).
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Its interrupt: I/O APIC pin 5, Firecracker's first legacy GSI (0 is the PIT, 4 COM1);
/// further disks take the pins after it (at most 8 disks: up to pin 12).
pub const VIRTIO_MMIO_GSI: u32 = 5;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// I/O APIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Address of the TSS pages KVM needs on Intel (`KVM_SET_TSS_ADDR`), inside the MMIO gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Guest physical base of the XOL area: far above RAM, never in the e820 map, below the
/// 40-bit physical address width of every CPU KVM runs on.
pub const XOL_GPA_BASE: u64 = 0x10_0000_0000;
/// Entry point offset of the 64-bit boot protocol inside the protected-mode kernel.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// The RAM ranges `(start, length)` of a guest with `mem_size` bytes of memory, leaving the
/// MMIO gap empty.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_skip_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }
}
