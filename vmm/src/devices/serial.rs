//! The 8250 UART at COM1 (0x3f8, IRQ 4), from vm-superio, with its interrupt delivered through
//! an irqfd and its output going to the [`ConsoleOut`](super::console::ConsoleOut).

use std::io;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use super::console::ConsoleOut;

/// COM1's first port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's number of ports.
pub const COM1_LEN: u16 = 8;
/// COM1's legacy IRQ (and GSI).
pub const COM1_GSI: u32 = 4;

/// The serial port's interrupt line: an `EventFd` that KVM turns into the GSI.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// COM1 as a port-I/O device.
pub struct SerialPort {
    uart: Serial<IrqLine, NoEvents, ConsoleOut>,
}

impl SerialPort {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialPort {
            uart: Serial::new(IrqLine(irq), out),
        }
    }

    /// Queues bytes typed by the user for the guest to read; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&first) = data.first() {
            // An error here is a failed interrupt or output write; the guest cannot act on
            // it, and the output side already ignores a closed pipe.
            let _ = self.uart.write(offset as u8, first);
        }
    }
}
