//! The Debian 12 root file system (`hvprobe guest rootfs`, `hvprobe run --rootfs`): systemd,
//! udev and procps from Debian's archive, hvprobe's workload programs, and an autorun unit
//! that runs `--exec` and reports its status the way the default guest's `/init` does.
//!
//! Built in two halves so that no host needs to execute the guest's architecture (no
//! binfmt_misc, no qemu-user): debootstrap's first stage on the host (download and unpack,
//! any architecture), packed into an ext4 image with `mke2fs -d`; its second stage (every
//! package's configuration) natively in a guest booted from that image, which the VMM crate
//! runs ([`PendingRootfs`]). Cached by the package versions and this recipe, like the default
//! guest.

use std::fs::{self, File};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{GuestArch, GuestError, cache_dir, compile_workloads, debian, fnv1a, run_output};

/// The Debian release the root file system is built from.
pub const SUITE: &str = "bookworm";

/// Packages added to debootstrap's `minbase` variant: systemd as init, udev for the devices,
/// procps (`ps`, `pgrep`) for commands a user runs.
pub const PACKAGES: &[&str] = &["systemd-sysv", "udev", "procps"];

/// Size of the image (sparse: the packages take about 300 MiB of it); room for a job's files.
pub const IMAGE_SIZE: u64 = 2 << 30;

/// The archive debootstrap downloads from: `$HVPROBE_DEBIAN_MIRROR`, else Debian's CDN.
pub fn mirror() -> String {
    std::env::var("HVPROBE_DEBIAN_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".into())
}

/// Marker line the autorun unit prints just before it runs the command: the end of the
/// systemd boot, for `--timings`.
pub const AUTORUN_MARKER: &str = "HVPROBE-AUTORUN-START";

/// The autorun script (`/usr/local/sbin/hvprobe-autorun`).
pub const AUTORUN_SCRIPT: &str = include_str!("../rootfs/hvprobe-autorun");
/// The unit that runs it once `multi-user.target` is reached, when the kernel command line
/// has a command.
pub const AUTORUN_UNIT: &str = include_str!("../rootfs/hvprobe-autorun.service");
/// The serial getty's drop-in: root logs in on the console, and no getty when a command runs.
pub const GETTY_DROP_IN: &str = include_str!("../rootfs/serial-getty-hvprobe.conf");
/// The command the default guest runs, with the image mounted on `/mnt/root`, for
/// debootstrap's second stage.
pub const SECOND_STAGE_SCRIPT: &str = include_str!("../rootfs/second-stage.sh");
/// Where [`SECOND_STAGE_SCRIPT`] expects the image.
pub const SECOND_STAGE_MOUNT: &str = "/mnt/root";

/// A root file system image whose first stage is done and whose second stage must run in a
/// guest of its architecture: boot the default guest with `image` as a read-write disk
/// mounted on [`SECOND_STAGE_MOUNT`] and run [`SECOND_STAGE_SCRIPT`]; on status 0, call
/// [`PendingRootfs::finish`].
#[derive(Debug)]
pub struct PendingRootfs {
    /// The half-built image.
    pub image: PathBuf,
    /// Where the finished image goes.
    pub done: PathBuf,
    _lock: File,
}

impl PendingRootfs {
    /// Puts the image, second stage done, in its cache place and returns that path. Copied
    /// with `e2image -ra`, which writes only the blocks in use: the packages' archives the
    /// second stage unpacked and deleted leave holes, not 200 MiB of dead blocks.
    pub fn finish(self) -> Result<PathBuf, GuestError> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = self.done.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        run_output(
            Command::new("e2image")
                .arg("-ra")
                .arg(&self.image)
                .arg(&tmp),
        )?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))
            .map_err(GuestError::io(&tmp))?;
        fs::rename(&tmp, &self.done).map_err(GuestError::io(&self.done))?;
        let _ = fs::remove_file(&self.image);
        Ok(self.done)
    }
}

/// Where a root file system stands in the cache.
#[derive(Debug)]
pub enum Rootfs {
    /// Built: the image.
    Ready(PathBuf),
    /// First stage done; the second is up to the caller.
    SecondStage(PendingRootfs),
}

/// The image of `arch`'s root file system, or the first stage of a new one (a few hundred
/// MiB of downloads, a minute or so). Needs root (debootstrap) and the `debootstrap` and
/// `e2fsprogs` packages.
pub fn prepare(arch: GuestArch) -> Result<Rootfs, GuestError> {
    let cache = cache_dir();
    let (done, key) = paths(&cache, arch)?;
    let dir = done.parent().expect("image in a directory").to_path_buf();
    fs::create_dir_all(&dir).map_err(GuestError::io(&dir))?;
    let lock_path = dir.join(".lock");
    let lock = File::create(&lock_path).map_err(GuestError::io(&lock_path))?;
    lock.lock().map_err(GuestError::io(&lock_path))?;
    if done.exists() {
        return Ok(Rootfs::Ready(done));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(GuestError::Rootfs(
            "building the Debian root file system needs root: debootstrap unpacks root-owned \
             files (run `hvprobe guest rootfs` once as root; later runs use the cached image)"
                .into(),
        ));
    }
    let tree = dir.join(format!("tree-{key:016x}"));
    remove_tree(&tree)?;
    eprintln!(
        "hvprobe: building the Debian 12 {} root file system: debootstrap's first stage \
         (download and unpack {}, about a minute; cached in {})",
        arch.name(),
        PACKAGES.join(", "),
        dir.display()
    );
    run_output(
        Command::new("debootstrap")
            .arg("--foreign")
            .arg(format!("--arch={}", arch.debian()))
            .arg("--variant=minbase")
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg(SUITE)
            .arg(&tree)
            .arg(mirror()),
    )
    .map_err(|e| match e {
        GuestError::Command { detail, .. } if detail.contains("No such file") => {
            GuestError::Rootfs("debootstrap is not installed (`bash guest/setup-host.sh` or `apt-get install debootstrap`)".into())
        }
        e => e,
    })?;
    add_hvprobe_files(&tree, arch, &dir.join(format!("build-{key:016x}")))?;
    let image = dir.join(format!("{}.part", file_stem(&done)));
    let _ = fs::remove_file(&image);
    let f = File::create(&image).map_err(GuestError::io(&image))?;
    f.set_len(IMAGE_SIZE).map_err(GuestError::io(&image))?;
    drop(f);
    run_output(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "hvprobe-root", "-d"])
            .arg(&tree)
            .arg(&image),
    )?;
    remove_tree(&tree)?;
    Ok(Rootfs::SecondStage(PendingRootfs {
        image,
        done,
        _lock: lock,
    }))
}

fn file_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn remove_tree(tree: &Path) -> Result<(), GuestError> {
    match fs::remove_dir_all(tree) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(GuestError::io(tree)(e)),
        _ => Ok(()),
    }
}

/// The finished image's path for the current package versions and recipe, and the key.
fn paths(cache: &Path, arch: GuestArch) -> Result<(PathBuf, u64), GuestError> {
    let mut versions = Vec::new();
    for p in PACKAGES.iter().chain(&["libc6"]) {
        let v = debian::candidate_version(&arch.apt_name(p))?;
        versions.push(format!("{p}={v}"));
    }
    let key = recipe_key(arch, &versions);
    let dir = cache.join("rootfs");
    Ok((
        dir.join(format!("debian12-{}-{key:016x}.img", arch.name())),
        key,
    ))
}

/// The cache key: the architecture, the package versions, this recipe's files and the
/// workload programs' sources.
fn recipe_key(arch: GuestArch, versions: &[String]) -> u64 {
    let mut parts: Vec<&[u8]> = vec![
        arch.name().as_bytes(),
        SUITE.as_bytes(),
        AUTORUN_SCRIPT.as_bytes(),
        AUTORUN_UNIT.as_bytes(),
        GETTY_DROP_IN.as_bytes(),
        SECOND_STAGE_SCRIPT.as_bytes(),
    ];
    parts.extend(PACKAGES.iter().map(|p| p.as_bytes()));
    parts.extend(versions.iter().map(|v| v.as_bytes()));
    for (name, src) in crate::WORKLOADS {
        parts.push(name.as_bytes());
        parts.push(src.as_bytes());
    }
    fnv1a(&parts)
}

/// Writes hvprobe's part into the unpacked tree: the workloads in /usr/local/bin, the
/// autorun script and unit (enabled), the getty drop-in, the host name, an empty fstab (the
/// root is mounted read-write by the initramfs).
fn add_hvprobe_files(tree: &Path, arch: GuestArch, work: &Path) -> Result<(), GuestError> {
    let write = |rel: &str, mode: u32, bytes: &[u8]| -> Result<(), GuestError> {
        use std::os::unix::fs::PermissionsExt;
        let p = tree.join(rel);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).map_err(GuestError::io(d))?;
        }
        fs::write(&p, bytes).map_err(GuestError::io(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(GuestError::io(&p))
    };
    for (name, bytes) in compile_workloads(arch, work)? {
        write(&format!("usr/local/bin/{name}"), 0o755, &bytes)?;
    }
    let _ = fs::remove_dir_all(work);
    write(
        "usr/local/sbin/hvprobe-autorun",
        0o755,
        AUTORUN_SCRIPT.as_bytes(),
    )?;
    write(
        "etc/systemd/system/hvprobe-autorun.service",
        0o644,
        AUTORUN_UNIT.as_bytes(),
    )?;
    let wants = tree.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants).map_err(GuestError::io(&wants))?;
    let link = wants.join("hvprobe-autorun.service");
    let _ = fs::remove_file(&link);
    symlink("/etc/systemd/system/hvprobe-autorun.service", &link).map_err(GuestError::io(&link))?;
    write(
        "etc/systemd/system/serial-getty@.service.d/hvprobe.conf",
        0o644,
        GETTY_DROP_IN.as_bytes(),
    )?;
    write("etc/hostname", 0o644, b"hvprobe-guest\n")?;
    write(
        "etc/hosts",
        0o644,
        b"127.0.0.1\tlocalhost\n127.0.1.1\thvprobe-guest\n",
    )?;
    write(
        "etc/fstab",
        0o644,
        b"# The root file system is mounted read-write by hvprobe's initramfs.\n",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_changes_with_any_package_version_and_the_architecture() {
        let v = |s: &str| vec![format!("systemd-sysv={s}"), "libc6=2.36-9".to_string()];
        let a = recipe_key(GuestArch::X86_64, &v("252.39-1"));
        assert_eq!(a, recipe_key(GuestArch::X86_64, &v("252.39-1")));
        assert_ne!(a, recipe_key(GuestArch::X86_64, &v("252.40-1")));
        assert_ne!(a, recipe_key(GuestArch::Aarch64, &v("252.39-1")));
    }

    #[test]
    fn the_tree_gets_the_autorun_unit_enabled_and_the_getty_drop_in() {
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("tree");
        add_hvprobe_files(&tree, GuestArch::host(), &t.path().join("work")).unwrap();
        let link = tree.join("etc/systemd/system/multi-user.target.wants/hvprobe-autorun.service");
        assert_eq!(
            fs::read_link(&link).unwrap(),
            Path::new("/etc/systemd/system/hvprobe-autorun.service")
        );
        let unit =
            fs::read_to_string(tree.join("etc/systemd/system/hvprobe-autorun.service")).unwrap();
        assert!(unit.contains("ExecStart=/usr/local/sbin/hvprobe-autorun"));
        assert!(unit.contains("ConditionKernelCommandLine=hvprobe.exec"));
        let getty = fs::read_to_string(
            tree.join("etc/systemd/system/serial-getty@.service.d/hvprobe.conf"),
        )
        .unwrap();
        assert!(getty.contains("ConditionKernelCommandLine=!hvprobe.exec"));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(tree.join("usr/local/bin/getpid-loop"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let script = fs::read_to_string(tree.join("usr/local/sbin/hvprobe-autorun")).unwrap();
        assert!(script.contains(AUTORUN_MARKER) && script.contains(crate::EXIT_STATUS_MARKER));
    }
}
