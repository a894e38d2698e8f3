//! ACPI tables (RSDP, XSDT, MADT, FADT, DSDT) from rust-vmm's `acpi_tables`, so that a
//! distribution kernel finds its CPUs and I/O APIC. Debian's cloud kernels are built without
//! `CONFIG_X86_MPPARSE`, so without a MADT a second vCPU is never started.
//!
//! The platform is declared hardware-reduced (no PM timer, no SCI, no fixed ACPI hardware, no
//! legacy PIC) and without an i8042 in `IAPC_BOOT_ARCH`, so the guest does not probe a keyboard
//! controller it would only find half-emulated; `reboot=k` still resets through port 0x64.
//! A hardware-reduced guest maps no ISA IRQs by itself, so every legacy device with an
//! interrupt must be described in the DSDT: COM1 is (`PNP0501`, port 0x3f8, IRQ 4), as
//! Firecracker and Cloud Hypervisor do.

use acpi_tables::Aml;
use acpi_tables::aml::{
    Device, EISAName, IO, Interrupt, Memory32Fixed, Name, ONE, Path, ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;

use super::layout::{APIC_START, IOAPIC_START};

/// Where the RSDP goes: the start of the BIOS area Linux scans for it.
pub const RSDP_START: u64 = 0xe_0000;
/// End of the area the tables may use.
pub const ACPI_END: u64 = 0x10_0000;

const OEM_ID: [u8; 6] = *b"HVPRBE";
const OEM_TABLE_ID: [u8; 8] = *b"HVPROBE ";

/// Errors building the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB.
    #[error("ACPI tables ({0} bytes) do not fit in the BIOS area")]
    TooLarge(usize),
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// A virtio-mmio device to describe: its page and its GSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmio {
    /// Guest physical base.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// I/O APIC pin.
    pub gsi: u32,
}

/// The DSDT's AML: the devices the guest cannot discover by itself. A virtio-mmio device
/// is `LNRO0005` (the ACPI ID Linux's `virtio_mmio` matches; its kernels here lack
/// `VIRTIO_MMIO_CMDLINE_DEVICES`), with its page and edge-triggered interrupt, as Firecracker
/// describes its devices.
fn dsdt_body(virtio: &[VirtioMmio]) -> Vec<u8> {
    use crate::devices::serial::{COM1_BASE, COM1_GSI, COM1_LEN};
    let hid = EISAName::new("PNP0501");
    let uid: u8 = 0;
    let irq = Interrupt::new(true, true, false, false, COM1_GSI);
    let ports = IO::new(COM1_BASE, COM1_BASE, 1, COM1_LEN as u8);
    let crs = ResourceTemplate::new(vec![&irq, &ports]);
    let hid_name = Name::new(Path::new("_HID"), &hid);
    let uid_name = Name::new(Path::new("_UID"), &uid);
    let crs_name = Name::new(Path::new("_CRS"), &crs);
    let com1 = Device::new(Path::new("COM1"), vec![&hid_name, &uid_name, &crs_name]);
    let mut devices = aml_bytes(&com1);
    for (i, v) in virtio.iter().enumerate() {
        let uid = i as u8;
        // The MMIO gap is below 4 GiB, so a 32-bit descriptor holds it.
        let window = Memory32Fixed::new(true, v.base as u32, v.len as u32);
        let irq = Interrupt::new(true, true, false, false, v.gsi);
        let crs = ResourceTemplate::new(vec![&window, &irq]);
        let hid = Name::new(Path::new("_HID"), &"LNRO0005");
        let uid_name = Name::new(Path::new("_UID"), &uid);
        let cca = Name::new(Path::new("_CCA"), &ONE);
        let crs_name = Name::new(Path::new("_CRS"), &crs);
        let path = format!("VR{i:02}");
        let dev = Device::new(Path::new(&path), vec![&hid, &uid_name, &cca, &crs_name]);
        dev.to_aml_bytes(&mut devices);
    }
    aml_bytes(&Scope::new(Path::new("\\_SB_"), vec![&RawAml(devices)]))
}

/// AML already encoded, to put into a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for b in &self.0 {
            sink.byte(*b);
        }
    }
}

/// Builds all tables laid out from [`RSDP_START`] as one byte block to write there. The
/// I/O APIC's ID follows the vCPUs' APIC IDs.
pub fn build(num_cpus: u8, virtio: &[VirtioMmio]) -> Result<Vec<u8>, AcpiError> {
    let align = |n: usize| n.div_ceil(16) * 16;
    let rsdp_len = Rsdp::len();
    let xsdt_at = align(rsdp_len);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    dsdt.append_slice(&dsdt_body(virtio));
    let dsdt_bytes = dsdt.as_slice().to_vec();

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(num_cpus + 1, IOAPIC_START as u32, 0));
    let madt_bytes = aml_bytes(&madt);

    // The XSDT's size depends only on its entry count, so lay out the others after it.
    let xsdt_len = 36 + 8 * 2;
    let madt_at = align(xsdt_at + xsdt_len);
    let dsdt_at = align(madt_at + madt_bytes.len());
    let fadt_at = align(dsdt_at + dsdt_bytes.len());
    let base = RSDP_START as usize;

    let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64((base + dsdt_at) as u64)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .finalize();
    let fadt_bytes = aml_bytes(&fadt);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry((base + fadt_at) as u64);
    xsdt.add_entry((base + madt_at) as u64);
    let xsdt_bytes = aml_bytes(&xsdt);
    debug_assert_eq!(xsdt_bytes.len(), xsdt_len);

    let rsdp = Rsdp::new(OEM_ID, (base + xsdt_at) as u64);
    let rsdp_bytes = aml_bytes(&rsdp);

    let total = fadt_at + fadt_bytes.len();
    if base + total > ACPI_END as usize {
        return Err(AcpiError::TooLarge(total));
    }
    let mut block = vec![0u8; total];
    for (at, bytes) in [
        (0, &rsdp_bytes),
        (xsdt_at, &xsdt_bytes),
        (madt_at, &madt_bytes),
        (dsdt_at, &dsdt_bytes),
        (fadt_at, &fadt_bytes),
    ] {
        block[at..at + bytes.len()].copy_from_slice(bytes);
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table_at(block: &[u8], addr: u64) -> &[u8] {
        let at = (addr - RSDP_START) as usize;
        let len = u32::from_le_bytes(block[at + 4..at + 8].try_into().unwrap()) as usize;
        &block[at..at + len]
    }

    #[test]
    fn tables_link_up_and_checksum() {
        let block = build(2, &[]).unwrap();
        assert_eq!(&block[0..8], b"RSD PTR ");
        assert_eq!(sum(&block[0..20]), 0);
        assert_eq!(sum(&block[0..36]), 0);
        let xsdt_addr = u64::from_le_bytes(block[24..32].try_into().unwrap());
        let xsdt = table_at(&block, xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let mut sigs = Vec::new();
        for e in xsdt[36..].chunks(8) {
            let t = table_at(&block, u64::from_le_bytes(e.try_into().unwrap()));
            assert_eq!(sum(t), 0);
            sigs.push(t[0..4].to_vec());
            if &t[0..4] == b"APIC" {
                // Two local APICs (type 0) and one I/O APIC (type 1) after the 44-byte header.
                let kinds: Vec<u8> = {
                    let mut v = Vec::new();
                    let mut at = 44;
                    while at < t.len() {
                        v.push(t[at]);
                        at += t[at + 1] as usize;
                    }
                    v
                };
                assert_eq!(kinds, vec![0, 0, 1]);
            }
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_virtio_mmio_device_is_described_as_linux_virtio_mmio_matches_it() {
        let v = VirtioMmio {
            base: 0xc000_0000,
            len: 0x1000,
            gsi: 5,
        };
        let with = dsdt_body(&[v]);
        let without = dsdt_body(&[]);
        assert!(contains(&with, b"LNRO0005\0") && !contains(&without, b"LNRO0005"));
        assert!(contains(&with, b"VR00") && contains(&with, b"_CCA"));
        // Memory32Fixed (0x86, length 9, read-write): base, then length.
        let mut window = vec![0x86, 0x09, 0x00, 0x01];
        window.extend_from_slice(&0xc000_0000u32.to_le_bytes());
        window.extend_from_slice(&0x1000u32.to_le_bytes());
        assert!(contains(&with, &window));
        // Extended interrupt (0x89, length 6): consumer, edge, active-high, exclusive; GSI 5.
        assert!(contains(&with, &[0x89, 0x06, 0x00, 0x03, 0x01, 5, 0, 0, 0]));
        // COM1 is still there, and the tables still link up and sum to zero with it.
        assert!(contains(&with, b"COM1"));
        let block = build(2, &[v]).unwrap();
        assert_eq!(sum(&block[0..36]), 0);
        let xsdt = table_at(
            &block,
            u64::from_le_bytes(block[24..32].try_into().unwrap()),
        );
        let fadt = table_at(&block, u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        let dsdt = table_at(
            &block,
            u64::from_le_bytes(fadt[140..148].try_into().unwrap()),
        );
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(sum(dsdt), 0);
        assert!(contains(dsdt, b"LNRO0005"));
    }
}
