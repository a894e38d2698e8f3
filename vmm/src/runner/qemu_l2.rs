//! QEMU as the L2 VMM inside the emulated runner, in hvprobe's place: the yardstick for
//! hvprobe's devices (`benches/disk.rs` compares virtio-blk throughput). Same L1, same guest
//! kernel and initramfs, same command line, same disk images; QEMU's `microvm` machine with
//! ACPI, which describes its virtio-mmio devices in the DSDT as hvprobe does, so the guest
//! drives the same transport with the same drivers. x86_64 only: L1 runs the host's own
//! `qemu-system-x86_64` with its shared libraries (an arm64 L1 would need an arm64 QEMU).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::RunnerError;
use crate::devices::virtio::DiskSpec;
use crate::job::Job;

/// Where the QEMU binary is, in L1 as on the host.
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// QEMU's data directory in L1 (`-L`): the firmware of its `microvm` machine (qboot) and the
/// option ROM that loads a `-kernel`.
pub const L1_QEMU_DATA: &str = "/hvprobe/qemu";
/// The files of [`L1_QEMU_DATA`].
const DATA_FILES: &[&str] = &["bios-microvm.bin", "linuxboot_dma.bin"];

/// The host files L1 needs to run QEMU: the binary with its shared libraries (at their own
/// paths), and the data files (for [`L1_QEMU_DATA`]).
pub fn host_files() -> Result<(Vec<PathBuf>, Vec<PathBuf>), RunnerError> {
    if !Path::new(QEMU).is_file() {
        return Err(RunnerError::Prepare(format!(
            "--l2-qemu needs {QEMU} on the host (qemu-system-x86)"
        )));
    }
    let mut files = vec![PathBuf::from(QEMU)];
    files.extend(super::l1image::shared_libraries(Path::new(QEMU))?);
    let data = DATA_FILES
        .iter()
        .map(|name| {
            ["/usr/share/qemu", "/usr/share/seabios"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| RunnerError::Prepare(format!("--l2-qemu needs QEMU's {name}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((files, data))
}

/// QEMU's arguments for `job` (its disks already L1's device nodes): the L2 guest's kernel
/// and initramfs as hvprobe would boot them, each disk a virtio-blk device on virtio-mmio
/// with the serial number the default guest's `/init` looks for, the console on stdio.
pub fn qemu_args(job: &Job, kernel: &Path, initrd: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "microvm,acpi=on",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-L",
        L1_QEMU_DATA,
    ]
    .iter()
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
    // microvm has no keyboard controller for `reboot=k`: a triple fault resets it, and
    // `-no-reboot` makes that the end.
    args.extend([
        "-append".into(),
        format!("{} reboot=t", job.effective_cmdline()),
    ]);
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
    let mut child = Command::new(QEMU)
        .args(qemu_args(job, kernel, initrd))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| RunnerError::Prepare(format!("starting {QEMU}: {e}")))?;
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
        .map_err(|e| RunnerError::Prepare(format!("waiting for {QEMU}: {e}")))?;
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
}
