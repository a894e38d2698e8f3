//! Value histograms for `--hist`: how often each return value came back, in the power-of-two
//! buckets bpftrace's `hist()` uses, with small negative values (the kernel's `-errno` range)
//! kept exact and named, since those are the values a kernel developer looks for.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::definition::FetchType;

/// Negative values down to this one are kept exact (`-MAX_ERRNO` in the kernel).
const MAX_ERRNO: i64 = 4095;

/// Width of the bar column.
const BAR_WIDTH: u64 = 40;

/// Where a value is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Bucket {
    /// Below `-MAX_ERRNO`: `(-2^(k+1), -2^k]`, keyed so that more negative sorts first.
    BigNegative(std::cmp::Reverse<u32>),
    /// One exact value in `-MAX_ERRNO..=-1`.
    Errno(i64),
    /// Zero.
    Zero,
    /// `[2^k, 2^(k+1))`.
    Positive(u32),
}

impl Bucket {
    fn of(v: i128) -> Bucket {
        match v {
            0 => Bucket::Zero,
            v if v > 0 => Bucket::Positive(127 - v.leading_zeros()),
            v if v >= -i128::from(MAX_ERRNO) => Bucket::Errno(v as i64),
            v => Bucket::BigNegative(std::cmp::Reverse(127 - (-v).leading_zeros())),
        }
    }

    fn label(self) -> String {
        match self {
            Bucket::Zero => "0".to_string(),
            Bucket::Errno(v) => match errno_name(-v) {
                Some(name) => format!("{v} ({name})"),
                None => v.to_string(),
            },
            Bucket::Positive(0) => "1".to_string(),
            Bucket::Positive(k) => format!("[{}, {})", size(1 << k), size(1 << (k + 1))),
            Bucket::BigNegative(std::cmp::Reverse(k)) => {
                format!("(-{}, -{}]", size(1 << (k + 1)), size(1 << k))
            }
        }
    }
}

/// `1024` as `1K`, like bpftrace's bucket labels.
fn size(v: u128) -> String {
    const UNITS: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    let mut v = v;
    let mut unit = 0;
    while v >= 1024 && v.is_multiple_of(1024) && unit + 1 < UNITS.len() {
        v /= 1024;
        unit += 1;
    }
    format!("{v}{}", UNITS[unit])
}

/// The name of a Linux errno value (the generic numbers, which x86_64 and arm64 share).
pub fn errno_name(e: i64) -> Option<&'static str> {
    const NAMES: [&str; 41] = [
        "",
        "EPERM",
        "ENOENT",
        "ESRCH",
        "EINTR",
        "EIO",
        "ENXIO",
        "E2BIG",
        "ENOEXEC",
        "EBADF",
        "ECHILD",
        "EAGAIN",
        "ENOMEM",
        "EACCES",
        "EFAULT",
        "ENOTBLK",
        "EBUSY",
        "EEXIST",
        "EXDEV",
        "ENODEV",
        "ENOTDIR",
        "EISDIR",
        "EINVAL",
        "ENFILE",
        "EMFILE",
        "ENOTTY",
        "ETXTBSY",
        "EFBIG",
        "ENOSPC",
        "ESPIPE",
        "EROFS",
        "EMLINK",
        "EPIPE",
        "EDOM",
        "ERANGE",
        "EDEADLK",
        "ENAMETOOLONG",
        "ENOLCK",
        "ENOSYS",
        "ENOTEMPTY",
        "ELOOP",
    ];
    match e {
        1..=40 => Some(NAMES[e as usize]),
        95 => Some("EOPNOTSUPP"),
        110 => Some("ETIMEDOUT"),
        512 => Some("ERESTARTSYS"),
        513 => Some("ERESTARTNOINTR"),
        514 => Some("ERESTARTNOHAND"),
        516 => Some("ERESTART_RESTARTBLOCK"),
        _ => None,
    }
}

/// A histogram of the values one fetch argument took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValueHistogram {
    counts: BTreeMap<Bucket, u64>,
    total: u64,
}

impl ValueHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts a raw 64-bit value read as `ty`: `uN` as unsigned, `sN` and `xN` (the default
    /// of `$retval`, and how the kernel returns `-errno`) as signed, both of `N` bits.
    pub fn add(&mut self, raw: u64, ty: FetchType) {
        let v = match ty {
            FetchType::Unsigned(bits) => i128::from(truncate(raw, bits)),
            FetchType::Signed(bits) | FetchType::Hex(bits) => {
                let shift = 64 - u32::from(bits.clamp(1, 64));
                i128::from(((raw << shift) as i64) >> shift)
            }
            _ => i128::from(raw as i64),
        };
        *self.counts.entry(Bucket::of(v)).or_default() += 1;
        self.total += 1;
    }

    /// How many values were counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The histogram as text: one row per bucket that has values (rows between the first and
    /// last positive bucket are kept, empty or not, so the shape reads right), with a bar.
    pub fn render(&self) -> String {
        let max = self.counts.values().copied().max().unwrap_or(0);
        let mut rows: Vec<(Bucket, u64)> = Vec::new();
        let mut last_positive: Option<u32> = None;
        for (&b, &n) in &self.counts {
            if let (Bucket::Positive(k), Some(prev)) = (b, last_positive) {
                rows.extend((prev + 1..k).map(|gap| (Bucket::Positive(gap), 0)));
            }
            if let Bucket::Positive(k) = b {
                last_positive = Some(k);
            }
            rows.push((b, n));
        }
        let labels: Vec<String> = rows.iter().map(|(b, _)| b.label()).collect();
        let width = labels.iter().map(String::len).max().unwrap_or(0);
        let mut out = String::new();
        for ((_, n), label) in rows.iter().zip(&labels) {
            let bar = (n * BAR_WIDTH).div_ceil(max.max(1)) as usize;
            let _ = writeln!(
                out,
                "{label:<width$} {n:>10} |{}{}|",
                "@".repeat(bar),
                " ".repeat(BAR_WIDTH as usize - bar)
            );
        }
        out
    }
}

fn truncate(v: u64, bits: u8) -> u64 {
    if bits >= 64 {
        v
    } else {
        v & ((1u64 << bits) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_power_of_two_buckets_and_errnos_stay_exact() {
        let mut h = ValueHistogram::new();
        for v in [0u64, 1, 2, 3, 4, 1023, 1024, 30, 30] {
            h.add(v, FetchType::Signed(64));
        }
        h.add((-2i64) as u64, FetchType::Signed(64));
        // s32: the low 32 bits, sign-extended.
        h.add(0xffff_ffff_ffff_fff2, FetchType::Signed(32));
        h.add(0x1_ffff_fffe, FetchType::Signed(32));
        // A negative below -MAX_ERRNO goes to a bucket.
        h.add((-5000i64) as u64, FetchType::Signed(64));
        assert_eq!(h.total(), 13);
        let text = h.render();
        let got: Vec<(String, u64)> = text
            .lines()
            .map(|l| {
                let (left, _bar) = l.split_once(" |").unwrap();
                let (label, count) = left.trim_end().rsplit_once(' ').unwrap();
                (label.trim().to_string(), count.parse().unwrap())
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("(-8K, -4K]".to_string(), 1),
                ("-14 (EFAULT)".to_string(), 1),
                ("-2 (ENOENT)".to_string(), 2),
                ("0".to_string(), 1),
                ("1".to_string(), 1),
                ("[2, 4)".to_string(), 2),
                ("[4, 8)".to_string(), 1),
                ("[8, 16)".to_string(), 0),
                ("[16, 32)".to_string(), 2),
                ("[32, 64)".to_string(), 0),
                ("[64, 128)".to_string(), 0),
                ("[128, 256)".to_string(), 0),
                ("[256, 512)".to_string(), 0),
                ("[512, 1K)".to_string(), 1),
                ("[1K, 2K)".to_string(), 1),
            ]
        );
        // The biggest row has the full bar.
        assert!(text.contains(&format!("|{}|", "@".repeat(40))));
    }

    #[test]
    fn unsigned_values_are_not_read_as_errors() {
        let mut h = ValueHistogram::new();
        h.add(u64::MAX, FetchType::Unsigned(64));
        h.add(0xff, FetchType::Unsigned(8));
        let text = h.render();
        assert!(text.starts_with("[128, 256)"), "{text}");
        assert!(text.contains("[8E, 16E)"), "{text}");
        assert!(!text.contains('-'), "{text}");
    }
}
