//! The x86_64 emulated runner: QEMU's TCG with SVM (the project's patched QEMU, which
//! delivers a nested guest's int3), the inner run's streams on serial ports, its status
//! through `isa-debug-exit`. It runs on x86_64 hosts only: L1's `/init` is this very binary.

use std::path::Path;
use std::process::Command;

use hvprobe_guest::GuestArch;

use super::l1image::shared_libraries;
use super::{
    DEBUG_EXIT_PORT, L1Init, L1Side, MachineFiles, RunnerError, RunnerPlatform, disk_args, prep_err,
};

/// The x86_64 runner.
pub static RUNNER: RunnerPlatform = RunnerPlatform {
    emulator,
    l1_init,
    default_cpu: "EPYC",
    machine,
    // The fourth `-serial`, the first three being L1's console and the inner stdout and stderr.
    output_port: "/dev/ttyS3",
    status,
    l1: L1Side {
        // The inner run's stdin and stdout on ttyS1, its stderr on ttyS2 (raw mode).
        relays: &[("/dev/ttyS1", &[0, 1, 2] as &[i32]), ("/dev/ttyS2", &[2])],
        ports_need_modules: false,
        modules: l1_modules,
        report_exit,
        // The one port of L1's virtio-serial PCI device.
        api_port: "/dev/vport0p1",
    },
};

/// Where Debian installs the firmware QEMU loads (SeaBIOS, option ROMs).
const FIRMWARE_DIRS: [&str; 3] = [
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/lib/ipxe/qemu",
];

/// The emulator binary: `$HVPROBE_QEMU`, else the project's patched QEMU (built and cached on
/// first use, see `guest/qemu/`), else the stock `qemu-system-x86_64` on PATH, with which int3
/// probes are unavailable (the trap self-test inside L1 then says so).
fn emulator() -> Result<String, RunnerError> {
    if GuestArch::host() != GuestArch::X86_64 {
        return Err(RunnerError::Prepare(format!(
            "an x86_64 guest on this {} host: the emulated x86_64 runner runs on x86_64 hosts only",
            GuestArch::host()
        )));
    }
    if let Ok(q) = std::env::var("HVPROBE_QEMU") {
        return Ok(q);
    }
    Ok(match hvprobe_guest::qemu::patched_qemu() {
        Ok(p) => p.display().to_string(),
        Err(e) => {
            eprintln!(
                "hvprobe: cannot build the runner's patched QEMU ({e}); using the stock qemu-system-x86_64, which does not deliver int3 exits to nested guests"
            );
            "qemu-system-x86_64".to_string()
        }
    })
}

/// L1's `/init`: this binary, with the shared libraries it links.
fn l1_init() -> Result<L1Init, RunnerError> {
    let exe = std::env::current_exe().map_err(prep_err("locating the hvprobe binary"))?;
    let libs = shared_libraries(&exe)?;
    Ok(L1Init { exe, libs })
}

/// The x86_64 L1 machine: TCG with SVM (`-cpu EPYC` by default), the console and the inner run's streams
/// on serial ports, the status through `isa-debug-exit`.
fn machine(cmd: &mut Command, files: &MachineFiles<'_>) {
    let (console, trace_file) = (files.console, files.trace);
    cmd.args(["-accel", "tcg", "-nodefaults", "-no-reboot"])
        // Debian's firmware, for a QEMU built from source (guest/qemu/build.sh).
        .args(FIRMWARE_DIRS.iter().flat_map(|d| ["-L", d]))
        .args(["-display", "none", "-monitor", "none"])
        .args([
            "-append",
            "console=ttyS0 nokaslr quiet loglevel=3 panic=-1 rdinit=/init",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-serial", "stdio"])
        // The inner run's stderr: QEMU's own stderr, which is a pipe read by the caller.
        .args(["-serial", "file:/proc/self/fd/2"])
        .args(
            trace_file
                .iter()
                .flat_map(|f| ["-serial".to_string(), format!("file:{f}")]),
        )
        .args([
            "-device",
            &format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04"),
        ]);
    for (i, (path, ro)) in files.disks.iter().enumerate() {
        cmd.args(disk_args("virtio-blk-pci", i, path, *ro));
    }
    if let Some(api) = files.api {
        cmd.args(["-device", "virtio-serial-pci,id=vser"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=api,path={},server=on,wait=off",
                api.display().to_string().replace(',', ",,")
            ))
            .args([
                "-device",
                "virtserialport,bus=vser.0,nr=1,chardev=api,name=hvprobe.api",
            ]);
    }
}

/// The inner run's status from the x86_64 L1's exit: L1 reports status s as s + 1, which QEMU
/// turns into 2(s + 1) + 1; anything else means L1 died without reporting.
fn status(status: std::process::ExitStatus, _: &Path) -> Option<i32> {
    match status.code() {
        Some(code) if code % 2 == 1 && code >= 3 => Some((code - 3) / 2),
        _ => None,
    }
}

/// The modules L1 loads, in order: KVM for this CPU's vendor, and the virtio console (the
/// API port) and block device (`--disk`) over PCI.
fn l1_modules() -> Vec<&'static str> {
    let vendor_module = if crate::hostcheck::cpu_flag("vmx") {
        "kvm-intel.ko"
    } else {
        "kvm-amd.ko"
    };
    vec![
        "irqbypass.ko",
        "kvm.ko",
        vendor_module,
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_pci_legacy_dev.ko",
        "virtio_pci_modern_dev.ko",
        "virtio_pci.ko",
        "virtio_console.ko",
        "virtio_blk.ko",
    ]
}

/// Writes `code + 1` to the `isa-debug-exit` port; QEMU then exits with `2 * (code + 1) + 1`.
/// The offset keeps every report apart from QEMU's own failure status 1.
fn report_exit(code: i32) {
    #[cfg(target_arch = "x86_64")]
    {
        let value = code.clamp(0, 126) as u32 + 1;
        // SAFETY: as PID 1 in L1 we hold CAP_SYS_RAWIO; ioperm grants this process access to
        // the one port of QEMU's isa-debug-exit device, and the `out` only writes that port.
        unsafe {
            if libc::ioperm(u64::from(DEBUG_EXIT_PORT), 4, 1) == 0 {
                std::arch::asm!("out dx, eax", in("dx") DEBUG_EXIT_PORT, in("eax") value, options(nostack, preserves_flags));
            }
        }
    }
    // An x86_64 L1 runs the x86_64 build only.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = code;
}
