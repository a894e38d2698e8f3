//! The guests hvprobe boots: a stock Debian cloud kernel and an initramfs of `busybox-static`
//! plus the project's own small static workload programs.
//!
//! Everything is fetched from Debian's archive with `apt-get download` on first use and cached
//! under [`cache_dir`], keyed by package version, so the second run costs nothing. The kernel
//! version is resolved from the `linux-image-cloud-amd64` (or `-arm64`) meta package each time
//! the archive answers, never hard-coded. Guests of both architectures are built on any host:
//! arm64 packages through dpkg's foreign architecture, the workloads with the cross compiler.

pub mod cpio;
pub mod debian;
pub mod qemu;
pub mod rootfs;

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use debian::KernelPackage;

/// Errors while fetching or building a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A command the build needs failed or is missing.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line that failed.
        command: String,
        /// Its exit status or the reason it could not start, and the end of its stderr.
        detail: String,
    },
    /// The Debian archive could not tell which kernel package is current, and nothing is cached.
    #[error(
        "cannot resolve the kernel package from `{meta}` ({detail}); run `apt-get update` or `bash guest/setup-host.sh`"
    )]
    Resolve {
        /// The meta package that was asked.
        meta: String,
        /// What went wrong.
        detail: String,
    },
    /// The Debian root file system cannot be built here.
    #[error("{0}")]
    Rootfs(String),
    /// A file or directory operation on the cache failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl GuestError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> GuestError {
        let path = path.into();
        move |source| GuestError::Io { path, source }
    }
}

/// The architecture of a guest: the project's one name for an architecture (on the command
/// line, `--arch x86_64|amd64|aarch64|arm64`; in JSON, `x86_64`/`aarch64`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum GuestArch {
    /// x86_64 (Debian's amd64).
    #[value(name = "x86_64", alias = "amd64")]
    #[serde(rename = "x86_64")]
    X86_64,
    /// aarch64 (Debian's arm64).
    #[value(name = "aarch64", alias = "arm64")]
    #[serde(rename = "aarch64")]
    Aarch64,
}

impl GuestArch {
    /// The architecture this program runs on.
    pub fn host() -> GuestArch {
        if cfg!(target_arch = "aarch64") {
            GuestArch::Aarch64
        } else {
            GuestArch::X86_64
        }
    }

    /// The Rust/kernel name (`x86_64`, `aarch64`).
    pub fn name(self) -> &'static str {
        match self {
            GuestArch::X86_64 => "x86_64",
            GuestArch::Aarch64 => "aarch64",
        }
    }

    /// Debian's name (`amd64`, `arm64`).
    pub fn debian(self) -> &'static str {
        match self {
            GuestArch::X86_64 => "amd64",
            GuestArch::Aarch64 => "arm64",
        }
    }

    /// The Debian meta package whose dependency names the current cloud kernel.
    pub fn kernel_meta_package(self) -> &'static str {
        match self {
            GuestArch::X86_64 => KERNEL_META_PACKAGE,
            GuestArch::Aarch64 => "linux-image-cloud-arm64",
        }
    }

    /// The C compiler that builds static programs for this architecture.
    pub fn c_compiler(self) -> &'static str {
        match (self, GuestArch::host()) {
            (a, h) if a == h => "gcc",
            (GuestArch::Aarch64, _) => "aarch64-linux-gnu-gcc",
            (GuestArch::X86_64, _) => "x86_64-linux-gnu-gcc",
        }
    }

    /// The modules kept from the kernel package for its use as the emulated runner's L1
    /// kernel, relative to `lib/modules/<release>/kernel`, in load order: KVM on x86_64 (a
    /// module there); on arm64 KVM is built in and L1 needs the virtio console instead, which
    /// carries the inner run's output.
    pub fn l1_modules(self) -> &'static [&'static str] {
        match self {
            GuestArch::X86_64 => debian::KVM_MODULES,
            GuestArch::Aarch64 => debian::ARM64_L1_MODULES,
        }
    }

    /// `package` as apt names it for this architecture (`busybox-static:arm64` on a host of
    /// another architecture).
    pub fn apt_name(self, package: &str) -> String {
        if self == GuestArch::host() {
            package.to_string()
        } else {
            format!("{package}:{}", self.debian())
        }
    }
}

impl std::fmt::Display for GuestArch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The default guest: a Debian cloud kernel and the hvprobe initramfs.
#[derive(Clone, Debug)]
pub struct DefaultGuest {
    /// The kernel package, with its bzImage, System.map, vmlinux and KVM modules.
    pub kernel: KernelPackage,
    /// The initramfs (uncompressed cpio) with busybox, `/init` and the workloads.
    pub initrd: PathBuf,
}

/// Name of the Debian meta package whose dependency names the current x86_64 cloud kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// The workload programs built into the default guest, as (name, C source).
pub const WORKLOADS: &[(&str, &str)] = &[
    ("getpid-loop", include_str!("../workloads/getpid-loop.c")),
    (
        "open-read-loop",
        include_str!("../workloads/open-read-loop.c"),
    ),
    (
        "fork-exec-loop",
        include_str!("../workloads/fork-exec-loop.c"),
    ),
    (
        "bad-pointer-loop",
        include_str!("../workloads/bad-pointer-loop.c"),
    ),
    ("debug-loop", include_str!("../workloads/debug-loop.c")),
    ("exit-loop", include_str!("../workloads/exit-loop.c")),
    ("write-loop", include_str!("../workloads/write-loop.c")),
    ("blk-bench", include_str!("../workloads/blk-bench.c")),
];

/// The default guest's `/init`.
pub const INIT_SCRIPT: &str = include_str!("../init.sh");

/// Marker line the default guest's `/init` prints as soon as it runs.
pub const INIT_READY_MARKER: &str = "HVPROBE-INIT-READY";

/// Prefix of the marker line carrying the guest command's exit status.
pub const EXIT_STATUS_MARKER: &str = "HVPROBE-EXIT-STATUS=";

/// Kernel command-line key carrying the base64-encoded command for `/init` to run.
pub const EXEC_PARAM: &str = "hvprobe.exec";
/// Kernel parameter that makes `/init` wait, after its ready marker, for one line on the
/// console before it runs the command (the VMM sends it once the probes are planted).
pub const WAIT_PARAM: &str = "hvprobe.wait=1";

/// Kernel command-line key carrying, base64-encoded, the disks `/init` mounts before the
/// command runs: a line `INDEX ro|rw GUESTPATH` each, the disk found by its serial number
/// (`hv<INDEX>-...`); `/init` loads [`DISK_MODULES`] first.
pub const MOUNTS_PARAM: &str = "hvprobe.mounts";

/// The modules the default guest's `/init` loads for a disk, in load order: Debian's cloud
/// kernels build virtio, virtio-mmio and virtio-blk as modules. In the initramfs under
/// `lib/modules/`.
pub const DISK_MODULES: &[&str] = &[
    "virtio_ring.ko",
    "virtio.ko",
    "virtio_mmio.ko",
    "virtio_blk.ko",
];

/// The modules `/init` loads before it hands over to a root file system's systemd
/// (`--rootfs`): autofs and binfmt_misc, which systemd mounts automount points for. In the
/// initramfs under `lib/modules/`.
pub const ROOT_MODULES: &[&str] = &["autofs4.ko", "binfmt_misc.ko"];

/// Where downloads and built images are kept: `$HVPROBE_CACHE`, else
/// `$XDG_CACHE_HOME/hvprobe`, else `~/.cache/hvprobe`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HVPROBE_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("hvprobe");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/hvprobe")
}

/// Holds an exclusive lock on the cache so that concurrent runs do not build the same thing
/// twice or read a half-written file.
pub struct CacheLock {
    _file: File,
}

/// Takes the cache lock, creating the cache directory if needed.
pub fn lock_cache(cache: &Path) -> Result<CacheLock, GuestError> {
    fs::create_dir_all(cache).map_err(GuestError::io(cache))?;
    let path = cache.join(".lock");
    let file = File::create(&path).map_err(GuestError::io(&path))?;
    file.lock().map_err(GuestError::io(&path))?;
    Ok(CacheLock { _file: file })
}

/// Runs a command and returns its stdout, or a [`GuestError::Command`] with its stderr.
pub(crate) fn run_output(cmd: &mut Command) -> Result<Vec<u8>, GuestError> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| GuestError::Command {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(GuestError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            ),
        });
    }
    Ok(out.stdout)
}

/// Returns the default guest of the host's architecture, fetching and building whatever is not
/// cached yet.
pub fn default_guest() -> Result<DefaultGuest, GuestError> {
    default_guest_for(GuestArch::host())
}

/// Returns the default guest of `arch`, fetching and building whatever is not cached yet.
pub fn default_guest_for(arch: GuestArch) -> Result<DefaultGuest, GuestError> {
    let cache = cache_dir();
    let _lock = lock_cache(&cache)?;
    let kernel = debian::kernel_package(&cache, arch)?;
    let busybox = debian::busybox(&cache, arch)?;
    let initrd = build_initrd(&cache, &busybox, &kernel, arch)?;
    Ok(DefaultGuest { kernel, initrd })
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xff]) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Compiles the workload programs for `arch` (static, the guest's compiler) in `work`:
/// (name, executable) each.
pub(crate) fn compile_workloads(
    arch: GuestArch,
    work: &Path,
) -> Result<Vec<(&'static str, Vec<u8>)>, GuestError> {
    fs::create_dir_all(work).map_err(GuestError::io(work))?;
    let mut programs = Vec::new();
    for (name, src) in WORKLOADS {
        let c = work.join(format!("{name}.c"));
        fs::write(&c, src).map_err(GuestError::io(&c))?;
        let bin = work.join(name);
        run_output(
            Command::new(arch.c_compiler())
                .args(["-static", "-O2", "-Wall", "-o"])
                .arg(&bin)
                .arg(&c),
        )?;
        let bytes = fs::read(&bin).map_err(GuestError::io(&bin))?;
        programs.push((*name, bytes));
    }
    Ok(programs)
}

/// Builds (or finds cached) the initramfs from busybox, `/init`, the workloads and the
/// kernel's disk modules.
fn build_initrd(
    cache: &Path,
    busybox: &Path,
    kernel: &KernelPackage,
    arch: GuestArch,
) -> Result<PathBuf, GuestError> {
    let busybox_bytes = fs::read(busybox).map_err(GuestError::io(busybox))?;
    let modules = DISK_MODULES
        .iter()
        .chain(ROOT_MODULES)
        .map(|m| {
            let p = kernel.module(m);
            fs::read(&p).map(|b| (*m, b)).map_err(GuestError::io(&p))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut parts: Vec<&[u8]> = vec![
        &busybox_bytes,
        INIT_SCRIPT.as_bytes(),
        arch.name().as_bytes(),
    ];
    for (name, bytes) in &modules {
        parts.push(name.as_bytes());
        parts.push(bytes);
    }
    for (name, src) in WORKLOADS {
        parts.push(name.as_bytes());
        parts.push(src.as_bytes());
    }
    let key = fnv1a(&parts);
    let dir = cache.join("initrd");
    let out = dir.join(format!("hvprobe-guest-{}-{key:016x}.cpio", arch.name()));
    if out.exists() {
        return Ok(out);
    }
    fs::create_dir_all(&dir).map_err(GuestError::io(&dir))?;
    let work = dir.join(format!("build-{key:016x}"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(GuestError::io(&work))?;

    eprintln!(
        "hvprobe: building the {} guest initramfs (busybox and {} workload programs, about 10 seconds; cached in {})",
        arch.name(),
        WORKLOADS.len(),
        dir.display()
    );
    let programs = compile_workloads(arch, &work)?;
    // A foreign busybox lists its applets under user-mode emulation (qemu-user).
    let applets = if arch == GuestArch::host() {
        run_output(Command::new(busybox).arg("--list-full"))?
    } else {
        run_output(
            Command::new(format!("qemu-{}", arch.name()))
                .arg(busybox)
                .arg("--list-full"),
        )?
    };
    let applets = String::from_utf8_lossy(&applets).into_owned();

    let tmp = out.with_extension("tmp");
    let file = File::create(&tmp).map_err(GuestError::io(&tmp))?;
    let write = || -> io::Result<()> {
        let mut w = cpio::CpioWriter::new(BufWriter::new(file));
        for d in [
            "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc",
            "root", "run", "mnt",
        ] {
            w.dir(d)?;
        }
        w.char_dev("dev/console", 5, 1)?;
        w.char_dev("dev/null", 1, 3)?;
        w.file("bin/busybox", 0o755, &busybox_bytes)?;
        for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
            if applet == "bin/busybox" {
                continue;
            }
            let depth = applet.matches('/').count();
            let target = format!("{}bin/busybox", "../".repeat(depth));
            w.symlink(applet, &target)?;
        }
        for (name, bytes) in &programs {
            w.file(&format!("bin/{name}"), 0o755, bytes)?;
        }
        w.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
        w.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
        for d in ["lib", "lib/modules"] {
            w.dir(d)?;
        }
        for (name, bytes) in &modules {
            w.file(&format!("lib/modules/{name}"), 0o644, bytes)?;
        }
        w.finish()?;
        Ok(())
    };
    write().map_err(GuestError::io(&tmp))?;
    fs::rename(&tmp, &out).map_err(GuestError::io(&out))?;
    let _ = fs::remove_dir_all(&work);
    Ok(out)
}
