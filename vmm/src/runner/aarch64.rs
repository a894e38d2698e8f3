//! The arm64 emulated runner: QEMU's `virt` board with EL2 (`virtualization=on`) and a GICv3,
//! L1's console on the PL011, the inner run's streams, output and status on virtio-serial
//! ports. L1's `/init` is the static aarch64 build of hvprobe, on any host.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::io::Write;
use std::os::fd::AsRawFd;

use super::{
    L1Init, L1Side, MachineFiles, RunnerError, RunnerPlatform, STATUS_PREFIX, VPORT_OUTPUT,
    VPORT_STATUS, VPORT_STDERR, VPORT_STDIN, VPORT_STDOUT,
};

/// The arm64 runner.
pub static RUNNER: RunnerPlatform = RunnerPlatform {
    emulator,
    l1_init,
    default_cpu: "max",
    machine,
    output_port: VPORT_OUTPUT,
    status,
    l1: L1Side {
        relays: &[
            (VPORT_STDIN, &[0] as &[i32]),
            (VPORT_STDOUT, &[1]),
            (VPORT_STDERR, &[2]),
        ],
        ports_need_modules: true,
        modules: l1_modules,
        report_exit,
    },
};

/// `$HVPROBE_QEMU_AARCH64`, else `qemu-system-aarch64` on PATH (QEMU 10 from
/// bookworm-backports).
fn emulator() -> Result<String, RunnerError> {
    Ok(std::env::var("HVPROBE_QEMU_AARCH64").unwrap_or_else(|_| "qemu-system-aarch64".into()))
}

/// The arm64 L1 machine: TCG emulating EL2 (`virtualization=on`, `-cpu max` by default) with a GICv3, L1's console on
/// the PL011, the inner run's streams, output and status on virtio-serial ports (virtio-mmio).
fn machine(cmd: &mut Command, files: &MachineFiles<'_>) {
    let (console, trace_file, status) = (files.console, files.trace, files.status);
    // Appending: a redirected stdout or stderr keeps what hvprobe wrote before.
    let file_port = |nr: u32, id: &str, path: &str| {
        [
            "-chardev".to_string(),
            format!("file,id={id},path={path},append=on"),
            "-device".to_string(),
            format!("virtserialport,nr={nr},chardev={id},name=hvprobe.{id}"),
        ]
    };
    cmd.args(["-machine", "virt,virtualization=on,gic-version=3"])
        .args(["-accel", "tcg", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none"])
        .args([
            "-append",
            "console=ttyAMA0 nokaslr quiet loglevel=3 panic=-1 rdinit=/init",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-device", "virtio-serial-device"])
        .args(file_port(1, "stdout", "/proc/self/fd/1"))
        .args(file_port(2, "stderr", "/proc/self/fd/2"))
        .args(file_port(3, "output", trace_file.unwrap_or("/dev/null")))
        .args(file_port(
            4,
            "status",
            &status.display().to_string().replace(',', ",,"),
        ))
        .args(["-chardev", "stdio,id=stdin,signal=off"])
        .args([
            "-device",
            "virtserialport,nr=5,chardev=stdin,name=hvprobe.stdin",
        ]);
}

/// The inner run's status from the arm64 L1's status port.
fn status(_: std::process::ExitStatus, status_file: &Path) -> Option<i32> {
    let text = fs::read_to_string(status_file).ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix(STATUS_PREFIX))
        .and_then(|v| v.parse().ok())
}

/// The static aarch64 hvprobe that is the arm64 L1's `/init`, wherever hvprobe was started
/// from: `$HVPROBE_AARCH64_BIN`; else, when hvprobe runs from its source tree, the workspace's
/// cross build, brought up to date with cargo run in the workspace (so that its
/// `.cargo/config.toml`, the cross linker and `+crt-static`, applies whatever the caller's
/// directory) and copied to the cache; else `hvprobe-aarch64` next to this binary (a packaged
/// install), the cross build beside a `target/release` binary, or the cached copy.
fn l1_init() -> Result<L1Init, RunnerError> {
    aarch64_hvprobe().map(|exe| L1Init {
        exe,
        libs: Vec::new(),
    })
}

/// The static aarch64 hvprobe (see [`l1_init`]).
fn aarch64_hvprobe() -> Result<PathBuf, RunnerError> {
    if let Ok(p) = std::env::var("HVPROBE_AARCH64_BIN") {
        return Ok(PathBuf::from(p));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let cached = hvprobe_guest::cache_dir()
        .join("bin")
        .join(format!("hvprobe-aarch64-{}", env!("CARGO_PKG_VERSION")));
    if workspace.join(".cargo/config.toml").exists() {
        let built = build_aarch64_hvprobe(&workspace)?;
        // For an installed hvprobe of the same version, which has no source tree to build in;
        // copied only when the build is newer than the copy.
        let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        if modified(&cached) < modified(&built)
            && let Some(dir) = cached.parent()
            && fs::create_dir_all(dir).is_ok()
        {
            let _ = fs::copy(&built, &cached);
        }
        return Ok(built);
    }
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    let candidates = [
        dir.map(|d| d.join("hvprobe-aarch64")),
        dir.map(|d| d.join("../aarch64-unknown-linux-gnu/release/hvprobe")),
        Some(cached),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .ok_or_else(|| RunnerError::Prepare(AARCH64_MISSING.to_string()))
}

/// What to do when no aarch64 hvprobe can be found, in one line.
const AARCH64_MISSING: &str = "the arm64 runner needs the static aarch64 hvprobe: in hvprobe's source tree run `bash guest/setup-host.sh && cargo build --release --target aarch64-unknown-linux-gnu -p hvprobe-vmm`, then put target/aarch64-unknown-linux-gnu/release/hvprobe next to this binary as `hvprobe-aarch64` (or name it in $HVPROBE_AARCH64_BIN)";

/// Builds (or finds up to date) the workspace's static aarch64 hvprobe, with cargo run in the
/// workspace directory so that its cross-build configuration applies.
fn build_aarch64_hvprobe(workspace: &Path) -> Result<PathBuf, RunnerError> {
    let how = "cargo build --release --target aarch64-unknown-linux-gnu -p hvprobe-vmm";
    eprintln!("hvprobe: checking the aarch64 hvprobe for the arm64 runner ({how})");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            "aarch64-unknown-linux-gnu",
            "-p",
            "hvprobe-vmm",
            "--bin",
            "hvprobe",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status();
    let built = workspace.join("target/aarch64-unknown-linux-gnu/release/hvprobe");
    if out.is_ok_and(|s| s.success()) && built.is_file() {
        return Ok(built);
    }
    Err(RunnerError::Prepare(format!(
        "building the aarch64 hvprobe for the arm64 runner failed (`{how}` in {}; the cross toolchain comes from `bash guest/setup-host.sh`)",
        workspace.display()
    )))
}

/// The modules L1 loads, in order: the virtio console's (KVM is built in).
fn l1_modules() -> Vec<&'static str> {
    hvprobe_guest::GuestArch::Aarch64
        .l1_modules()
        .iter()
        .map(|m| m.rsplit('/').next().unwrap_or(m))
        .collect()
}

/// Writes the status line to the status port, which QEMU writes to a file the outer hvprobe
/// reads; L1 then powers off through PSCI.
fn report_exit(code: i32) {
    match crate::l1init::open_port(VPORT_STATUS) {
        Ok(mut f) => {
            let _ = writeln!(f, "{STATUS_PREFIX}{code}");
            let _ = f.flush();
            // SAFETY: fsync on an open fd; it waits until the port has passed the bytes on.
            unsafe { libc::fsync(f.as_raw_fd()) };
        }
        Err(e) => eprintln!("hvprobe-l1: {VPORT_STATUS}: {e}"),
    }
}
