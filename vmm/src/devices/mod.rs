//! Emulated devices and the port-I/O bus that routes vCPU exits to them.
//!
//! To add a device: implement [`PioDevice`], give it a port range in
//! [`crate::vm::Vm::new`] with [`PioBus::insert`], and, if it raises interrupts, give it an
//! `EventFd` registered as an irqfd on its GSI (see the serial port).

pub mod cmos;
pub mod console;
pub mod i8042;
pub mod serial;

use std::sync::{Arc, Mutex};

/// A device on the x86 port-I/O bus. `offset` is relative to the start of its range.
pub trait PioDevice: Send {
    /// Handles an `in` from the guest; fills `data`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Handles an `out` from the guest.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// The devices on the port-I/O bus, each over a port range. Shared by all vCPU threads.
#[derive(Clone, Default)]
pub struct PioBus {
    ranges: Vec<PioRange>,
}

/// One device's port range: first port, number of ports, device.
type PioRange = (u16, u16, Arc<Mutex<dyn PioDevice>>);

impl PioBus {
    /// Puts `device` on ports `base..base + len`.
    pub fn insert(&mut self, base: u16, len: u16, device: Arc<Mutex<dyn PioDevice>>) {
        self.ranges.push((base, len, device));
    }

    fn find(&self, port: u16) -> Option<(u16, &Arc<Mutex<dyn PioDevice>>)> {
        self.ranges
            .iter()
            .find(|(base, len, _)| port >= *base && port - base < *len)
            .map(|(base, _, dev)| (port - base, dev))
    }

    /// Handles an `in`: unclaimed ports read as all ones, like an empty ISA bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((offset, dev)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Handles an `out`: writes to unclaimed ports are dropped.
    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some((offset, dev)) = self.find(port) {
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
    impl PioDevice for Latch {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data[0] = self.0 + offset as u8;
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
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
    }
}
