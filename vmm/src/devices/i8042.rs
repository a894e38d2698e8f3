//! The part of the i8042 keyboard controller a Linux guest uses to reboot (`reboot=k`): a write
//! of 0xFE (pulse reset line) to the command port. Everything else reads as "no data".

use super::BusDevice;

/// Command written to port 0x64 to reset the machine.
const CMD_RESET_CPU: u8 = 0xfe;
/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;

/// A minimal i8042 that turns the reset command into a call of `on_reset`.
pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
}

impl I8042 {
    /// A controller on ports 0x60..0x65 that calls `on_reset` when the guest resets through it.
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        I8042 { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn only_the_reset_command_resets() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let mut dev = I8042::new(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }
}
