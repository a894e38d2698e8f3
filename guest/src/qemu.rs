//! The runner's emulator: Debian's QEMU source with the project's int3 and NRIP-save patch
//! (`guest/qemu/int3-into-exception-intercept.patch`), built once by `guest/qemu/build.sh` and
//! cached. Both files are compiled into hvprobe so a bare binary can build it too.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::debian::{COMPLETE, download};
use crate::{GuestError, run_output};

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

/// An arm64 `qemu-system-aarch64` with every shared library it loads, unpacked from Debian's
/// arm64 packages into the cache: what the arm64 emulated runner's L1 needs to run QEMU as the
/// L2 VMM (`--l2-qemu`), where the host's own QEMU (an x86_64 binary) cannot run.
#[derive(Clone, Debug)]
pub struct QemuBundle {
    /// The `qemu-system-aarch64` binary.
    pub binary: PathBuf,
    /// Its dynamic loader (`ld-linux-aarch64.so.1`, which the binary names as interpreter).
    pub loader: PathBuf,
    /// Every shared library it needs, by soname, in one directory.
    pub libraries: Vec<PathBuf>,
    /// The Debian version of the QEMU package.
    pub version: String,
}

/// The arm64 package of the host's QEMU (`qemu-system-arm`) at `version`, with every library
/// package it depends on (recursively, libraries only), unpacked in the cache once; the
/// binary's library closure (`readelf -d` NEEDED entries) picked out of it.
pub fn arm64_qemu(cache: &Path, version: &str) -> Result<QemuBundle, GuestError> {
    let dir = cache
        .join("qemu-l2")
        .join(format!("aarch64-{}", version.replace(':', "%3a")));
    let bundle = |dir: &Path| -> Result<QemuBundle, GuestError> {
        let lib = dir.join("lib");
        let mut libraries: Vec<PathBuf> = fs::read_dir(&lib)
            .map_err(GuestError::io(&lib))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.ends_with(ARM64_LOADER))
            .collect();
        libraries.sort();
        Ok(QemuBundle {
            binary: dir.join("qemu-system-aarch64"),
            loader: lib.join(ARM64_LOADER),
            libraries,
            version: version.to_string(),
        })
    };
    if dir.join(COMPLETE).exists() {
        return bundle(&dir);
    }
    let _ = fs::remove_dir_all(&dir);
    eprintln!(
        "hvprobe: fetching Debian's arm64 QEMU {version} and its libraries for the arm64 runner's L1 (one time)"
    );
    let debs = dir.join("deb");
    let top = format!("qemu-system-arm:arm64={version}");
    let mut fetched: BTreeSet<String> = BTreeSet::new();
    let mut specs = vec![top];
    // Level by level, each package's library dependencies not fetched yet.
    let mut level = specs.clone();
    loop {
        let new: Vec<String> = library_depends(&level)?
            .into_iter()
            .filter(|p| fetched.insert(p.clone()))
            .collect();
        if new.is_empty() {
            break;
        }
        specs.extend(new.iter().cloned());
        level = new;
    }
    download(&debs, &specs)?;
    let unpack = dir.join("unpack");
    for deb in fs::read_dir(&debs)
        .map_err(GuestError::io(&debs))?
        .flatten()
    {
        run_output(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb.path())
                .arg(&unpack),
        )?;
    }
    let lib = dir.join("lib");
    fs::create_dir_all(&lib).map_err(GuestError::io(&lib))?;
    let binary = unpack.join("usr/bin/qemu-system-aarch64");
    let search =
        ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib"].map(|d| unpack.join(d));
    let find = |soname: &str| search.iter().map(|d| d.join(soname)).find(|p| p.exists());
    let mut wanted: Vec<String> = needed(&binary)?;
    wanted.push(ARM64_LOADER.to_string());
    let mut have = BTreeSet::new();
    while let Some(soname) = wanted.pop() {
        if !have.insert(soname.clone()) {
            continue;
        }
        let src = find(&soname).ok_or_else(|| GuestError::Command {
            command: format!("apt-get download {}", specs.join(" ")),
            detail: format!("no arm64 package brought {soname}, which QEMU needs"),
        })?;
        // Symbolic links (sonames point at versioned files) are copied as the file.
        fs::copy(&src, lib.join(&soname)).map_err(GuestError::io(&src))?;
        wanted.extend(needed(&src)?);
    }
    let dst = dir.join("qemu-system-aarch64");
    fs::rename(&binary, &dst).map_err(GuestError::io(&binary))?;
    fs::remove_dir_all(&unpack).map_err(GuestError::io(&unpack))?;
    fs::remove_dir_all(&debs).map_err(GuestError::io(&debs))?;
    fs::write(dir.join(COMPLETE), version).map_err(GuestError::io(&dir))?;
    bundle(&dir)
}

/// The interpreter arm64 Debian binaries name.
pub const ARM64_LOADER: &str = "ld-linux-aarch64.so.1";

/// The library packages (`lib*`, `zlib1g`) that `packages` depend on directly, as apt names
/// them (`libfoo1:arm64`).
fn library_depends(packages: &[String]) -> Result<Vec<String>, GuestError> {
    let out = run_output(
        Command::new("apt-cache")
            .args([
                "depends",
                "--no-recommends",
                "--no-suggests",
                "--no-conflicts",
            ])
            .args(["--no-breaks", "--no-replaces", "--no-enhances"])
            .args(packages),
    )?;
    Ok(parse_library_depends(&String::from_utf8_lossy(&out)))
}

/// `apt-cache depends` output's real library dependencies (virtual `<...>` ones left out).
fn parse_library_depends(out: &str) -> Vec<String> {
    let mut found: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("Depends:")
                .or_else(|| l.strip_prefix("PreDepends:"))
                .or_else(|| l.strip_prefix("|Depends:"))
        })
        .map(str::trim)
        .filter(|p| !p.starts_with('<') && (p.starts_with("lib") || p.starts_with("zlib")))
        .map(str::to_string)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The sonames an ELF file needs (`readelf -d`, which reads any architecture's ELF).
fn needed(elf: &Path) -> Result<Vec<String>, GuestError> {
    let out = run_output(Command::new("readelf").arg("-d").arg(elf))?;
    Ok(parse_needed(&String::from_utf8_lossy(&out)))
}

/// `readelf -d` output's `(NEEDED)` entries.
fn parse_needed(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let (_, rest) = l.split_once('[')?;
            Some(rest.split(']').next()?.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_dependencies_and_needed_sonames_are_read_from_the_tools_output() {
        let depends = "qemu-system-arm:arm64\n  Depends: libaio1:arm64\n  Depends: libc6:arm64\n  Depends: qemu-system-common:arm64\n  Depends: <qemu-system-data:arm64>\n    qemu-system-data\n  PreDepends: zlib1g:arm64\nlibaio1:arm64\n  Depends: libc6:arm64\n";
        assert_eq!(
            parse_library_depends(depends),
            ["libaio1:arm64", "libc6:arm64", "zlib1g:arm64"]
        );
        let readelf = " 0x0000000000000001 (NEEDED)             Shared library: [libglib-2.0.so.0]\n 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]\n 0x000000000000000e (SONAME)             Library soname: [libfoo.so.1]\n";
        assert_eq!(parse_needed(readelf), ["libglib-2.0.so.0", "libc.so.6"]);
    }
}
