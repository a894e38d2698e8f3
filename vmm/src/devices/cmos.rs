//! A read-only MC146818 CMOS real-time clock at ports 0x70/0x71, reporting the host's UTC
//! time. Without it the guest's `rtc_cmos` driver waits seconds for an update cycle that never
//! ends (unclaimed ports read 0xff, which has the update-in-progress bit set), and the guest's
//! wall clock starts at 1970.

use super::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Status B: 24-hour mode, binary (not BCD) values.
const STATUS_B_24H_BINARY: u8 = 0x06;
/// Status D: valid RAM and time.
const STATUS_D_VRT: u8 = 0x80;
/// Status A: divider for a 32.768 kHz time base, no update in progress.
const STATUS_A_DIVIDER: u8 = 0x26;

/// The broken-down UTC time the clock reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WallClock {
    /// Seconds, 0-59.
    pub second: u8,
    /// Minutes, 0-59.
    pub minute: u8,
    /// Hours, 0-23.
    pub hour: u8,
    /// Day of week, 1 (Sunday) to 7.
    pub weekday: u8,
    /// Day of month, 1-31.
    pub day: u8,
    /// Month, 1-12.
    pub month: u8,
    /// Full year.
    pub year: u16,
}

impl WallClock {
    /// The host's current UTC time.
    pub fn now() -> WallClock {
        // SAFETY: time(NULL) and gmtime_r with a valid output struct on this stack frame.
        let tm = unsafe {
            let t = libc::time(std::ptr::null_mut());
            let mut tm: libc::tm = std::mem::zeroed();
            libc::gmtime_r(&t, &mut tm);
            tm
        };
        WallClock {
            second: tm.tm_sec.min(59) as u8,
            minute: tm.tm_min as u8,
            hour: tm.tm_hour as u8,
            weekday: tm.tm_wday as u8 + 1,
            day: tm.tm_mday as u8,
            month: tm.tm_mon as u8 + 1,
            year: (tm.tm_year + 1900) as u16,
        }
    }
}

/// The CMOS RTC: an index port (0x70) and a data port (0x71).
pub struct CmosRtc {
    index: u8,
    clock: Box<dyn Fn() -> WallClock + Send>,
}

impl CmosRtc {
    /// A clock that reads the time from `clock` on every access.
    pub fn new(clock: Box<dyn Fn() -> WallClock + Send>) -> Self {
        CmosRtc { index: 0, clock }
    }

    fn register(&self, index: u8) -> u8 {
        let now = (self.clock)();
        match index {
            REG_SECONDS => now.second,
            REG_MINUTES => now.minute,
            REG_HOURS => now.hour,
            REG_WEEKDAY => now.weekday,
            REG_DAY => now.day,
            REG_MONTH => now.month,
            REG_YEAR => (now.year % 100) as u8,
            REG_CENTURY => (now.year / 100) as u8,
            REG_STATUS_A => STATUS_A_DIVIDER,
            REG_STATUS_B => STATUS_B_24H_BINARY,
            REG_STATUS_C => 0,
            REG_STATUS_D => STATUS_D_VRT,
            _ => 0,
        }
    }
}

impl BusDevice for CmosRtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset == 1 {
            self.register(self.index)
        } else {
            self.index
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Bit 7 is the NMI mask, not part of the index.
        if offset == 0
            && let Some(&b) = data.first()
        {
            self.index = b & 0x7f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_clock_in_binary_24h_mode() {
        let fixed = WallClock {
            second: 5,
            minute: 4,
            hour: 23,
            weekday: 2,
            day: 23,
            month: 11,
            year: 2026,
        };
        let mut rtc = CmosRtc::new(Box::new(move || fixed));
        let mut read = |index: u8| {
            rtc.write(0, &[index | 0x80]);
            let mut b = [0u8];
            rtc.read(1, &mut b);
            b[0]
        };
        assert_eq!(read(REG_HOURS), 23);
        assert_eq!(read(REG_YEAR), 26);
        assert_eq!(read(REG_CENTURY), 20);
        assert_eq!(read(REG_STATUS_A) & 0x80, 0, "no update in progress");
        assert_eq!(read(REG_STATUS_B), STATUS_B_24H_BINARY);
    }

    #[test]
    fn host_clock_is_plausible() {
        let now = WallClock::now();
        assert!(now.year >= 2024 && (1..=12).contains(&now.month));
    }
}
