//! The 8250 UART at COM1 (0x3f8, IRQ 4), from vm-superio, with its interrupt delivered through
//! an irqfd and its output going to the [`ConsoleOut`](super::console::ConsoleOut).

use std::io;

use vm_superio::serial::SerialEvents;
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

/// The UART's events the VMM cares about: the guest drained the input FIFO, so console input
/// kept back because the FIFO was full can be queued (the run loop waits on the eventfd).
pub struct InputDrained(EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// COM1 as a port-I/O device.
pub struct SerialPort {
    uart: Serial<IrqLine, InputDrained, ConsoleOut>,
}

impl SerialPort {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> io::Result<Self> {
        let drained = InputDrained(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(SerialPort {
            uart: Serial::with_events(IrqLine(irq), drained, out),
        })
    }

    /// An eventfd written each time the guest has read the last byte of the input FIFO.
    pub fn input_drained(&self) -> io::Result<EventFd> {
        self.uart.events().0.try_clone()
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
