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
use acpi_tables::aml::{Device, EISAName, IO, Interrupt, Name, Path, ResourceTemplate, Scope};
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

/// The DSDT's AML: the devices the guest cannot discover by itself.
fn dsdt_body() -> Vec<u8> {
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
    aml_bytes(&Scope::new(Path::new("\\_SB_"), vec![&com1]))
}

/// Builds all tables laid out from [`RSDP_START`] as one byte block to write there. The
/// I/O APIC's ID follows the vCPUs' APIC IDs.
pub fn build(num_cpus: u8) -> Result<Vec<u8>, AcpiError> {
    let align = |n: usize| n.div_ceil(16) * 16;
    let rsdp_len = Rsdp::len();
    let xsdt_at = align(rsdp_len);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    dsdt.append_slice(&dsdt_body());
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
        let block = build(2).unwrap();
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
}
