//! The runner's emulator: Debian's QEMU source with the project's int3 and NRIP-save patch
//! (`guest/qemu/int3-into-exception-intercept.patch`), built once by `guest/qemu/build.sh` and
//! cached. Both files are compiled into hvprobe so a bare binary can build it too.

use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The build script.
pub const BUILD_SCRIPT: &str = include_str!("../qemu/build.sh");
/// The patch that makes TCG deliver int3/into through the #BP/#OF exception intercepts and gives
/// its SVM the NRIP save of AMD hardware.
pub const INT3_PATCH: &str = include_str!("../qemu/int3-into-exception-intercept.patch");
/// The apt-sources check the build script runs (is there a `deb-src` entry for backports?).
pub const APT_BACKPORTS_SCRIPT: &str = include_str!("../apt-backports.sh");

/// Path of the patched `qemu-system-x86_64`, building it first if the cache has none (about
/// five minutes on two cores; the script prints a line when it starts).
pub fn patched_qemu() -> io::Result<PathBuf> {
    let cache = crate::cache_dir();
    let dir = cache.join("qemu").join("src");
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("build.sh");
    std::fs::write(&script, BUILD_SCRIPT)?;
    std::fs::write(dir.join("int3-into-exception-intercept.patch"), INT3_PATCH)?;
    let apt_check = dir.join("apt-backports.sh");
    std::fs::write(&apt_check, APT_BACKPORTS_SCRIPT)?;
    let out = Command::new("bash")
        .arg(&script)
        .env("HVPROBE_APT_BACKPORTS", &apt_check)
        .arg(&cache)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "guest/qemu/build.sh failed ({})",
            out.status
        )));
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(path))
}
