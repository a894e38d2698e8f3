//! Fetching Debian packages (`apt-get download`, `dpkg-deb`) into the cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{GuestArch, GuestError, run_output};

/// A Debian kernel image package unpacked in the cache: the kernel image (a bzImage, or arm64's
/// uncompressed Image), the real System.map and vmlinux from its `-dbg` package, and the
/// modules it needs as the L1 kernel of the emulated runner.
#[derive(Clone, Debug)]
pub struct KernelPackage {
    /// Package name, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Debian version of the package, e.g. `6.1.192-2`.
    pub version: String,
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// Cache directory holding the files.
    pub dir: PathBuf,
}

impl KernelPackage {
    /// The kernel image (bzImage on x86_64, Image on arm64).
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    /// The real System.map (from the `-dbg` package).
    pub fn system_map(&self) -> PathBuf {
        self.dir.join("System.map")
    }
    /// The uncompressed vmlinux ELF with debug info and BTF.
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
    /// The kernel's build configuration.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config")
    }
    /// A module kept from the package (see [`crate::GuestArch::l1_modules`]), by file name.
    pub fn module(&self, name: &str) -> PathBuf {
        self.dir.join("modules").join(name)
    }
}

/// Modules kept from an x86_64 kernel package, relative to `lib/modules/<release>/kernel`, in
/// load order: what an L1 kernel needs to offer `/dev/kvm`.
pub const KVM_MODULES: &[&str] = &[
    "virt/lib/irqbypass.ko",
    "arch/x86/kvm/kvm.ko",
    "arch/x86/kvm/kvm-amd.ko",
    "arch/x86/kvm/kvm-intel.ko",
    // The virtio console over PCI, for the port that carries the live-session API.
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/char/virtio_console.ko",
    // `--disk`: L1's disk passed through by the runner (PCI), and the guest's own (virtio-mmio).
    "drivers/block/virtio_blk.ko",
    "drivers/virtio/virtio_mmio.ko", // `--rootfs`: the automount file systems systemd sets up, loaded by /init before it hands over.
    "fs/autofs/autofs4.ko",
    "fs/binfmt_misc.ko",
];

/// Modules kept from an arm64 kernel package, in load order: the virtio console over virtio-mmio
/// (KVM is built in).
pub const ARM64_L1_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/char/virtio_console.ko",
    // `--disk`: L1's disk passed through by the runner, and the guest's own.
    "drivers/block/virtio_blk.ko", // `--rootfs`: the automount file systems systemd sets up, loaded by /init before it hands over.
    "fs/autofs/autofs4.ko",
    "fs/binfmt_misc.ko",
];

/// The file that marks a cache entry as whole (written last).
pub(crate) const COMPLETE: &str = ".complete";

/// Asks apt which package the meta package `meta` depends on (the current kernel image), without
/// an architecture suffix.
fn resolve_meta(meta: &str) -> Result<String, GuestError> {
    let out = run_output(Command::new("apt-cache").args(["depends", meta]))?;
    let out = String::from_utf8_lossy(&out);
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(|p| p.split(':').next().unwrap_or(p).to_string())
        .ok_or_else(|| GuestError::Resolve {
            meta: meta.into(),
            detail: "no linux-image dependency listed".into(),
        })
}

/// Asks apt for the candidate version of `package`.
pub(crate) fn candidate_version(package: &str) -> Result<String, GuestError> {
    let out = run_output(Command::new("apt-cache").args(["show", "--no-all-versions", package]))?;
    let out = String::from_utf8_lossy(&out);
    out.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| GuestError::Resolve {
            meta: package.into(),
            detail: "apt-cache show printed no Version".into(),
        })
}

/// The newest complete cache entry under `dir` whose name starts with `prefix` and contains
/// `infix`.
fn newest_cached(dir: &Path, prefix: &str, infix: &str) -> Option<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) || !name.contains(infix) || !path.join(COMPLETE).exists() {
            continue;
        }
        let mtime = fs::metadata(path.join(COMPLETE))
            .and_then(|m| m.modified())
            .ok()?;
        if best.as_ref().is_none_or(|(t, _)| mtime > *t) {
            best = Some((mtime, path));
        }
    }
    best.map(|(_, p)| p)
}

fn sh(script: &str) -> Result<Vec<u8>, GuestError> {
    run_output(Command::new("sh").args(["-c", script]))
}

/// Extracts the L1 modules a kernel cached by an older hvprobe lacks (the list grew) from the
/// image package alone (tens of MiB), without fetching the `-dbg` package again.
fn add_missing_modules(kp: &KernelPackage, arch: crate::GuestArch) -> Result<(), GuestError> {
    let missing: Vec<&str> = arch
        .l1_modules()
        .iter()
        .copied()
        .filter(|m| !kp.module(m.rsplit('/').next().unwrap_or(m)).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "hvprobe: adding {} kernel module(s) to the cached guest kernel {} (from its image package)",
        missing.len(),
        kp.package
    );
    let dl = kp.dir.join("deb-modules");
    let _ = fs::remove_dir_all(&dl);
    download(
        &dl,
        &[format!("{}={}", arch.apt_name(&kp.package), kp.version)],
    )?;
    let image = find_deb(&dl, &kp.package)?;
    let unpack = dl.join("unpack");
    fs::create_dir_all(&unpack).map_err(GuestError::io(&unpack))?;
    run_output(Command::new("dpkg-deb").arg("-x").arg(&image).arg(&unpack))?;
    for m in missing {
        let src = unpack.join(format!("lib/modules/{}/kernel/{m}", kp.release));
        let dst = kp.module(m.rsplit('/').next().unwrap_or(m));
        fs::rename(&src, &dst).map_err(GuestError::io(&src))?;
    }
    fs::remove_dir_all(&dl).map_err(GuestError::io(&dl))?;
    Ok(())
}

/// Downloads the packages `specs` (`apt-get download`) into `dir`.
pub(crate) fn download(dir: &Path, specs: &[String]) -> Result<(), GuestError> {
    fs::create_dir_all(dir).map_err(GuestError::io(dir))?;
    run_output(
        Command::new("apt-get")
            .arg("download")
            .args(specs)
            .current_dir(dir),
    )?;
    Ok(())
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf, GuestError> {
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .map_err(GuestError::io(dir))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .ok_or_else(|| GuestError::Command {
            command: format!("apt-get download {package}"),
            detail: "no .deb arrived".into(),
        })
}

/// Returns the kernel package of `arch` that its cloud meta package currently depends on,
/// downloading and unpacking it (and its `-dbg` package, for System.map and vmlinux) if it is
/// not cached yet.
pub fn kernel_package(cache: &Path, arch: GuestArch) -> Result<KernelPackage, GuestError> {
    let root = cache.join("kernel");
    let meta = arch.apt_name(arch.kernel_meta_package());
    let resolved = resolve_meta(&meta).and_then(|pkg| {
        let ver = candidate_version(&arch.apt_name(&pkg))?;
        Ok((pkg, ver))
    });
    let (package, version) = match resolved {
        Ok(pv) => pv,
        Err(err) => {
            // Offline or no apt lists: fall back to what a previous run cached.
            let suffix = format!("-{}_", arch.debian());
            let Some(dir) = newest_cached(&root, "linux-image-", &suffix) else {
                return Err(err);
            };
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let (p, v) = name.split_once('_').unwrap_or((&name, ""));
            (p.to_string(), v.to_string())
        }
    };
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let dir = root.join(format!("{package}_{version}"));
    let kp = KernelPackage {
        package: package.clone(),
        version: version.clone(),
        release: release.clone(),
        dir: dir.clone(),
    };
    if dir.join(COMPLETE).exists() {
        add_missing_modules(&kp, arch)?;
        return Ok(kp);
    }

    let _ = fs::remove_dir_all(&dir);
    eprintln!(
        "hvprobe: fetching guest kernel {package} {version} and its -dbg package \
         (one time, a large download from the Debian mirror: a minute or more; cached in {})",
        root.display()
    );
    let dl = dir.join("deb");
    download(
        &dl,
        &[
            format!("{}={version}", arch.apt_name(&package)),
            format!("{}={version}", arch.apt_name(&format!("{package}-dbg"))),
        ],
    )?;
    let image = find_deb(&dl, &package)?;
    let dbg = find_deb(&dl, &format!("{package}-dbg"))?;

    let unpack = dir.join("unpack");
    fs::create_dir_all(&unpack).map_err(GuestError::io(&unpack))?;
    run_output(Command::new("dpkg-deb").arg("-x").arg(&image).arg(&unpack))?;
    sh(&format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' ./usr/lib/debug/boot/System.map-{release} ./usr/lib/debug/boot/vmlinux-{release}",
        dbg.display(),
        unpack.display()
    ))?;

    let moves = [
        (format!("boot/vmlinuz-{release}"), "vmlinuz".to_string()),
        (format!("boot/config-{release}"), "config".to_string()),
        (
            format!("usr/lib/debug/boot/System.map-{release}"),
            "System.map".to_string(),
        ),
        (
            format!("usr/lib/debug/boot/vmlinux-{release}"),
            "vmlinux".to_string(),
        ),
    ];
    let modules = dir.join("modules");
    fs::create_dir_all(&modules).map_err(GuestError::io(&modules))?;
    let module_moves = arch.l1_modules().iter().map(|m| {
        (
            format!("lib/modules/{release}/kernel/{m}"),
            format!("modules/{}", m.rsplit('/').next().unwrap()),
        )
    });
    for (from, to) in moves.into_iter().chain(module_moves) {
        let src = unpack.join(&from);
        let dst = dir.join(&to);
        fs::rename(&src, &dst).map_err(GuestError::io(&src))?;
    }
    fs::remove_dir_all(&unpack).map_err(GuestError::io(&unpack))?;
    fs::remove_dir_all(&dl).map_err(GuestError::io(&dl))?;
    let map_len = fs::metadata(kp.system_map())
        .map_err(GuestError::io(kp.system_map()))?
        .len();
    if map_len < 1024 {
        return Err(GuestError::Resolve {
            meta: format!("{package}-dbg"),
            detail: format!("System.map is only {map_len} bytes"),
        });
    }
    fs::write(dir.join(COMPLETE), &version).map_err(GuestError::io(&dir))?;
    Ok(kp)
}

/// Returns the path of a static busybox of `arch` from Debian's `busybox-static`, fetching it if
/// needed.
pub fn busybox(cache: &Path, arch: GuestArch) -> Result<PathBuf, GuestError> {
    let root = cache.join("busybox");
    let spec = arch.apt_name("busybox-static");
    // The x86_64 one keeps its original cache name.
    let prefix = match arch {
        GuestArch::X86_64 => "busybox-static_".to_string(),
        GuestArch::Aarch64 => format!("busybox-static-{}_", arch.debian()),
    };
    let dir = match candidate_version(&spec) {
        Ok(v) => root.join(format!("{prefix}{}", v.replace(':', "%3a"))),
        Err(err) => newest_cached(&root, &prefix, "").ok_or(err)?,
    };
    let bin = dir.join("busybox");
    if dir.join(COMPLETE).exists() {
        return Ok(bin);
    }
    let _ = fs::remove_dir_all(&dir);
    eprintln!(
        "hvprobe: fetching busybox-static ({}) for the guest's initramfs (one time, seconds)",
        arch.debian()
    );
    let dl = dir.join("deb");
    download(&dl, &[spec])?;
    let deb = find_deb(&dl, "busybox-static")?;
    let unpack = dir.join("unpack");
    run_output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack))?;
    let src = unpack.join("bin/busybox");
    fs::rename(&src, &bin).map_err(GuestError::io(&src))?;
    fs::remove_dir_all(&unpack).map_err(GuestError::io(&unpack))?;
    fs::remove_dir_all(&dl).map_err(GuestError::io(&dl))?;
    fs::write(dir.join(COMPLETE), b"").map_err(GuestError::io(&dir))?;
    Ok(bin)
}
