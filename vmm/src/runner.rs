//! The emulated KVM runner: where the host's KVM cannot boot and debug a stock guest (no
//! /dev/kvm, the software kvm_pvm module), hvprobe runs itself inside an emulated machine
//! that has hardware virtualization.
//!
//! ```text
//! host --QEMU TCG, -cpu EPYC--> L1: Debian cloud kernel + kvm, kvm-amd --hvprobe--> L2 guest
//! ```
//!
//! The L1 initramfs holds this very hvprobe binary as `/init` (with the shared libraries it
//! links), the KVM modules, the L2 kernel and initrd, and the argument list of the inner run.
//! The inner run's stdout (the guest console) comes back on L1's second serial port and its
//! stderr on the third, both in raw mode and streamed to hvprobe's own stdout and stderr;
//! its exit status comes back through QEMU's `isa-debug-exit` device, which turns a write of
//! `v` into QEMU's exit status `2v + 1` (L1 writes status + 1, see `l1init`). L1's own kernel log goes to a file that is shown when
//! something goes wrong.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hvprobe_guest::cpio::CpioWriter;
use hvprobe_guest::debian::KVM_MODULES;

use crate::job::{Job, RunnerChoice};

/// Errors of the emulated runner.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The emulator could not be found or started.
    #[error(
        "cannot start the emulator `{qemu}`: {detail} (install qemu-system-x86 from bookworm-backports: `bash guest/setup-host.sh`)"
    )]
    NoEmulator {
        /// The binary tried.
        qemu: String,
        /// Why.
        detail: String,
    },
    /// Preparing the L1 image failed.
    #[error("preparing the emulated runner: {0}")]
    Prepare(String),
    /// The L1 machine stopped without reporting the inner run's status.
    #[error(
        "the emulated runner's L1 machine {how} without reporting a result; last L1 console lines:\n{tail}"
    )]
    NoResult {
        /// How it stopped.
        how: String,
        /// The end of L1's console log.
        tail: String,
    },
    /// The L1 machine ran over its time limit.
    #[error("the emulated runner did not finish within {secs} s; last L1 console lines:\n{tail}")]
    Timeout {
        /// The limit.
        secs: u64,
        /// The end of L1's console log.
        tail: String,
    },
}

fn prep_err(what: &str) -> impl FnOnce(io::Error) -> RunnerError + '_ {
    move |e| RunnerError::Prepare(format!("{what}: {e}"))
}

/// Path of the inner run's argument list inside L1 (NUL-separated).
pub const L1_ARGS_PATH: &str = "/hvprobe/args";
/// Path of the inner run's [`Job`] (JSON) inside L1.
pub const L1_JOB_PATH: &str = "/hvprobe/job.json";
/// Directory of the KVM modules inside L1.
pub const L1_MODULES_DIR: &str = "/modules";
/// I/O port of QEMU's `isa-debug-exit` device in L1.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Time allowed on top of the inner run's own limit for L1 to boot and shut down.
const L1_MARGIN: Duration = Duration::from_secs(180);

/// Where Debian installs the firmware QEMU loads (SeaBIOS, option ROMs).
const FIRMWARE_DIRS: [&str; 3] = [
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/lib/ipxe/qemu",
];

/// The emulator binary: `$HVPROBE_QEMU`, else the project's patched QEMU (built and cached on
/// first use, see `guest/qemu/`), else the stock `qemu-system-x86_64` on PATH, with which int3
/// probes are unavailable (the trap self-test inside L1 then says so).
pub fn emulator() -> String {
    if let Ok(q) = std::env::var("HVPROBE_QEMU") {
        return q;
    }
    match hvprobe_guest::qemu::patched_qemu() {
        Ok(p) => p.display().to_string(),
        Err(e) => {
            eprintln!(
                "hvprobe: cannot build the runner's patched QEMU ({e}); using the stock qemu-system-x86_64, which does not deliver int3 exits to nested guests"
            );
            "qemu-system-x86_64".to_string()
        }
    }
}

/// The shared libraries a dynamically linked binary needs, as `ldd` lists them.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, RunnerError> {
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

/// Writes the L1 initramfs for an inner run with `inner_args` to `out`.
fn build_l1_initrd(
    out: &Path,
    kernel: &hvprobe_guest::KernelPackage,
    l2_kernel: &Path,
    l2_initrd: Option<&Path>,
    system_map: Option<&Path>,
    btf: Option<&[u8]>,
    inner_job: &Job,
) -> Result<(), RunnerError> {
    let job_json = serde_json::to_vec_pretty(inner_job)
        .map_err(|e| RunnerError::Prepare(format!("writing the inner job: {e}")))?;
    let inner_args = ["run-job".to_string(), L1_JOB_PATH.to_string()];
    let exe = std::env::current_exe().map_err(prep_err("locating the hvprobe binary"))?;
    let libs = shared_libraries(&exe)?;
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
        add(w, "init", &fs::read(&exe)?, 0o755)?;
        for lib in &libs {
            add(w, &lib.to_string_lossy(), &fs::read(lib)?, 0o755)?;
        }
        for m in KVM_MODULES {
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
        if let Some(initrd) = l2_initrd {
            add(w, "l2/initrd", &fs::read(initrd)?, 0o644)?;
        }
        let mut args = Vec::new();
        for a in &inner_args {
            args.extend_from_slice(a.as_bytes());
            args.push(0);
        }
        add(w, L1_ARGS_PATH, &args, 0o644)?;
        add(w, L1_JOB_PATH, &job_json, 0o644)?;
        Ok(())
    };
    write(&mut w).map_err(prep_err("writing the L1 initramfs"))?;
    w.finish().map_err(prep_err("writing the L1 initramfs"))?;
    Ok(())
}

/// The inner run's job: the same job, whole, with the runner fixed to the host KVM and the
/// guest's files and the output at their L1 paths.
pub fn inner_job(job: &Job) -> Job {
    let probing = !job.probes.is_empty();
    Job {
        runner: RunnerChoice::Host,
        kernel: Some(PathBuf::from("/l2/vmlinuz")),
        initrd: job.initrd.as_ref().map(|_| PathBuf::from("/l2/initrd")),
        system_map: job
            .system_map
            .as_ref()
            .filter(|_| probing)
            .map(|_| PathBuf::from(L1_SYSTEM_MAP)),
        btf: job
            .btf
            .as_ref()
            .filter(|_| probing)
            .map(|_| PathBuf::from(L1_BTF)),
        output: job.output.as_ref().map(|_| PathBuf::from(L1_OUTPUT_TTY)),
        summary_json: job
            .summary_json
            .as_ref()
            .map(|_| PathBuf::from(crate::summary::ON_STDERR)),
        // Probe files were read into `probes` on the host.
        probe_files: Vec::new(),
        ..job.clone()
    }
}

/// The L1 serial port that carries the inner run's `--output` to the file named on the host
/// (the fourth `-serial`; the first three are L1's console and the inner stdout and stderr).
pub const L1_OUTPUT_TTY: &str = "/dev/ttyS3";

/// Where the guest kernel's BTF (the raw section, not the whole vmlinux) goes inside L1.
pub const L1_BTF: &str = "/l2/btf";

/// Where the guest's System.map goes inside L1.
pub const L1_SYSTEM_MAP: &str = "/l2/System.map";

fn console_tail(path: &Path) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..]
        .iter()
        .map(|l| format!("  L1| {}", l.trim_end_matches('\r')))
        .collect::<Vec<_>>()
        .join("\n")
}

fn wait_with_deadline(
    child: &mut Child,
    deadline: Option<Instant>,
) -> io::Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `args` (guest files already resolved) inside the emulated runner and returns the inner
/// run's exit status.
pub fn run_emulated(args: &Job) -> Result<i32, RunnerError> {
    let qemu = emulator();
    let l1 = hvprobe_guest::default_guest()
        .map_err(|e| RunnerError::Prepare(format!("the L1 kernel: {e}")))?
        .kernel;
    let l2_kernel = args
        .kernel
        .as_deref()
        .ok_or_else(|| RunnerError::Prepare("no guest kernel".into()))?;

    // Only the BTF section travels into L1: a vmlinux with debug info is hundreds of MiB.
    let btf = match (&args.btf, args.probes.is_empty()) {
        (Some(path), false) => {
            Some(crate::job::read_btf(path).map_err(|e| RunnerError::Prepare(format!("{e:#}")))?)
        }
        _ => None,
    };
    // `-o FILE`: the inner run writes to L1's fourth serial port, which QEMU writes to FILE.
    // Created here first, so that a path that cannot be written fails before anything boots.
    let trace_file = match &args.output {
        Some(path) => {
            fs::File::create(path).map_err(|e| {
                RunnerError::Prepare(format!("creating the output file {}: {e}", path.display()))
            })?;
            // QEMU's option syntax doubles a comma that is part of a value.
            Some(format!(
                "file:{}",
                path.display().to_string().replace(',', ",,")
            ))
        }
        None => None,
    };
    let work = std::env::temp_dir().join(format!("hvprobe-runner-{}", std::process::id()));
    fs::create_dir_all(&work).map_err(prep_err("creating a work directory"))?;
    let initrd = work.join("l1.cpio");
    let console = work.join("l1-console.log");
    build_l1_initrd(
        &initrd,
        &l1,
        l2_kernel,
        args.initrd.as_deref(),
        args.system_map
            .as_deref()
            .filter(|_| !args.probes.is_empty()),
        btf.as_deref(),
        &inner_job(args),
    )?;

    let l1_mem = (args.memory + 512).max(1024);
    // One L1 CPU whatever the guest's vCPU count: the L2 vCPU threads share it. With two
    // emulated L1 CPUs, QEMU's TCG nested SVM corrupts state now and then under a stream of
    // exits (L2 triple faults, L1 panics with a zeroed register file in `error_entry`, or L1
    // resets silently; 10 of 23 two-vCPU probe runs), none of it in 10 runs with one L1 CPU.
    // docs/probing.md, "The runner's QEMU", has the figures.
    let l1_cpus = L1_CPUS;
    let mut cmd = Command::new(&qemu);
    cmd.args(["-accel", "tcg", "-cpu", "EPYC", "-nodefaults", "-no-reboot"])
        // Debian's firmware, for a QEMU built from source (guest/qemu/build.sh).
        .args(FIRMWARE_DIRS.iter().flat_map(|d| ["-L", d]))
        .args(["-display", "none", "-monitor", "none"])
        .args(["-smp", &l1_cpus.to_string(), "-m", &l1_mem.to_string()])
        .arg("-kernel")
        .arg(l1.vmlinuz())
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 nokaslr quiet loglevel=3 panic=-1 rdinit=/init",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-serial", "stdio"])
        // The inner run's stderr: QEMU's own stderr, which is a pipe read below.
        .args(["-serial", "file:/proc/self/fd/2"])
        .args(
            trace_file
                .iter()
                .flat_map(|f| ["-serial".to_string(), f.clone()]),
        )
        .args([
            "-device",
            &format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04"),
        ])
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| RunnerError::NoEmulator {
        qemu: qemu.clone(),
        detail: e.to_string(),
    })?;
    let stderr_copy = child.stderr.take().map(|pipe| {
        let summary = args.summary_json.clone();
        std::thread::spawn(move || relay_stderr(pipe, summary))
    });
    let limit = args.effective_timeout().map(|t| t + L1_MARGIN);
    let deadline = limit.map(|l| Instant::now() + l);
    let status = wait_with_deadline(&mut child, deadline)
        .map_err(|e| RunnerError::Prepare(format!("waiting for the emulator: {e}")))?;
    let result = match status {
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(RunnerError::Timeout {
                secs: limit.unwrap_or_default().as_secs(),
                tail: console_tail(&console),
            })
        }
        Some(status) => {
            let stderr_text = stderr_copy.and_then(|t| t.join().ok()).unwrap_or_default();
            match status.code() {
                // L1 reports status s as s + 1, which QEMU turns into 2(s + 1) + 1.
                Some(code) if code % 2 == 1 && code >= 3 => Ok((code - 3) / 2),
                Some(code) => Err(RunnerError::NoResult {
                    how: format!(
                        "exited with status {code}{}",
                        qemu_stderr_note(&stderr_text)
                    ),
                    tail: console_tail(&console),
                }),
                None => Err(RunnerError::NoResult {
                    how: format!("was killed ({status})"),
                    tail: console_tail(&console),
                }),
            }
        }
    };
    let _ = fs::remove_dir_all(&work);
    result
}

/// CPUs of the emulated L1 machine (see the comment on `-smp` in [`run_emulated`]).
const L1_CPUS: u32 = 1;

/// Copies the emulator's stderr (its own messages and the inner run's stderr) to ours, and
/// returns the last part of it for error reports.
fn relay_stderr(pipe: std::process::ChildStderr, summary: Option<PathBuf>) -> String {
    use std::io::BufRead;
    let mut kept = Vec::new();
    let mut reader = io::BufReader::new(pipe);
    let mut line = Vec::new();
    let mut out = io::stderr();
    while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
        let text = String::from_utf8_lossy(&line);
        // The inner run's summary: to the file named on the host, not to the user.
        if let Some(json) = text.trim_end().strip_prefix(crate::summary::STDERR_PREFIX) {
            if let Some(path) = &summary
                && let Err(e) = fs::write(path, format!("{json}\n"))
            {
                let _ = writeln!(
                    out,
                    "hvprobe: writing the run summary {}: {e}",
                    path.display()
                );
            }
            line.clear();
            continue;
        }
        // TCG's notes on CPUID bits of `-cpu EPYC` it cannot emulate say nothing to the user.
        if !text.contains("TCG doesn't support requested feature") {
            let _ = out.write_all(&line);
            kept.extend_from_slice(&line);
            if kept.len() > 8192 {
                kept.drain(..kept.len() - 4096);
            }
        }
        line.clear();
    }
    String::from_utf8_lossy(&kept).into_owned()
}

fn qemu_stderr_note(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(" (emulator said: {s})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        job: Job,
    }

    #[test]
    fn the_inner_job_is_the_whole_outer_job_with_l1_paths() {
        let outer = Wrap::parse_from([
            "x",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--vcpus",
            "2",
            "--memory",
            "300",
            "--exec",
            "echo 'a b'; exit 3",
            "--timeout",
            "50",
            "--runner",
            "emulated",
            "--timings",
            "-p",
            "p:hv/o do_sys_openat2 n=+0($arg2):ustring",
            "-p",
            "vfs_read+0x4",
            "--quiet",
            "--json",
            "-o",
            "/tmp/trace",
            "--hist",
            "--trap",
            "hw",
            "--system-map",
            "/m",
            "--btf",
            "/b",
            "--skip-refused",
            "--summary-json",
            "/tmp/summary",
        ])
        .job;
        let inner = inner_job(&outer);
        // Through JSON and back, as L1 reads it.
        let json = serde_json::to_string(&inner).unwrap();
        let read: Job = serde_json::from_str(&json).unwrap();
        assert_eq!(read, inner);
        // Every field is the outer job's but the paths and the runner.
        let expected = Job {
            kernel: Some("/l2/vmlinuz".into()),
            initrd: Some("/l2/initrd".into()),
            system_map: Some(L1_SYSTEM_MAP.into()),
            btf: Some(L1_BTF.into()),
            output: Some(L1_OUTPUT_TTY.into()),
            summary_json: Some(crate::summary::ON_STDERR.into()),
            runner: RunnerChoice::Host,
            ..outer.clone()
        };
        assert_eq!(inner, expected);
        assert_eq!(inner.effective_cmdline(), outer.effective_cmdline());
        // Without probes, neither System.map nor BTF travels.
        let plain = Wrap::parse_from(["x", "--kernel", "/k", "--btf", "/b"]).job;
        let inner = inner_job(&plain);
        assert_eq!(
            (inner.system_map, inner.btf, inner.initrd),
            (None, None, None)
        );
    }

    // ldd runs the loader of the build's own architecture: not under qemu-user.
    #[cfg(target_arch = "x86_64")]
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
