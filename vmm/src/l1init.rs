//! hvprobe as `/init` of the emulated runner's L1 machine: mount the kernel file systems, load
//! the modules, connect the inner run's standard streams to the ports that carry them out, run
//! the inner job in-process, and report its exit status.
//!
//! x86_64 L1: KVM modules; the streams on serial ports in raw mode (`ttyS1`, `ttyS2`); the status
//! through QEMU's `isa-debug-exit` device. arm64 L1 (KVM built in): the virtio console
//! modules; the streams, the `-o` output and the status on virtio-serial ports (the virt board
//! has one UART and no debug-exit device); then PSCI SYSTEM_OFF.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;

use crate::runner::{L1_ARGS_PATH, L1_MODULES_DIR};

/// The port that carries the inner run's stdin and stdout.
#[cfg(target_arch = "x86_64")]
const RELAY_TTY: &str = "/dev/ttyS1";
/// The port that carries the inner run's stderr.
#[cfg(target_arch = "x86_64")]
const RELAY_ERR_TTY: &str = "/dev/ttyS2";

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = fs::create_dir_all(target);
    let (s, t, f) = (
        CString::new(source).unwrap_or_default(),
        CString::new(target).unwrap_or_default(),
        CString::new(fstype).unwrap_or_default(),
    );
    // SAFETY: all three are valid NUL-terminated strings that outlive the call; no data.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        eprintln!(
            "hvprobe-l1: mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn load_module(name: &str) -> Result<(), String> {
    let path = format!("{L1_MODULES_DIR}/{name}");
    let file = fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    let params = c"";
    // SAFETY: finit_module(2) with a valid open fd and an empty NUL-terminated parameter
    // string; the kernel only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    let err = std::io::Error::last_os_error();
    if rc != 0 && err.raw_os_error() != Some(libc::EEXIST) {
        return Err(format!("loading {name}: {err}"));
    }
    Ok(())
}

/// Opens `path` read-write, retrying for a few seconds: virtio ports appear once their driver
/// has probed, after the module load returned (ENOENT until then), and a port's device node
/// appears before the driver lists the port (ENXIO in between).
fn open_port(path: &str) -> std::io::Result<fs::File> {
    let mut tries = 0;
    loop {
        match fs::OpenOptions::new().read(true).write(true).open(path) {
            Err(e)
                if tries < 100
                    && matches!(e.raw_os_error(), Some(libc::ENXIO) | Some(libc::ENOENT)) =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Opens `path` as a raw tty and puts it on the standard descriptors `targets`.
fn relay_to_serial(path: &str, targets: &[i32]) -> Result<(), String> {
    let tty = open_port(path).map_err(|e| format!("{path}: {e}"))?;
    let fd = tty.as_raw_fd();
    crate::output::make_raw_if_tty(fd);
    for &target in targets {
        // SAFETY: dup2 of a valid open fd onto a standard descriptor.
        unsafe { libc::dup2(fd, target) };
    }
    Ok(())
}

/// The ports and the standard descriptors each goes on, in order.
#[cfg(target_arch = "x86_64")]
fn relays() -> [(&'static str, &'static [i32]); 2] {
    [(RELAY_TTY, &[0, 1, 2]), (RELAY_ERR_TTY, &[2])]
}

/// The ports and the standard descriptors each goes on, in order.
#[cfg(target_arch = "aarch64")]
fn relays() -> [(&'static str, &'static [i32]); 3] {
    use crate::runner::{VPORT_STDERR, VPORT_STDIN, VPORT_STDOUT};
    [
        (VPORT_STDIN, &[0]),
        (VPORT_STDOUT, &[1]),
        (VPORT_STDERR, &[2]),
    ]
}

/// Writes the status line to the status port, which QEMU writes to a file the outer hvprobe
/// reads.
#[cfg(target_arch = "aarch64")]
fn report_exit(code: i32) {
    match open_port(crate::runner::VPORT_STATUS) {
        Ok(mut f) => {
            let _ = writeln!(f, "{}{code}", crate::runner::STATUS_PREFIX);
            let _ = f.flush();
            // SAFETY: fsync on an open fd; it waits until the port has passed the bytes on.
            unsafe { libc::fsync(f.as_raw_fd()) };
        }
        Err(e) => eprintln!("hvprobe-l1: {}: {e}", crate::runner::VPORT_STATUS),
    }
}

/// The modules to load, in order.
#[cfg(target_arch = "aarch64")]
fn modules() -> Vec<&'static str> {
    hvprobe_guest::GuestArch::Aarch64
        .l1_modules()
        .iter()
        .map(|m| m.rsplit('/').next().unwrap_or(m))
        .collect()
}

/// The modules to load, in order: KVM for this CPU's vendor.
#[cfg(target_arch = "x86_64")]
fn modules() -> Vec<&'static str> {
    let vendor_module = if crate::hostcheck::cpu_flag("vmx") {
        "kvm-intel.ko"
    } else {
        "kvm-amd.ko"
    };
    vec!["irqbypass.ko", "kvm.ko", vendor_module]
}

/// Writes `code + 1` to the `isa-debug-exit` port; QEMU then exits with `2 * (code + 1) + 1`.
/// The offset keeps every report apart from QEMU's own failure status 1.
#[cfg(target_arch = "x86_64")]
fn report_exit(code: i32) {
    use crate::runner::DEBUG_EXIT_PORT;
    let value = code.clamp(0, 126) as u32 + 1;
    // SAFETY: as PID 1 in L1 we hold CAP_SYS_RAWIO; ioperm grants this process access to the
    // one port of QEMU's isa-debug-exit device, and the `out` only writes that port.
    unsafe {
        if libc::ioperm(u64::from(DEBUG_EXIT_PORT), 4, 1) == 0 {
            std::arch::asm!("out dx, eax", in("dx") DEBUG_EXIT_PORT, in("eax") value, options(nostack, preserves_flags));
        }
    }
}

/// Runs as PID 1 of L1 and never returns.
pub fn main() -> ! {
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("tmpfs", "/tmp", "tmpfs");

    let relay = || {
        for (tty, targets) in relays() {
            if let Err(e) = relay_to_serial(tty, targets) {
                eprintln!("hvprobe-l1: {e}");
            }
        }
    };
    // The serial ports exist from boot; the virtio ports once their modules are loaded.
    let ports_need_modules = cfg!(target_arch = "aarch64");
    if !ports_need_modules {
        relay();
    }
    let mut code = 0;
    for m in modules() {
        if let Err(e) = load_module(m) {
            eprintln!("hvprobe-l1: {e}");
            code = crate::cli::EXIT_HOST_UNUSABLE;
        }
    }
    if ports_need_modules {
        relay();
    }
    if code == 0 {
        code = match fs::read(L1_ARGS_PATH) {
            Ok(raw) => {
                let args: Vec<String> = raw
                    .split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                crate::cli::main_with_args(args)
            }
            Err(e) => {
                eprintln!("hvprobe-l1: {L1_ARGS_PATH}: {e}");
                1
            }
        };
    }
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: tcdrain on the standard descriptors waits until the UARTs have sent everything.
    unsafe {
        libc::tcdrain(1);
        libc::tcdrain(2);
    }
    report_exit(code);
    // SAFETY: reboot(2) as PID 1: PSCI SYSTEM_OFF on arm64 (QEMU exits); on x86_64 reached only
    // if the debug-exit device is missing.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    loop {
        std::thread::park();
    }
}
