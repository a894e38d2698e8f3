//! A writer for the `newc` cpio format, the one the Linux kernel unpacks as an initramfs.
//!
//! Written here rather than taken from a crate because the format is a 110-byte ASCII header
//! per entry and the kernel needs device nodes (`/dev/console`) and symlinks, which is all this
//! does; `docs/dependencies.md` says more.

use std::io::{self, Write};

/// Streams cpio `newc` entries to a writer; call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

/// What kind of file an entry is, with the mode bits the kernel expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file; the argument is its permission bits.
    File(u32),
    /// A directory; the argument is its permission bits.
    Dir(u32),
    /// A symbolic link; its data is the target.
    Symlink,
    /// A character device with major and minor numbers.
    CharDev(u32, u32),
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += pad as u64;
        Ok(())
    }

    fn entry(&mut self, name: &str, kind: EntryKind, data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let (mode, rmaj, rmin) = match kind {
            EntryKind::File(perm) => (0o100000 | (perm & 0o7777), 0, 0),
            EntryKind::Dir(perm) => (0o040000 | (perm & 0o7777), 0, 0),
            EntryKind::Symlink => (0o120777, 0, 0),
            EntryKind::CharDev(maj, min) => (0o020600, maj, min),
        };
        let data_len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            nlink = if matches!(kind, EntryKind::Dir(_)) {
                2
            } else {
                1
            },
            mtime = 0,
            size = data_len,
            dmaj = 0,
            dmin = 0,
            namesize = name.len() + 1,
            check = 0,
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += header.len() as u64 + name.len() as u64 + 1;
        self.pad4()?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad4()
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, EntryKind::File(perm), data)
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, EntryKind::Dir(0o755), &[])
    }

    /// Adds a symlink `name` pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, EntryKind::Symlink, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, EntryKind::CharDev(major, minor), &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", EntryKind::File(0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(buf: &[u8], at: usize, idx: usize) -> u32 {
        let s = std::str::from_utf8(&buf[at + 6 + idx * 8..at + 6 + idx * 8 + 8]).unwrap();
        u32::from_str_radix(s, 16).unwrap()
    }

    #[test]
    fn entries_are_aligned_and_parse_back() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin").unwrap();
        w.file("bin/hello", 0o755, b"hello world").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 5, 1).unwrap();
        let buf = w.finish().unwrap();
        assert_eq!(buf.len() % 4, 0);

        let mut at = 0;
        let mut names = Vec::new();
        while at < buf.len() {
            assert_eq!(&buf[at..at + 6], b"070701");
            let mode = field(&buf, at, 1);
            let size = field(&buf, at, 6) as usize;
            let namesize = field(&buf, at, 11) as usize;
            let name_at = at + 110;
            let name = std::str::from_utf8(&buf[name_at..name_at + namesize - 1]).unwrap();
            let data_at = (name_at + namesize).div_ceil(4) * 4;
            let data = &buf[data_at..data_at + size];
            names.push((name.to_string(), mode, data.to_vec(), field(&buf, at, 9)));
            at = (data_at + size).div_ceil(4) * 4;
        }
        assert_eq!(names[0].0, "bin");
        assert_eq!(names[0].1, 0o040755);
        assert_eq!(names[1].2, b"hello world");
        assert_eq!(names[2].1, 0o120777);
        assert_eq!(names[2].2, b"busybox");
        assert_eq!(names[3].3, 5);
        assert_eq!(names[4].0, "TRAILER!!!");
    }
}
