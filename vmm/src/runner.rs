//! The emulated KVM runner: where the host's KVM cannot boot and debug a stock guest (no
//! /dev/kvm, the software kvm_pvm module), or the guest is of another architecture than the
//! host, hvprobe runs itself inside an emulated machine that has hardware virtualization.
//!
//! ```text
//! host --QEMU TCG, -cpu EPYC--> L1: Debian cloud kernel + kvm, kvm-amd --hvprobe--> L2 guest
//! host --QEMU TCG, virt,virtualization=on, -cpu max--> L1: Debian arm64 kernel (KVM, VHE)
//!      --aarch64 hvprobe--> L2 arm64 guest
//! ```
//!
//! The arm64 L1 runs the static aarch64 build of hvprobe as `/init`; the virt board has one UART
//! (L1's console) and no debug-exit device, so the inner run's streams, its `-o` output and its
//! exit status travel on virtio-serial ports (never semihosting, which would let a guest reach
//! host files).
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

use hvprobe_guest::GuestArch;
use hvprobe_guest::cpio::CpioWriter;

use crate::job::{Job, RunnerChoice};

/// Errors of the emulated runner.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The emulator could not be found or started.
    #[error(
        "cannot start the emulator `{qemu}`: {detail} (install QEMU from bookworm-backports: `bash guest/setup-host.sh`)"
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
/// The arm64 L1's virtio-serial port for the inner run's stdout. (Output and input are apart:
/// a guest's write to a port blocks while the host side is disconnected, and QEMU's stdio
/// backend disconnects when its stdin ends.)
pub const VPORT_STDOUT: &str = "/dev/vport0p1";
/// The arm64 L1's port for the inner run's stderr.
pub const VPORT_STDERR: &str = "/dev/vport0p2";
/// The arm64 L1's port for the inner run's `-o` output.
pub const VPORT_OUTPUT: &str = "/dev/vport0p3";
/// The arm64 L1's port for the inner run's exit status.
pub const VPORT_STATUS: &str = "/dev/vport0p4";
/// The arm64 L1's port for the inner run's stdin.
pub const VPORT_STDIN: &str = "/dev/vport0p5";
/// What the status line starts with.
pub const STATUS_PREFIX: &str = "HVPROBE-L1-STATUS=";
/// Directory of the modules inside L1.
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

/// What goes into L1 besides the guest's files: the hvprobe binary that is its `/init` (with the
/// shared libraries it needs) and the modules.
struct L1Image<'a> {
    exe: PathBuf,
    libs: Vec<PathBuf>,
    kernel: &'a hvprobe_guest::KernelPackage,
    arch: GuestArch,
}

/// Writes the L1 initramfs for an inner run of `inner_job` to `out`.
fn build_l1_initrd(
    out: &Path,
    image: &L1Image<'_>,
    l2_kernel: &Path,
    l2_initrd: Option<&Path>,
    system_map: Option<&Path>,
    btf: Option<&[u8]>,
    inner_job: &Job,
) -> Result<(), RunnerError> {
    let job_json = serde_json::to_vec_pretty(inner_job)
        .map_err(|e| RunnerError::Prepare(format!("writing the inner job: {e}")))?;
    let inner_args = ["run-job".to_string(), L1_JOB_PATH.to_string()];
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
        output: job
            .output
            .as_ref()
            .map(|_| PathBuf::from(l1_output_port(job.guest_arch()))),
        summary_json: job
            .summary_json
            .as_ref()
            .map(|_| PathBuf::from(crate::summary::ON_STDERR)),
        // Probe files were read into `probes` on the host.
        probe_files: Vec::new(),
        ..job.clone()
    }
}

/// The L1 port that carries the inner run's `--output` to the file named on the host (x86_64:
/// the fourth `-serial`, the first three being L1's console and the inner stdout and stderr;
/// arm64: a virtio-serial port).
pub fn l1_output_port(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "/dev/ttyS3",
        GuestArch::Aarch64 => VPORT_OUTPUT,
    }
}

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

/// Runs `args` (guest files already resolved) inside the emulated runner of the guest's
/// architecture and returns the inner run's exit status.
pub fn run_emulated(args: &Job) -> Result<i32, RunnerError> {
    let arch = args.guest_arch();
    let qemu = match arch {
        GuestArch::X86_64 if GuestArch::host() == GuestArch::X86_64 => emulator(),
        GuestArch::Aarch64 => std::env::var("HVPROBE_QEMU_AARCH64")
            .unwrap_or_else(|_| "qemu-system-aarch64".to_string()),
        GuestArch::X86_64 => {
            return Err(RunnerError::Prepare(format!(
                "an x86_64 guest on this {} host: the emulated x86_64 runner runs on x86_64 hosts only",
                GuestArch::host()
            )));
        }
    };
    let l1 = hvprobe_guest::default_guest_for(arch)
        .map_err(|e| RunnerError::Prepare(format!("the L1 kernel: {e}")))?
        .kernel;
    let l2_kernel = args
        .kernel
        .as_deref()
        .ok_or_else(|| RunnerError::Prepare("no guest kernel".into()))?;
    let image = match arch {
        GuestArch::X86_64 => {
            let exe = std::env::current_exe().map_err(prep_err("locating the hvprobe binary"))?;
            L1Image {
                libs: shared_libraries(&exe)?,
                exe,
                kernel: &l1,
                arch,
            }
        }
        GuestArch::Aarch64 => L1Image {
            exe: aarch64_hvprobe()?,
            libs: Vec::new(),
            kernel: &l1,
            arch,
        },
    };

    // Only the BTF section travels into L1: a vmlinux with debug info is hundreds of MiB.
    let btf = match (&args.btf, args.probes.is_empty()) {
        (Some(path), false) => {
            Some(crate::job::read_btf(path).map_err(|e| RunnerError::Prepare(format!("{e:#}")))?)
        }
        _ => None,
    };
    // `-o FILE`: the inner run writes to an L1 port, which QEMU writes to FILE. Created here
    // first, so that a path that cannot be written fails before anything boots.
    let trace_file = match &args.output {
        Some(path) => {
            fs::File::create(path).map_err(|e| {
                RunnerError::Prepare(format!("creating the output file {}: {e}", path.display()))
            })?;
            // QEMU's option syntax doubles a comma that is part of a value.
            Some(path.display().to_string().replace(',', ",,"))
        }
        None => None,
    };
    let work = std::env::temp_dir().join(format!("hvprobe-runner-{}", std::process::id()));
    fs::create_dir_all(&work).map_err(prep_err("creating a work directory"))?;
    let initrd = work.join("l1.cpio");
    let console = work.join("l1-console.log");
    let status_file = work.join("status");
    build_l1_initrd(
        &initrd,
        &image,
        l2_kernel,
        args.initrd.as_deref(),
        args.system_map
            .as_deref()
            .filter(|_| !args.probes.is_empty()),
        btf.as_deref(),
        &inner_job(args),
    )?;

    let l1_mem = (args.memory + 512).max(1024);
    let mut cmd = Command::new(&qemu);
    match arch {
        GuestArch::X86_64 => x86_64_machine(&mut cmd, &console, trace_file.as_deref()),
        GuestArch::Aarch64 => {
            aarch64_machine(&mut cmd, &console, trace_file.as_deref(), &status_file)
        }
    }
    let cpu = args.runner_cpu.as_deref().unwrap_or(match arch {
        GuestArch::X86_64 => "EPYC",
        GuestArch::Aarch64 => "max",
    });
    cmd.args(["-cpu", cpu]);
    cmd.args(["-smp", &L1_CPUS.to_string(), "-m", &l1_mem.to_string()])
        .arg("-kernel")
        .arg(l1.vmlinuz())
        .arg("-initrd")
        .arg(&initrd)
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
            let reported = match arch {
                GuestArch::X86_64 => x86_64_status(status),
                GuestArch::Aarch64 => aarch64_status(&status_file),
            };
            reported.ok_or_else(|| RunnerError::NoResult {
                how: match status.code() {
                    Some(code) => format!(
                        "exited with status {code}{}",
                        qemu_stderr_note(&stderr_text)
                    ),
                    None => format!("was killed ({status})"),
                },
                tail: console_tail(&console),
            })
        }
    };
    if std::env::var_os("HVPROBE_RUNNER_KEEP").is_some() {
        eprintln!(
            "hvprobe: kept the runner's work directory {} (HVPROBE_RUNNER_KEEP)",
            work.display()
        );
    } else {
        let _ = fs::remove_dir_all(&work);
    }
    result
}

/// The x86_64 L1 machine: TCG with SVM (`-cpu EPYC` by default), the console and the inner run's streams
/// on serial ports, the status through `isa-debug-exit`.
fn x86_64_machine(cmd: &mut Command, console: &Path, trace_file: Option<&str>) {
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
}

/// The inner run's status from the x86_64 L1's exit: L1 reports status s as s + 1, which QEMU
/// turns into 2(s + 1) + 1; anything else means L1 died without reporting.
fn x86_64_status(status: std::process::ExitStatus) -> Option<i32> {
    match status.code() {
        Some(code) if code % 2 == 1 && code >= 3 => Some((code - 3) / 2),
        _ => None,
    }
}

/// The arm64 L1 machine: TCG emulating EL2 (`virtualization=on`, `-cpu max` by default) with a GICv3, L1's console on
/// the PL011, the inner run's streams, output and status on virtio-serial ports (virtio-mmio).
fn aarch64_machine(cmd: &mut Command, console: &Path, trace_file: Option<&str>, status: &Path) {
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
}

/// The inner run's status from the arm64 L1's status port.
fn aarch64_status(status_file: &Path) -> Option<i32> {
    let text = fs::read_to_string(status_file).ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix(STATUS_PREFIX))
        .and_then(|v| v.parse().ok())
}

/// The static aarch64 hvprobe that is the arm64 L1's `/init`, wherever hvprobe was started
/// from: `$HVPROBE_AARCH64_BIN`; else, when hvprobe runs from its source tree, the workspace's
/// cross build, brought up to date with cargo run in the workspace (so that its
/// `.cargo/config.toml`, the cross linker and `+crt-static`, applies whatever the caller's
/// directory) and copied to the cache; else `hvprobe-aarch64` next to this binary (a packaged
/// install), the cross build beside a `target/release` binary, or the cached copy.
fn aarch64_hvprobe() -> Result<PathBuf, RunnerError> {
    if let Ok(p) = std::env::var("HVPROBE_AARCH64_BIN") {
        return Ok(PathBuf::from(p));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let cached = hvprobe_guest::cache_dir()
        .join("bin")
        .join(format!("hvprobe-aarch64-{}", env!("CARGO_PKG_VERSION")));
    if workspace.join(".cargo/config.toml").exists() {
        let built = build_aarch64_hvprobe(&workspace)?;
        // For an installed hvprobe of the same version, which has no source tree to build in;
        // copied only when the build is newer than the copy.
        let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        if modified(&cached) < modified(&built)
            && let Some(dir) = cached.parent()
            && fs::create_dir_all(dir).is_ok()
        {
            let _ = fs::copy(&built, &cached);
        }
        return Ok(built);
    }
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    let candidates = [
        dir.map(|d| d.join("hvprobe-aarch64")),
        dir.map(|d| d.join("../aarch64-unknown-linux-gnu/release/hvprobe")),
        Some(cached),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .ok_or_else(|| RunnerError::Prepare(AARCH64_MISSING.to_string()))
}

/// What to do when no aarch64 hvprobe can be found, in one line.
const AARCH64_MISSING: &str = "the arm64 runner needs the static aarch64 hvprobe: in hvprobe's source tree run `bash guest/setup-host.sh && cargo build --release --target aarch64-unknown-linux-gnu -p hvprobe-vmm`, then put target/aarch64-unknown-linux-gnu/release/hvprobe next to this binary as `hvprobe-aarch64` (or name it in $HVPROBE_AARCH64_BIN)";

/// Builds (or finds up to date) the workspace's static aarch64 hvprobe, with cargo run in the
/// workspace directory so that its cross-build configuration applies.
fn build_aarch64_hvprobe(workspace: &Path) -> Result<PathBuf, RunnerError> {
    let how = "cargo build --release --target aarch64-unknown-linux-gnu -p hvprobe-vmm";
    eprintln!("hvprobe: checking the aarch64 hvprobe for the arm64 runner ({how})");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            "aarch64-unknown-linux-gnu",
            "-p",
            "hvprobe-vmm",
            "--bin",
            "hvprobe",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status();
    let built = workspace.join("target/aarch64-unknown-linux-gnu/release/hvprobe");
    if out.is_ok_and(|s| s.success()) && built.is_file() {
        return Ok(built);
    }
    Err(RunnerError::Prepare(format!(
        "building the aarch64 hvprobe for the arm64 runner failed (`{how}` in {}; the cross toolchain comes from `bash guest/setup-host.sh`)",
        workspace.display()
    )))
}

/// CPUs of the emulated L1 machine: one, whatever the guest's vCPU count (the L2 vCPU threads
/// share it). With two emulated x86 L1 CPUs, QEMU's TCG nested SVM corrupts state now and then
/// under a stream of exits (L2 triple faults, L1 panics with a zeroed register file in
/// `error_entry`, or L1 resets silently; 10 of 23 two-vCPU probe runs), none of it in 10 runs
/// with one L1 CPU. docs/probing.md, "The runner's QEMU", has the figures.
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
            output: Some(l1_output_port(outer.guest_arch()).into()),
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
