//! `--share DIR[:GUESTPATH]`: a host directory the guest sees read-only. When the run starts,
//! the directory is packed into an ext4 image with the standard tool (`mke2fs -d`, no
//! journal: the guest never writes it), which becomes one more read-only `--disk` mounted at
//! GUESTPATH. A snapshot, not a live view: what changes on the host afterwards is not seen.
//! (A live shared directory would take virtio-fs and a virtiofsd; not done.)

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::job::Job;

/// Why a `--share` cannot be had. Each names the directory; nothing has started.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// Not a directory (or not there).
    #[error("--share {0}: no such directory")]
    NotADirectory(String),
    /// The guest path is not absolute or has spaces.
    #[error("--share {spec}: the guest path `{path}` is not an absolute path without spaces")]
    GuestPath {
        /// The text given.
        spec: String,
        /// The guest path.
        path: String,
    },
    /// Walking the directory failed.
    #[error("--share {dir}: {source}")]
    Read {
        /// The directory.
        dir: String,
        /// The error.
        source: std::io::Error,
    },
    /// mke2fs could not pack it.
    #[error("--share {dir}: mke2fs could not pack it: {detail}")]
    Pack {
        /// The directory.
        dir: String,
        /// mke2fs's complaint.
        detail: String,
    },
}

/// The images packed for a run, removed when it ends.
#[derive(Debug)]
pub struct SharedImages {
    dir: PathBuf,
}

impl Drop for SharedImages {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `--share` as given: the host directory and where the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// The host directory.
    pub dir: PathBuf,
    /// The guest path.
    pub at: String,
}

impl ShareSpec {
    /// Parses `DIR[:GUESTPATH]`; the guest path defaults to `/mnt/NAME`, NAME being the
    /// directory's own name.
    pub fn parse(spec: &str) -> Result<ShareSpec, ShareError> {
        let (dir, at) = match spec.rsplit_once(':') {
            Some((d, a)) if !d.is_empty() => (d, Some(a)),
            _ => (spec, None),
        };
        let dir_path = std::fs::canonicalize(dir)
            .ok()
            .filter(|p| p.is_dir())
            .ok_or_else(|| ShareError::NotADirectory(dir.to_string()))?;
        let at = match at {
            Some(a) if a.starts_with('/') && !a.contains(char::is_whitespace) => a.to_string(),
            Some(a) => {
                return Err(ShareError::GuestPath {
                    spec: spec.to_string(),
                    path: a.to_string(),
                });
            }
            None => {
                let name = dir_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "share".into());
                format!("/mnt/{}", name.replace(char::is_whitespace, "_"))
            }
        };
        Ok(ShareSpec { dir: dir_path, at })
    }
}

/// The bytes an image for `dir` needs: its files' sizes and a block per entry for
/// directories and inodes, a fifth more, and 16 MiB for the file system's own structures.
fn image_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            total += meta.len().next_multiple_of(4096) + 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((total + total / 5 + (16 << 20)).next_multiple_of(1 << 20))
}

/// Packs `dir` into the ext4 image `img`.
fn pack(dir: &Path, img: &Path) -> Result<(), ShareError> {
    let shown = dir.display().to_string();
    let size = image_size(dir).map_err(|source| ShareError::Read {
        dir: shown.clone(),
        source,
    })?;
    let mut last = String::new();
    // Root's PATH has mke2fs; another user's may lack /sbin.
    for tool in ["mke2fs", "/sbin/mke2fs"] {
        let out = Command::new(tool)
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-O",
                "^has_journal",
                "-L",
                "hvshare",
            ])
            .arg("-d")
            .arg(dir)
            .arg(img)
            .arg(format!("{}k", size / 1024))
            .output();
        match out {
            Ok(o) if o.status.success() => return Ok(()),
            Ok(o) => {
                return Err(ShareError::Pack {
                    dir: shown,
                    detail: String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .last()
                        .unwrap_or("failed")
                        .to_string(),
                });
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(ShareError::Pack {
        dir: shown,
        detail: format!("{last} (install e2fsprogs)"),
    })
}

/// The job with every `--share` packed and turned into a read-only `--disk`, and the packed
/// images, which live as long as the returned value.
pub fn pack_shares(job: &Job) -> Result<(Job, Option<SharedImages>), ShareError> {
    if job.share.is_empty() {
        return Ok((job.clone(), None));
    }
    let specs = job
        .share
        .iter()
        .map(|s| ShareSpec::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let dir = std::env::temp_dir().join(format!("hvprobe-shares-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| ShareError::Read {
        dir: dir.display().to_string(),
        source,
    })?;
    let images = SharedImages { dir: dir.clone() };
    let mut packed = job.clone();
    packed.share.clear();
    for (i, spec) in specs.iter().enumerate() {
        let img = dir.join(format!("share{i}.img"));
        pack(&spec.dir, &img)?;
        packed
            .disk
            .push(format!("{},ro,at={}", img.display(), spec.at));
    }
    Ok((packed, Some(images)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_with_their_guest_paths_and_bad_ones_are_named() {
        let d = std::env::temp_dir().join(format!("hvprobe-share-t-{}", std::process::id()));
        let build = d.join("build");
        std::fs::create_dir_all(&build).unwrap();
        let s = ShareSpec::parse(build.to_str().unwrap()).unwrap();
        assert_eq!(s.at, "/mnt/build");
        let s = ShareSpec::parse(&format!("{}:/opt/t", build.display())).unwrap();
        assert_eq!((s.dir, s.at.as_str()), (build.clone(), "/opt/t"));
        let e = ShareSpec::parse("/no/such/dir").unwrap_err().to_string();
        assert!(
            e.contains("/no/such/dir") && e.contains("no such directory"),
            "{e}"
        );
        let e = ShareSpec::parse(&format!("{}:rel", build.display()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`rel`"), "{e}");
        // A file is not a directory.
        std::fs::write(d.join("f"), b"x").unwrap();
        assert!(matches!(
            ShareSpec::parse(d.join("f").to_str().unwrap()),
            Err(ShareError::NotADirectory(_))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_directory_is_packed_into_an_image_debugfs_reads_back() {
        let d = std::env::temp_dir().join(format!("hvprobe-share-p-{}", std::process::id()));
        let src = d.join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(src.join("sub/data"), &data).unwrap();
        let img = d.join("s.img");
        pack(&src, &img).unwrap();
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /sub/data {}", d.join("back").display()))
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(std::fs::read(d.join("back")).unwrap(), data);
        assert!(std::fs::metadata(&img).unwrap().len() >= 16 << 20);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
