//! The arm64 emulated runner: QEMU's `virt` board with EL2 (`virtualization=on`) and a GICv3,
//! L1's console on the PL011, the inner run's streams, output and status on virtio-serial
//! ports. L1's `/init` is the static aarch64 build of hvprobe, on any host.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::io::Write;
use std::os::fd::AsRawFd;

use super::{
    L1Init, L1Side, MachineFiles, RunnerError, RunnerPlatform, STATUS_PREFIX, VPORT_OUTPUT,
    VPORT_STATUS, VPORT_STDERR, VPORT_STDIN, VPORT_STDOUT, disk_args,
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
        api_port: "/dev/vport0p6",
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
    for (i, (path, ro)) in files.disks.iter().enumerate() {
        cmd.args(disk_args("virtio-blk-device", i, path, *ro));
    }
    if let Some(api) = files.api {
        cmd.arg("-chardev")
            .arg(format!(
                "socket,id=api,path={},server=on,wait=off",
                api.display().to_string().replace(',', ",,")
            ))
            .args([
                "-device",
                "virtserialport,nr=6,chardev=api,name=hvprobe.api",
            ]);
    }
}

/// The inner run's status from the arm64 L1's status port.
fn status(_: std::process::ExitStatus, status_file: &Path) -> Option<i32> {
    let text = fs::read_to_string(status_file).ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix(STATUS_PREFIX))
        .and_then(|v| v.parse().ok())
}

/// The static aarch64 hvprobe that is the arm64 L1's `/init`, built from the same sources as
/// this hvprobe (its version string carries the fingerprint, [`crate::cli::VERSION`]):
/// `$HVPROBE_AARCH64_BIN` as given; else the workspace's cross build (`cargo build --release
/// --target aarch64-unknown-linux-gnu -p hvprobe-vmm`, a step of the README's commands, never
/// run by hvprobe itself), `hvprobe-aarch64` next to this binary (a packaged install), the
/// cross build beside a `target/` binary, or the copy cached by fingerprint. One that was
/// built from other sources is refused by name.
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
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    let cached = hvprobe_guest::cache_dir()
        .join("bin")
        .join(format!("hvprobe-aarch64-{}", env!("HVPROBE_SOURCE_HASH")));
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    let candidates = [
        workspace.map(|w| w.join(CROSS_BUILD)),
        dir.map(|d| d.join("hvprobe-aarch64")),
        dir.map(|d| d.join("..").join(CROSS_BUILD.trim_start_matches("target/"))),
        Some(cached.clone()),
    ];
    let mut other_sources: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for path in candidates.into_iter().flatten().filter(|p| p.is_file()) {
        // One file reached two ways (the workspace's, and beside `target/release`) once.
        if !seen.insert(fs::canonicalize(&path).unwrap_or_else(|_| path.clone())) {
            continue;
        }
        if built_from_these_sources(&path) {
            // For an installed hvprobe of the same sources, which has no cross build beside it.
            if path != cached
                && !cached.is_file()
                && let Some(d) = cached.parent()
                && fs::create_dir_all(d).is_ok()
            {
                let _ = fs::copy(&path, &cached);
                prune_cached_copies(d);
            }
            return Ok(path);
        }
        other_sources.push(path.display().to_string());
    }
    Err(RunnerError::Prepare(if other_sources.is_empty() {
        AARCH64_MISSING.to_string()
    } else {
        format!(
            "the aarch64 hvprobe ({}) was built from other sources than this hvprobe ({}): run `{BUILD_AARCH64}` in hvprobe's source tree",
            other_sources.join(", "),
            env!("HVPROBE_SOURCE_HASH")
        )
    }))
}

/// Cached copies kept, newest first: this build's and those of a few other checkouts that may
/// share the cache (a CI clone beside a work tree); every source change makes a new one.
const CACHED_COPIES_KEPT: usize = 3;

/// Removes all but the [`CACHED_COPIES_KEPT`] newest cached aarch64 hvprobes in `dir`.
fn prune_cached_copies(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let copies = entries.flatten().filter_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let modified = e.metadata().and_then(|m| m.modified()).ok()?;
        name.starts_with("hvprobe-aarch64-")
            .then(|| (modified, e.path()))
    });
    for path in stale_copies(copies.collect(), CACHED_COPIES_KEPT) {
        let _ = fs::remove_file(path);
    }
}

/// Of `copies` (modification time, path), those past the `keep` newest.
fn stale_copies(mut copies: Vec<(std::time::SystemTime, PathBuf)>, keep: usize) -> Vec<PathBuf> {
    copies.sort_by_key(|c| std::cmp::Reverse(c.0));
    copies.into_iter().skip(keep).map(|(_, p)| p).collect()
}

/// Where cargo puts the cross build, under the target directory.
const CROSS_BUILD: &str = "target/aarch64-unknown-linux-gnu/release/hvprobe";

/// The command that makes the cross build.
const BUILD_AARCH64: &str =
    "cargo build --release --target aarch64-unknown-linux-gnu -p hvprobe-vmm";

/// Whether the binary at `path` carries this build's source fingerprint (in its version
/// string).
fn built_from_these_sources(path: &Path) -> bool {
    let mark = format!("(sources {})", env!("HVPROBE_SOURCE_HASH"));
    fs::read(path).is_ok_and(|bytes| bytes.windows(mark.len()).any(|w| w == mark.as_bytes()))
}

/// What to do when no aarch64 hvprobe can be found, in one line.
const AARCH64_MISSING: &str = "the arm64 runner needs the static aarch64 hvprobe: in hvprobe's source tree run `bash guest/setup-host.sh && cargo build --release --target aarch64-unknown-linux-gnu -p hvprobe-vmm`, then put target/aarch64-unknown-linux-gnu/release/hvprobe next to this binary as `hvprobe-aarch64` (or name it in $HVPROBE_AARCH64_BIN)";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_cached_copies_are_kept() {
        let t = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
        let copies = vec![
            (t(30), PathBuf::from("c")),
            (t(10), PathBuf::from("a")),
            (t(40), PathBuf::from("d")),
            (t(20), PathBuf::from("b")),
        ];
        assert_eq!(stale_copies(copies.clone(), 3), [PathBuf::from("a")]);
        assert_eq!(stale_copies(copies, 1), ["c", "b", "a"].map(PathBuf::from));
        assert!(stale_copies(Vec::new(), 3).is_empty());
    }

    #[test]
    fn a_cross_build_counts_only_with_this_builds_source_fingerprint() {
        let dir = std::env::temp_dir().join(format!("hvprobe-fingerprint-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let current = dir.join("current");
        let stale = dir.join("stale");
        let mut bytes = b"\x7fELF...".to_vec();
        bytes.extend_from_slice(crate::cli::VERSION.as_bytes());
        fs::write(&current, &bytes).unwrap();
        fs::write(&stale, b"\x7fELF... 0.1.0 (sources 0123456789abcdef)").unwrap();
        assert!(built_from_these_sources(&current));
        assert!(!built_from_these_sources(&stale));
        assert!(!built_from_these_sources(&dir.join("missing")));
        fs::remove_dir_all(&dir).unwrap();
    }
}
