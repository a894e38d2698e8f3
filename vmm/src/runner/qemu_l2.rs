//! QEMU as the L2 VMM inside the emulated runner, in hvprobe's place: the yardstick for
//! hvprobe's devices (`benches/disk.rs` compares virtio-blk throughput). Same L1, same guest
//! kernel and initramfs, same command line, same disk images, and the same transport: every
//! disk a virtio-blk device on virtio-mmio. x86_64: QEMU's `microvm` machine with ACPI, which
//! describes its virtio-mmio devices in the DSDT as hvprobe does, run from the host's own
//! `qemu-system-x86_64` and its shared libraries. arm64: the `virt` machine (virtio-mmio nodes
//! in its FDT), run from Debian's arm64 build of the same QEMU version with its libraries
//! ([`hvprobe_guest::qemu::arm64_qemu`]), since the host's QEMU is an x86_64 binary.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hvprobe_guest::GuestArch;

use super::RunnerError;
use crate::devices::virtio::DiskSpec;
use crate::job::Job;

/// QEMU's data directory in L1 (`-L`): the firmware of x86's `microvm` machine (qboot) and the
/// option ROM that loads a `-kernel`; on arm64 the shared libraries of the arm64 QEMU.
pub const L1_QEMU_DATA: &str = "/hvprobe/qemu";
/// The files x86's [`L1_QEMU_DATA`] holds.
const X86_DATA_FILES: &[&str] = &["bios-microvm.bin", "linuxboot_dma.bin"];

/// Where the QEMU binary for `arch` guests is, in L1 (and on an x86_64 host).
pub fn qemu_binary(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "/usr/bin/qemu-system-x86_64",
        GuestArch::Aarch64 => "/usr/bin/qemu-system-aarch64",
    }
}

/// One file L1 needs to run QEMU: its path on the host, its path in L1, its mode.
pub type L1File = (PathBuf, String, u32);

/// The host files L1 needs to run QEMU for `arch` guests, with their places in L1.
pub fn host_files(arch: GuestArch) -> Result<Vec<L1File>, RunnerError> {
    match arch {
        GuestArch::X86_64 => x86_host_files(),
        GuestArch::Aarch64 => arm64_host_files(),
    }
}

/// The host's `qemu-system-x86_64` with its shared libraries at their own paths, and the data
/// files in [`L1_QEMU_DATA`].
fn x86_host_files() -> Result<Vec<L1File>, RunnerError> {
    let qemu = qemu_binary(GuestArch::X86_64);
    if !Path::new(qemu).is_file() {
        return Err(RunnerError::Prepare(format!(
            "--l2-qemu needs {qemu} on the host (qemu-system-x86)"
        )));
    }
    let mut files = vec![PathBuf::from(qemu)];
    files.extend(super::l1image::shared_libraries(Path::new(qemu))?);
    let mut out: Vec<L1File> = files
        .into_iter()
        .map(|f| {
            let at = f.to_string_lossy().into_owned();
            (f, at, 0o755)
        })
        .collect();
    for name in X86_DATA_FILES {
        let f = ["/usr/share/qemu", "/usr/share/seabios"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| RunnerError::Prepare(format!("--l2-qemu needs QEMU's {name}")))?;
        out.push((f, format!("{L1_QEMU_DATA}/{name}"), 0o644));
    }
    Ok(out)
}

/// Debian's arm64 build of the host's QEMU version (the runner's own `qemu-system-arm`
/// package): the binary, its loader where the binary looks for it, and its libraries in
/// [`L1_QEMU_DATA`] (found through `LD_LIBRARY_PATH`).
fn arm64_host_files() -> Result<Vec<L1File>, RunnerError> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "qemu-system-arm"])
        .output()
        .map_err(|e| RunnerError::Prepare(format!("dpkg-query: {e}")))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() {
        return Err(RunnerError::Prepare(
            "--l2-qemu on arm64 takes the version of the host's qemu-system-arm package, which is not installed".into(),
        ));
    }
    let bundle = hvprobe_guest::qemu::arm64_qemu(&hvprobe_guest::cache_dir(), &version)
        .map_err(|e| RunnerError::Prepare(format!("--l2-qemu: {e}")))?;
    let mut out = vec![
        (
            bundle.binary.clone(),
            qemu_binary(GuestArch::Aarch64).to_string(),
            0o755,
        ),
        (
            bundle.loader.clone(),
            format!("/lib/{}", hvprobe_guest::qemu::ARM64_LOADER),
            0o755,
        ),
    ];
    for lib in &bundle.libraries {
        let name = lib.file_name().unwrap_or_default().to_string_lossy();
        out.push((lib.clone(), format!("{L1_QEMU_DATA}/{name}"), 0o755));
    }
    Ok(out)
}

/// The machine and CPU arguments for `arch`.
fn machine_args(arch: GuestArch) -> &'static [&'static str] {
    match arch {
        GuestArch::X86_64 => &["-M", "microvm,acpi=on", "-accel", "kvm", "-cpu", "host"],
        GuestArch::Aarch64 => &["-M", "virt,gic-version=3", "-accel", "kvm", "-cpu", "host"],
    }
}

/// The guest's command line under QEMU: hvprobe's, with what QEMU's machine needs instead.
/// x86's microvm has no keyboard controller for `reboot=k`: a triple fault resets it, and
/// `-no-reboot` makes that the end. arm64's `virt` has a PL011 UART, not an ns16550a.
fn qemu_cmdline(job: &Job) -> String {
    let cmdline = job.effective_cmdline();
    match job.guest_arch() {
        GuestArch::X86_64 => format!("{cmdline} reboot=t"),
        GuestArch::Aarch64 => cmdline.replacen("console=ttyS0", "console=ttyAMA0", 1),
    }
}

/// QEMU's arguments for `job` (its disks already L1's device nodes): the L2 guest's kernel
/// and initramfs as hvprobe would boot them, each disk a virtio-blk device on virtio-mmio
/// with the serial number the default guest's `/init` looks for, the console on stdio.
pub fn qemu_args(job: &Job, kernel: &Path, initrd: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = machine_args(job.guest_arch())
        .iter()
        .copied()
        .chain([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-L",
            L1_QEMU_DATA,
        ])
        .map(|s| s.to_string())
        .collect();
    args.extend([
        "-m".into(),
        job.memory.to_string(),
        "-smp".into(),
        job.vcpus.to_string(),
        "-kernel".into(),
        kernel.display().to_string(),
    ]);
    if let Some(initrd) = initrd {
        args.extend(["-initrd".into(), initrd.display().to_string()]);
    }
    args.extend(["-append".into(), qemu_cmdline(job)]);
    for (i, d) in job.disk.iter().enumerate() {
        let Ok(spec) = DiskSpec::parse(d) else {
            continue;
        };
        let path = spec.path.display().to_string().replace(',', ",,");
        let ro = if spec.read_only { "on" } else { "off" };
        args.extend([
            "-drive".into(),
            format!("file={path},if=none,id=hvdisk{i},format=raw,readonly={ro}"),
            "-device".into(),
            format!("virtio-blk-device,drive=hvdisk{i},serial=hv{i}-qemu"),
        ]);
    }
    args
}

/// Runs `job`'s guest under QEMU, its console on stdout, and returns the guest command's
/// status (from the default guest's marker line), or 125 when the guest ended without one.
pub fn run(job: &Job, kernel: &Path, initrd: Option<&Path>) -> Result<i32, RunnerError> {
    let qemu = qemu_binary(job.guest_arch());
    let mut child = Command::new(qemu)
        .args(qemu_args(job, kernel, initrd))
        .env("LD_LIBRARY_PATH", L1_QEMU_DATA)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| RunnerError::Prepare(format!("starting {qemu}: {e}")))?;
    let mut status = None;
    let pid = child.id();
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout();
        for line in BufReader::new(out).split(b'\n').map_while(Result::ok) {
            let text = String::from_utf8_lossy(&line);
            if let Some(s) = text
                .split(hvprobe_guest::EXIT_STATUS_MARKER)
                .nth(1)
                .and_then(|r| r.trim().parse().ok())
            {
                status = Some(s);
                // The guest resets next; a QEMU that does not end by itself is ended.
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_secs(10));
                    // SAFETY: kill(2) of our child's pid; at worst the process is gone.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                });
            }
            let _ = stdout.write_all(&line);
            let _ = stdout.write_all(b"\n");
        }
        let _ = stdout.flush();
    }
    let exit = child
        .wait()
        .map_err(|e| RunnerError::Prepare(format!("waiting for {qemu}: {e}")))?;
    match status {
        Some(s) => Ok(s),
        None => {
            eprintln!("hvprobe-l1: QEMU ended ({exit}) without the guest's exit status");
            Ok(crate::machine::EXIT_GUEST_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_boots_the_same_guest_with_each_disk_on_virtio_mmio() {
        let job = Job {
            arch: Some(GuestArch::X86_64),
            exec: Some("true".into()),
            disk: vec!["/dev/vdb".into(), "/dev/vdc,ro,at=/data".into()],
            vcpus: 2,
            ..Job::empty()
        };
        let args = qemu_args(
            &job,
            Path::new("/l2/vmlinuz"),
            Some(Path::new("/l2/initrd")),
        );
        let joined = args.join(" ");
        for want in [
            "-M microvm,acpi=on -accel kvm",
            "-m 512 -smp 2 -kernel /l2/vmlinuz -initrd /l2/initrd",
            "-drive file=/dev/vdb,if=none,id=hvdisk0,format=raw,readonly=off -device virtio-blk-device,drive=hvdisk0,serial=hv0-qemu",
            "file=/dev/vdc,if=none,id=hvdisk1,format=raw,readonly=on",
            "serial=hv1-qemu",
        ] {
            assert!(joined.contains(want), "{want} in {joined}");
        }
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert_eq!(append, &format!("{} reboot=t", job.effective_cmdline()));
        assert!(append.contains("hvprobe.mounts="));
    }

    #[test]
    fn an_arm64_guest_gets_the_virt_machine_and_its_pl011_console() {
        let job = Job {
            arch: Some(GuestArch::Aarch64),
            exec: Some("true".into()),
            disk: vec!["/dev/vdb".into()],
            ..Job::empty()
        };
        let args = qemu_args(&job, Path::new("/l2/vmlinuz"), None);
        let joined = args.join(" ");
        assert!(
            joined.starts_with("-M virt,gic-version=3 -accel kvm -cpu host"),
            "{joined}"
        );
        assert!(joined.contains("virtio-blk-device,drive=hvdisk0,serial=hv0-qemu"));
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.starts_with("console=ttyAMA0 "), "{append}");
        assert!(
            !append.contains("ttyS0") && !append.contains("reboot=t"),
            "{append}"
        );
    }
}
