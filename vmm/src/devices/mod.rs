//! Emulated devices and the buses that route vCPU exits to them: port I/O (x86) and MMIO
//! (every architecture; arm64's UART lives there). One [`Bus`] type serves both.
//!
//! To add a device: implement [`BusDevice`], give it a range in the architecture's
//! `create_vm` (`crate::arch::Host::create_vm`) with [`Bus::insert`] on the port-I/O or the MMIO
//! bus, and, if it raises interrupts, give it an `EventFd` registered as an irqfd on its GSI
//! (see the serial port).

pub mod cmos;
pub mod console;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    /// Handles a read from the guest (`in`, or a load from MMIO); fills `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write from the guest (`out`, or a store to MMIO).
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// The devices on one bus (ports or guest physical addresses), each over a range. Shared by
/// all vCPU threads.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: Vec<BusRange>,
}

/// The x86 port-I/O bus.
pub type PioBus = Bus;
/// The MMIO bus: guest physical addresses no memslot backs.
pub type MmioBus = Bus;

/// One device's range: first address, length, device.
type BusRange = (u64, u64, Arc<Mutex<dyn BusDevice>>);

impl Bus {
    /// Puts `device` on `base..base + len`.
    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) {
        self.ranges.push((base, len, device));
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        self.ranges
            .iter()
            .find(|(base, len, _)| addr >= *base && addr - base < *len)
            .map(|(base, _, dev)| (addr - base, dev))
    }

    /// Handles a read: unclaimed addresses read as all ones, like an empty bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, dev)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Handles a write: writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((offset, dev)) = self.find(addr) {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Latch(u8);
    impl BusDevice for Latch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = self.0 + offset as u8;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_floats_unclaimed_ports() {
        let mut bus = PioBus::default();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Latch(0))));
        bus.write(0x3f8, &[0x40]);
        let mut b = [0u8];
        bus.read(0x3fa, &mut b);
        assert_eq!(b[0], 0x42);
        bus.read(0x400, &mut b);
        assert_eq!(b[0], 0xff);
        // The same bus type over guest physical addresses (MMIO).
        let mut mmio = MmioBus::default();
        mmio.insert(0x0900_0000, 0x1000, Arc::new(Mutex::new(Latch(7))));
        mmio.read(0x0900_0004, &mut b);
        assert_eq!(b[0], 11);
        mmio.read(0x0900_1000, &mut b);
        assert_eq!(b[0], 0xff);
    }
}

/// Guest physical ranges the guest may not write: hvprobe's XOL code pages and the pages
/// `--protect` made read-only. The vCPUs see them read-only through their memslots; devices
/// that write guest memory (virtio-blk's reads) ask here first and refuse, so a device's DMA
/// is no way around a protection or into hvprobe's code.
#[derive(Debug, Default)]
pub struct ReadOnlyRam {
    /// Read-only for the whole run (the XOL code pages).
    fixed: Vec<(u64, u64)>,
    /// `--protect`'s pages now, `[start, end)`; changed with every vCPU paused.
    protected: RwLock<Vec<(u64, u64)>>,
    /// Device writes refused so far.
    refused: AtomicU64,
}

impl ReadOnlyRam {
    /// Guest memory with `fixed` (`[start, end)` ranges) read-only and nothing protected yet.
    pub fn new(fixed: Vec<(u64, u64)>) -> ReadOnlyRam {
        ReadOnlyRam {
            fixed,
            ..ReadOnlyRam::default()
        }
    }

    /// Makes `pages` (`[start, end)`) the protected ones.
    pub fn set_protected(&self, pages: &[(u64, u64)]) {
        *self.protected.write().unwrap_or_else(|e| e.into_inner()) = pages.to_vec();
    }

    /// The first guest physical address of `[gpa, gpa + len)` the guest may not write.
    pub fn first_read_only(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.saturating_add(len);
        let protected = self.protected.read().unwrap_or_else(|e| e.into_inner());
        self.fixed
            .iter()
            .chain(protected.iter())
            .filter(|&&(s, e)| s < end && gpa < e)
            .map(|&(s, _)| s.max(gpa))
            .min()
    }

    /// Counts a refused device write; returns how many there were, this one included.
    pub fn count_refusal(&self) -> u64 {
        self.refused.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Device writes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod read_only_ram_tests {
    use super::ReadOnlyRam;

    #[test]
    fn a_range_touching_a_read_only_byte_names_its_first_one() {
        let ram = ReadOnlyRam::new(vec![(0x10_0000, 0x10_2000)]);
        assert_eq!(
            ram.first_read_only(0x0f_f000, 0x1000),
            None,
            "ends at the start"
        );
        assert_eq!(ram.first_read_only(0x0f_f800, 0x1000), Some(0x10_0000));
        assert_eq!(ram.first_read_only(0x10_1ff0, 0x100), Some(0x10_1ff0));
        assert_eq!(
            ram.first_read_only(0x10_2000, 0x1000),
            None,
            "starts at the end"
        );
        ram.set_protected(&[(0x5000, 0x6000)]);
        assert_eq!(ram.first_read_only(0x4000, 0x3000), Some(0x5000));
        ram.set_protected(&[]);
        assert_eq!(
            ram.first_read_only(0x4000, 0x3000),
            None,
            "protection lifted"
        );
        assert_eq!(
            (ram.count_refusal(), ram.count_refusal(), ram.refused()),
            (1, 2, 2)
        );
    }
}
