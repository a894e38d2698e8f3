//! hvprobe as `/init` of the emulated runner's L1 machine: mount the kernel file systems, load
//! the modules, connect the inner run's standard streams to the ports that carry them out, run
//! the inner job in-process, and report its exit status.
//!
//! What differs per architecture (the ports, the modules, how the status goes out) is the
//! runner's [`crate::runner::L1Side`] of this L1's architecture.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::platform::platform;
use crate::runner::{L1_ARGS_PATH, L1_MODULES_DIR};

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
pub(crate) fn open_port(path: &str) -> std::io::Result<fs::File> {
    let mut tries = 0;
    loop {
        let path = port_node(path, Path::new("/dev"));
        match fs::OpenOptions::new().read(true).write(true).open(&path) {
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

/// The node of virtio-serial port `path` (`/dev/vportDpN`) as it is in `dev`: port N of
/// whichever virtio device the console is. Its index D follows the order the virtio devices
/// were found in, which a `--disk` beside it can change; there is one console device.
pub(crate) fn port_node(path: &str, dev: &Path) -> PathBuf {
    let Some(port) = path
        .strip_prefix("/dev/vport")
        .and_then(|rest| rest.split_once('p'))
        .map(|(_, n)| format!("p{n}"))
    else {
        return PathBuf::from(path);
    };
    let found: Vec<PathBuf> = fs::read_dir(dev)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("vport")
                .and_then(|r| r.strip_suffix(&port))
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect();
    match found.as_slice() {
        [one] => one.clone(),
        _ => PathBuf::from(path),
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

/// Runs as PID 1 of L1 and never returns.
pub fn main() -> ! {
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("tmpfs", "/tmp", "tmpfs");

    let l1 = &platform(hvprobe_guest::GuestArch::host()).runner.l1;
    let relay = || {
        for &(tty, targets) in l1.relays {
            if let Err(e) = relay_to_serial(tty, targets) {
                eprintln!("hvprobe-l1: {e}");
            }
        }
    };
    // Serial ports exist from boot; virtio ports once their modules are loaded.
    if !l1.ports_need_modules {
        relay();
    }
    let mut code = 0;
    for m in (l1.modules)() {
        if let Err(e) = load_module(m) {
            eprintln!("hvprobe-l1: {e}");
            code = crate::cli::EXIT_HOST_UNUSABLE;
        }
    }
    if l1.ports_need_modules {
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
    (l1.report_exit)(code);
    // SAFETY: reboot(2) as PID 1: PSCI SYSTEM_OFF on arm64 (QEMU exits); on x86_64 reached only
    // if the debug-exit device is missing.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_found_whatever_the_consoles_device_index() {
        let dev = std::env::temp_dir().join(format!("hvprobe-ports-{}", std::process::id()));
        std::fs::create_dir_all(&dev).unwrap();
        for n in ["vport1p1", "vport1p4", "vport1p12", "vda"] {
            std::fs::write(dev.join(n), b"").unwrap();
        }
        assert_eq!(port_node("/dev/vport0p4", &dev), dev.join("vport1p4"));
        assert_eq!(port_node("/dev/vport0p1", &dev), dev.join("vport1p1"));
        // Not there (yet): the path as given, which the caller retries.
        assert_eq!(
            port_node("/dev/vport0p5", &dev),
            PathBuf::from("/dev/vport0p5")
        );
        assert_eq!(port_node("/dev/ttyS1", &dev), PathBuf::from("/dev/ttyS1"));
        std::fs::remove_dir_all(&dev).unwrap();
    }
}
