//! virtio devices on the virtio-mmio transport (docs/design-real-guests.md): for now the
//! `--disk PATH[,ro]` image a block device will serve, parsed, opened and locked before any
//! VM memory is allocated, so that a bad image is refused with nothing started.

pub mod block;
pub mod mmio;

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use vmm_sys_util::eventfd::EventFd;

/// How a virtio device interrupts the guest: the transport's InterruptStatus bits and the
/// eventfd the VMM registers as an irqfd on the device's interrupt line.
#[derive(Clone)]
pub struct VirtioIrq {
    /// InterruptStatus: bit 0 used buffers, bit 1 configuration change.
    pub status: Arc<AtomicU32>,
    /// Written to raise the line (edge-triggered: one write, one interrupt).
    pub evt: Arc<EventFd>,
}

impl VirtioIrq {
    /// A line with no interrupt pending.
    pub fn new() -> std::io::Result<VirtioIrq> {
        Ok(VirtioIrq {
            status: Arc::new(AtomicU32::new(0)),
            evt: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Tells the driver the device has put buffers in the used ring.
    pub fn signal_used(&self) -> std::io::Result<()> {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        self.evt.write(1)
    }
}

/// Why a device could not start serving its queue (the driver then sees NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// An eventfd could not be made or cloned.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The I/O thread could not be started.
    #[error("starting the I/O thread: {0}")]
    Thread(std::io::Error),
    /// The image could not be shared with the I/O thread.
    #[error("disk image: {0}")]
    Image(std::io::Error),
}

/// The sector size virtio-blk counts in.
pub const SECTOR: u64 = 512;

/// A `--disk` as given: the image and whether the guest may only read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The raw image (a regular file or a block device).
    pub path: PathBuf,
    /// `,ro`: the guest's writes fail with an I/O error and the image never changes.
    pub read_only: bool,
    /// `,at=GUESTPATH`: where the default guest mounts it (else `/mnt` for the first disk,
    /// `/mnt<N>` for the others).
    pub mount: Option<String>,
}

/// The most disks a guest gets (each takes a page of MMIO space and an interrupt line).
pub const MAX_DISKS: usize = 8;

/// Why a `--disk` cannot be used. Each names the image; nothing has started.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The text does not parse.
    #[error("--disk {spec}: {reason} (expected PATH[,ro][,at=GUESTPATH])")]
    Syntax {
        /// The text given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// The image cannot be opened.
    #[error("disk image {path}: {source}{hint}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
        /// Advice, where there is some.
        hint: &'static str,
    },
    /// Not a regular file or a block device.
    #[error("disk image {0} is not a regular file or a block device")]
    NotAnImage(PathBuf),
    /// Empty, or not whole sectors.
    #[error("disk image {path} is {len} bytes: a disk is a positive multiple of 512 bytes")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// Another process holds the image's lock.
    #[error("disk image {0} is in use by another process (it holds the image's flock)")]
    InUse(PathBuf),
    /// More disks than the machine has room for.
    #[error("{0} disks: a guest takes at most {MAX_DISKS}")]
    TooMany(usize),
}

/// Opens and locks every disk ([`DiskSpec::open`]), refusing more than [`MAX_DISKS`]: the
/// check both the VMM and the emulated runner (which locks the images on the host) make
/// before anything boots.
pub fn open_disks(specs: &[DiskSpec]) -> Result<Vec<OpenDisk>, DiskError> {
    if specs.len() > MAX_DISKS {
        return Err(DiskError::TooMany(specs.len()));
    }
    specs.iter().map(DiskSpec::open).collect()
}

impl DiskSpec {
    /// The `--disk` text of this disk (`PATH[,ro][,at=GUESTPATH]`), as [`DiskSpec::parse`]
    /// reads it back.
    pub fn to_arg(&self) -> String {
        let mut s = self.path.display().to_string();
        if self.read_only {
            s.push_str(",ro");
        }
        if let Some(at) = &self.mount {
            s.push_str(&format!(",at={at}"));
        }
        s
    }

    /// Where the default guest mounts disk number `index`.
    pub fn mount_point(&self, index: usize) -> String {
        match (&self.mount, index) {
            (Some(at), _) => at.clone(),
            (None, 0) => "/mnt".to_string(),
            (None, n) => format!("/mnt{n}"),
        }
    }

    /// Parses `PATH` or `PATH,ro`.
    pub fn parse(spec: &str) -> Result<DiskSpec, DiskError> {
        let syntax = |reason: &str| DiskError::Syntax {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(syntax("empty path"));
        }
        let (mut read_only, mut mount) = (false, None);
        for option in parts {
            match option {
                "ro" => read_only = true,
                "rw" => read_only = false,
                o if o.starts_with("at=") => {
                    let at = &o[3..];
                    if !at.starts_with('/') || at.contains(char::is_whitespace) {
                        return Err(syntax(&format!(
                            "`{o}`: the guest path is absolute and has no spaces"
                        )));
                    }
                    mount = Some(at.to_string());
                }
                o => {
                    return Err(syntax(&format!(
                        "unknown option `{o}` (only `ro`, `rw` and `at=GUESTPATH`)"
                    )));
                }
            }
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            read_only,
            mount,
        })
    }

    /// Opens and locks the image (exclusively for read-write, shared for `ro`, as flock(2)
    /// locks: two hvprobes cannot both write one image) and checks its size. The lock lasts
    /// as long as the returned file.
    pub fn open(&self) -> Result<OpenDisk, DiskError> {
        let path = self.path.clone();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!self.read_only)
            .open(&self.path)
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                hint: match source.raw_os_error() {
                    Some(libc::EACCES) | Some(libc::EROFS) if !self.read_only => {
                        " (add ,ro to attach it read-only)"
                    }
                    _ => "",
                },
                source,
            })?;
        let meta = file.metadata().map_err(|source| DiskError::Open {
            path: path.clone(),
            source,
            hint: "",
        })?;
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskError::NotAnImage(path));
        }
        let lock = if self.read_only {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match lock {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(DiskError::InUse(path)),
            Err(TryLockError::Error(source)) => {
                return Err(DiskError::Open {
                    path,
                    source,
                    hint: "",
                });
            }
        }
        // A block device's size is where its end is.
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Open {
                path: path.clone(),
                source,
                hint: "",
            })?;
        if len == 0 || !len.is_multiple_of(SECTOR) {
            return Err(DiskError::Size { path, len });
        }
        Ok(OpenDisk {
            file,
            sectors: len / SECTOR,
            read_only: self.read_only,
        })
    }
}

/// An opened, locked disk image.
#[derive(Debug)]
pub struct OpenDisk {
    /// The image, locked.
    pub file: File,
    /// Its size in sectors.
    pub sectors: u64,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, len: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hvprobe-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    #[test]
    fn disk_specs_parse_and_bad_ones_are_named() {
        assert_eq!(
            DiskSpec::parse("/x/img,ro").unwrap(),
            DiskSpec {
                path: "/x/img".into(),
                read_only: true,
                mount: None,
            }
        );
        let at = DiskSpec::parse("/x/img,at=/data,ro").unwrap();
        assert_eq!((at.read_only, at.mount.as_deref()), (true, Some("/data")));
        assert_eq!(DiskSpec::parse(&at.to_arg()).unwrap(), at);
        assert_eq!(at.mount_point(3), "/data");
        let plain = DiskSpec::parse("img").unwrap();
        assert_eq!(
            (plain.mount_point(0), plain.mount_point(2)),
            ("/mnt".into(), "/mnt2".into())
        );
        assert!(!DiskSpec::parse("img").unwrap().read_only);
        assert!(!DiskSpec::parse("img,rw").unwrap().read_only);
        for (bad, says) in [
            (",ro", "empty path"),
            ("img,x", "unknown option `x`"),
            ("img,at=data", "absolute"),
            ("img,at=/a b", "no spaces"),
            ("", "empty path"),
        ] {
            let e = DiskSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("--disk"), "{bad}: {e}");
        }
    }

    #[test]
    fn images_are_checked_and_locked_against_a_second_writer() {
        let good = image("good.img", 1 << 20);
        let disk = DiskSpec::parse(good.to_str().unwrap())
            .unwrap()
            .open()
            .unwrap();
        assert_eq!((disk.sectors, disk.read_only), (2048, false));
        // flock locks belong to the open file: a second open, even in this process, is refused.
        let e = DiskSpec::parse(good.to_str().unwrap())
            .unwrap()
            .open()
            .unwrap_err();
        assert!(matches!(e, DiskError::InUse(_)), "{e}");
        let e = DiskSpec::parse(&format!("{},ro", good.display()))
            .unwrap()
            .open()
            .unwrap_err();
        assert!(
            matches!(e, DiskError::InUse(_)),
            "a reader waits for the writer too: {e}"
        );
        drop(disk);
        // Readers share.
        let a = DiskSpec::parse(&format!("{},ro", good.display()))
            .unwrap()
            .open()
            .unwrap();
        let b = DiskSpec::parse(&format!("{},ro", good.display()))
            .unwrap()
            .open()
            .unwrap();
        assert!(a.read_only && b.read_only);
        drop((a, b));
        let odd = image("odd.img", 1000);
        let e = DiskSpec::parse(odd.to_str().unwrap())
            .unwrap()
            .open()
            .unwrap_err();
        assert!(e.to_string().contains("1000 bytes"), "{e}");
        let empty = image("empty.img", 0);
        assert!(matches!(
            DiskSpec::parse(empty.to_str().unwrap())
                .unwrap()
                .open()
                .unwrap_err(),
            DiskError::Size { len: 0, .. }
        ));
        let e = DiskSpec::parse("/no/such/hvprobe.img")
            .unwrap()
            .open()
            .unwrap_err();
        assert!(e.to_string().contains("/no/such/hvprobe.img"), "{e}");
        let dir = std::env::temp_dir();
        let e = DiskSpec::parse(dir.to_str().unwrap())
            .unwrap()
            .open()
            .unwrap_err();
        assert!(
            matches!(e, DiskError::NotAnImage(_) | DiskError::Open { .. }),
            "{e}"
        );
        std::fs::remove_dir_all(good.parent().unwrap()).unwrap();
    }
}
