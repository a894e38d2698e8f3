//! The L1 initramfs: the hvprobe binary that is L1's `/init` (with the shared libraries it
//! links), the modules L1 needs, the L2 guest's kernel, initrd, System.map and BTF, and the
//! inner run's job.

use std::fs;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::process::Command;

use hvprobe_guest::GuestArch;
use hvprobe_guest::cpio::CpioWriter;

use super::{
    L1_ARGS_PATH, L1_BTF, L1_JOB_PATH, L1_MODULES_DIR, L1_SYSTEM_MAP, L1_UNWIND, RunnerError,
    prep_err,
};
use crate::job::Job;

/// The shared libraries a dynamically linked binary needs, as `ldd` lists them.
pub(super) fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, RunnerError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(prep_err("running ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn add_parents<W: io::Write>(
    w: &mut CpioWriter<W>,
    seen: &mut std::collections::BTreeSet<String>,
    path: &str,
) -> io::Result<()> {
    let mut prefix = String::new();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        if seen.insert(prefix.clone()) {
            w.dir(&prefix)?;
        }
    }
    Ok(())
}

/// What goes into L1 besides the guest's files: the hvprobe binary that is its `/init` (with the
/// shared libraries it needs) and the modules.
pub(super) struct L1Image<'a> {
    pub exe: PathBuf,
    pub libs: Vec<PathBuf>,
    pub kernel: &'a hvprobe_guest::KernelPackage,
    pub arch: GuestArch,
}

/// What the inner run reads about the L2 guest's kernel when it probes: its System.map, its
/// BTF section and its unwind tables (never the whole vmlinux: hundreds of MiB with debug info).
#[derive(Clone, Copy)]
pub(super) struct L2KernelInfo<'a> {
    pub system_map: Option<&'a Path>,
    pub btf: Option<&'a [u8]>,
    pub unwind: Option<&'a [u8]>,
}

/// Writes the L1 initramfs for an inner run of `inner_job` to `out`.
pub(super) fn build_l1_initrd(
    out: &Path,
    image: &L1Image<'_>,
    l2_kernel: &Path,
    l2_initrd: Option<&Path>,
    kernel_info: &L2KernelInfo<'_>,
    inner_job: &Job,
) -> Result<(), RunnerError> {
    let L2KernelInfo {
        system_map,
        btf,
        unwind,
    } = *kernel_info;
    let job_json = serde_json::to_vec_pretty(inner_job)
        .map_err(|e| RunnerError::Prepare(format!("writing the inner job: {e}")))?;
    // `--l2-qemu`: QEMU boots the guest instead of an inner hvprobe.
    let (command, qemu) = if inner_job.l2_qemu {
        ("l2-qemu", Some(super::qemu_l2::host_files(image.arch)?))
    } else {
        ("run-job", None)
    };
    let inner_args = [command.to_string(), L1_JOB_PATH.to_string()];
    let (exe, libs, kernel) = (&image.exe, &image.libs, image.kernel);
    let file = fs::File::create(out).map_err(prep_err("creating the L1 initramfs"))?;
    let mut w = CpioWriter::new(BufWriter::new(file));
    let mut seen = std::collections::BTreeSet::new();
    let mut add = |w: &mut CpioWriter<_>, path: &str, data: &[u8], perm: u32| -> io::Result<()> {
        add_parents(w, &mut seen, path)?;
        w.file(path, perm, data)
    };
    let mut write = |w: &mut CpioWriter<_>| -> io::Result<()> {
        for d in ["proc", "sys", "dev", "tmp", "l2"] {
            w.dir(d)?;
        }
        w.char_dev("dev/console", 5, 1)?;
        add(w, "init", &fs::read(exe)?, 0o755)?;
        for lib in libs {
            add(w, &lib.to_string_lossy(), &fs::read(lib)?, 0o755)?;
        }
        for m in image.arch.l1_modules() {
            let name = m.rsplit('/').next().unwrap_or(m);
            let data = fs::read(kernel.module(name))?;
            add(w, &format!("{L1_MODULES_DIR}/{name}"), &data, 0o644)?;
        }
        add(w, "l2/vmlinuz", &fs::read(l2_kernel)?, 0o644)?;
        if let Some(map) = system_map {
            add(
                w,
                L1_SYSTEM_MAP.trim_start_matches('/'),
                &fs::read(map)?,
                0o644,
            )?;
        }
        if let Some(btf) = btf {
            add(w, L1_BTF.trim_start_matches('/'), btf, 0o644)?;
        }
        if let Some(tables) = unwind {
            add(w, L1_UNWIND.trim_start_matches('/'), tables, 0o644)?;
        }
        if let Some(initrd) = l2_initrd {
            add(w, "l2/initrd", &fs::read(initrd)?, 0o644)?;
        }
        let mut args = Vec::new();
        for a in &inner_args {
            args.extend_from_slice(a.as_bytes());
            args.push(0);
        }
        for (host, at, mode) in qemu.iter().flatten() {
            add(w, at.trim_start_matches('/'), &fs::read(host)?, *mode)?;
        }
        add(w, L1_ARGS_PATH, &args, 0o644)?;
        add(w, L1_JOB_PATH, &job_json, 0o644)?;
        Ok(())
    };
    write(&mut w).map_err(prep_err("writing the L1 initramfs"))?;
    w.finish().map_err(prep_err("writing the L1 initramfs"))?;
    Ok(())
}

// ldd runs the loader of the build's own architecture: not under qemu-user.
#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn ldd_lists_the_loader_and_libc() {
        let exe = std::env::current_exe().unwrap();
        let libs = shared_libraries(&exe).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
    }
}
