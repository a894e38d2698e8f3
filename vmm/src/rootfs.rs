//! `hvprobe run --rootfs [IMAGE]` and `hvprobe guest rootfs`: a guest booted from a root file
//! system on a disk, with systemd as its init. The root is one more `--disk`, the first, with
//! the guest path `/`: the default guest's `/init` mounts it, mounts the other disks inside
//! it, and hands over to its `/sbin/init` once the probes are in (so boot-time probes see
//! systemd start). Without IMAGE, a copy of the cached Debian 12 image
//! ([`hvprobe_guest::rootfs`]) made for the run and deleted after it, so every run starts
//! from the same state; with IMAGE, that image itself, read-write.

use std::path::{Path, PathBuf};
use std::process::Command;

use hvprobe_guest::GuestArch;
use hvprobe_guest::rootfs::{self, Rootfs};

use crate::job::Job;

/// Why a root file system cannot be had. Nothing has started in a guest of the run.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// Fetching or first-stage building failed.
    #[error("the Debian root file system: {0}")]
    Build(#[from] hvprobe_guest::GuestError),
    /// debootstrap's second stage failed in the guest.
    #[error(
        "the Debian root file system: debootstrap's second stage in the {arch} guest failed ({detail}); its output is above"
    )]
    SecondStage {
        /// The guest's architecture.
        arch: GuestArch,
        /// The guest command's status, or why the guest did not run.
        detail: String,
    },
    /// `--rootfs IMAGE` is not a file.
    #[error("--rootfs {0}: no such image file")]
    NoImage(String),
    /// Copying the cached image for the run failed.
    #[error("copying the root file system image for the run: {0}")]
    Copy(String),
}

/// The cached Debian root file system of `arch`, built first when there is none:
/// debootstrap's first stage on the host, then its second stage in a default guest, which
/// `run` boots (the caller's way of running a job; it returns the job's exit status).
pub fn cached_image(
    arch: GuestArch,
    run: impl FnOnce(&Job) -> Result<i32, String>,
) -> Result<PathBuf, RootfsError> {
    let pending = match rootfs::prepare(arch)? {
        Rootfs::Ready(image) => return Ok(image),
        Rootfs::SecondStage(p) => p,
    };
    eprintln!(
        "hvprobe: configuring the {arch} root file system's packages in a guest (debootstrap's \
         second stage: about a minute on KVM, 7 to 15 minutes under the emulated runner)"
    );
    let job = second_stage_job(arch, &pending.image);
    match run(&job) {
        Ok(0) => Ok(pending.finish()?),
        Ok(status) => Err(RootfsError::SecondStage {
            arch,
            detail: format!("status {status}"),
        }),
        Err(detail) => Err(RootfsError::SecondStage { arch, detail }),
    }
}

/// The default-guest job that runs debootstrap's second stage on `image`.
fn second_stage_job(arch: GuestArch, image: &Path) -> Job {
    Job {
        arch: Some(arch),
        memory: 1024,
        disk: vec![format!(
            "{},at={}",
            image.display(),
            rootfs::SECOND_STAGE_MOUNT
        )],
        exec: Some(rootfs::SECOND_STAGE_SCRIPT.to_string()),
        timeout: Some(3600),
        ..Job::empty()
    }
}

/// A root image copied for one run; deleted when dropped.
#[derive(Debug, Default)]
pub struct RunCopy {
    path: Option<PathBuf>,
}

impl Drop for RunCopy {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The job with `--rootfs` turned into its first disk (guest path `/`), and the run's copy
/// of the cached image when it uses one. `cached` gives the cached image (building it when
/// needed). A job without `--rootfs` comes back as it was.
pub fn attach(
    args: &Job,
    cached: impl FnOnce(GuestArch) -> Result<PathBuf, RootfsError>,
) -> Result<(Job, RunCopy), RootfsError> {
    let Some(given) = &args.rootfs else {
        return Ok((args.clone(), RunCopy::default()));
    };
    let mut job = args.clone();
    job.rootfs = None;
    let (image, copy) = if given.is_empty() {
        let cached = cached(args.guest_arch())?;
        let copy = cached.with_file_name(format!("run-{}.img", std::process::id()));
        copy_sparse(&cached, &copy)?;
        (copy.clone(), RunCopy { path: Some(copy) })
    } else {
        let p = PathBuf::from(given);
        if !p.is_file() {
            return Err(RootfsError::NoImage(given.clone()));
        }
        (p, RunCopy::default())
    };
    job.disk.insert(0, format!("{},at=/", image.display()));
    Ok((job, copy))
}

/// Copies a sparse image keeping its holes (and sharing its blocks where the file system
/// can: `cp --reflink=auto`).
fn copy_sparse(from: &Path, to: &Path) -> Result<(), RootfsError> {
    let out = Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(from)
        .arg(to)
        .output()
        .map_err(|e| RootfsError::Copy(format!("cp: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(to);
        return Err(RootfsError::Copy(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_becomes_the_first_disk_mounted_at_the_root() {
        let dir = std::env::temp_dir().join(format!("hvprobe-rootfs-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cached = dir.join("cached.img");
        std::fs::write(&cached, b"not really ext4").unwrap();
        let job = Job {
            rootfs: Some(String::new()),
            disk: vec!["/data.img,ro".into()],
            ..Job::empty()
        };
        let (out, copy) = attach(&job, |_| Ok(cached.clone())).unwrap();
        assert_eq!(out.rootfs, None);
        let run_copy = copy.path.clone().unwrap();
        assert_eq!(
            out.disk,
            vec![
                format!("{},at=/", run_copy.display()),
                "/data.img,ro".into()
            ]
        );
        assert_eq!(std::fs::read(&run_copy).unwrap(), b"not really ext4");
        assert_eq!(out.guest_mounts().unwrap(), "0 rw /\n1 ro /mnt1\n");
        drop(copy);
        assert!(!run_copy.exists(), "the run's copy is deleted with it");
        assert!(cached.exists());

        let given = Job {
            rootfs: Some(cached.display().to_string()),
            ..Job::empty()
        };
        let (out, copy) = attach(&given, |_| panic!("no cached image needed")).unwrap();
        assert_eq!(out.disk, vec![format!("{},at=/", cached.display())]);
        assert!(copy.path.is_none());

        let missing = Job {
            rootfs: Some("/nonexistent.img".into()),
            ..Job::empty()
        };
        let e = attach(&missing, |_| panic!()).unwrap_err().to_string();
        assert_eq!(e, "--rootfs /nonexistent.img: no such image file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_second_stage_runs_on_the_image_in_a_default_guest() {
        let job = second_stage_job(GuestArch::Aarch64, Path::new("/c/r.img.part"));
        assert_eq!(job.disk, vec!["/c/r.img.part,at=/mnt/root".to_string()]);
        assert_eq!(job.guest_mounts().unwrap(), "0 rw /mnt/root\n");
        assert!(job.exec.unwrap().contains("--second-stage"));
        assert_eq!(job.arch, Some(GuestArch::Aarch64));
    }
}
