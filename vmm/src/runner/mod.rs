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
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::job::{Job, RunnerChoice};
use crate::platform::platform;

pub mod aarch64;
mod l1image;
pub mod qemu_l2;
pub mod x86_64;

use l1image::{L1Image, L2KernelInfo, build_l1_initrd};

/// What the emulated runner of one guest architecture is made of (part of the architecture's
/// [`crate::platform::Platform`]): the rest of the runner is the same for all.
#[derive(Debug)]
pub struct RunnerPlatform {
    /// The emulator binary, or why this host has none for this architecture.
    pub emulator: fn() -> Result<String, RunnerError>,
    /// L1's `/init`: an hvprobe binary of this architecture, with the shared libraries it
    /// needs inside L1.
    pub l1_init: fn() -> Result<L1Init, RunnerError>,
    /// The QEMU CPU model by default (one that emulates hardware virtualization).
    pub default_cpu: &'static str,
    /// The L1 machine's QEMU arguments.
    pub machine: fn(&mut Command, &MachineFiles<'_>),
    /// The L1 port that carries the inner run's `--output` to the file named on the host.
    pub output_port: &'static str,
    /// The inner run's exit status, from the emulator's exit and the status file; `None` when
    /// L1 died without reporting.
    pub status: fn(std::process::ExitStatus, &Path) -> Option<i32>,
    /// What hvprobe as L1's `/init` does on this architecture ([`crate::l1init`]).
    pub l1: L1Side,
}

/// The L1 side of a runner: what `/init` in L1 does that depends on the architecture.
#[derive(Debug)]
pub struct L1Side {
    /// The ports that carry the inner run's standard streams, each with the standard
    /// descriptors it goes on, in order.
    pub relays: &'static [(&'static str, &'static [i32])],
    /// The ports appear only once the modules are loaded (virtio), not at boot (serial).
    pub ports_need_modules: bool,
    /// The modules to load, in order (file names in [`L1_MODULES_DIR`]).
    pub modules: fn() -> Vec<&'static str>,
    /// Reports the inner run's status to the host; L1 powers off after it.
    pub report_exit: fn(i32),
    /// The port that carries the host's live-session API connections (`--api-socket`).
    pub api_port: &'static str,
}

/// L1's `/init` binary and the shared libraries it needs inside L1.
#[derive(Debug)]
pub struct L1Init {
    /// The binary.
    pub exe: PathBuf,
    /// Its shared libraries (none for a static build).
    pub libs: Vec<PathBuf>,
}

/// The host files an L1 machine writes to.
#[derive(Debug)]
pub struct MachineFiles<'a> {
    /// L1's own console log.
    pub console: &'a Path,
    /// The inner run's `-o` file, QEMU-quoted, if any.
    pub trace: Option<&'a str>,
    /// Where the inner run's status goes (where it travels through a port).
    pub status: &'a Path,
    /// The socket QEMU listens on for the API channel (`--api-socket`), if any.
    pub api: Option<&'a Path>,
    /// `--disk`s: each image (QEMU-quoted) and whether it is read-only, passed to L1 as its
    /// virtio-blk disks, found there by serial number ([`L1_DISK_PREFIX`]).
    pub disks: &'a [(String, bool)],
}

/// How the inner run names L1's disk `N`: by its serial number, `hvl1-N`, which L1's
/// hvprobe turns into the `/dev/vd*` that has it (the order the kernel names disks in is
/// not the command line's).
pub const L1_DISK_PREFIX: &str = "/dev/disk/by-serial/hvl1-";

/// QEMU's `-drive` and `-device` for `--disk` number `index` (raw, never probed for a
/// format), on the virtio-blk device `device` (`virtio-blk-pci`, `virtio-blk-device`).
pub fn disk_args(device: &str, index: usize, path: &str, read_only: bool) -> [String; 4] {
    [
        "-drive".into(),
        format!(
            "file={path},if=none,id=hvdisk{index},format=raw,readonly={}",
            if read_only { "on" } else { "off" }
        ),
        "-device".into(),
        format!("{device},drive=hvdisk{index},serial=hvl1-{index}"),
    ]
}

/// The `/dev` node of the L1 disk named `path` ([`L1_DISK_PREFIX`]`N`): the block device
/// whose serial number under `sys_block` is `hvl1-N`; any other path as it is.
pub fn l1_disk_node(path: &str, sys_block: &Path) -> Option<PathBuf> {
    let serial = path.strip_prefix("/dev/disk/by-serial/")?;
    fs::read_dir(sys_block).ok()?.flatten().find_map(|e| {
        let s = fs::read_to_string(e.path().join("serial")).ok()?;
        (s.trim() == serial).then(|| Path::new("/dev").join(e.file_name()))
    })
}

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

/// The inner run's job: the same job, whole, with the runner fixed to the host KVM and the
/// guest's files and the output at their L1 paths.
pub fn inner_job(job: &Job) -> Job {
    let probing = job.looks_into_the_guest();
    Job {
        runner: RunnerChoice::Host,
        kernel: Some(PathBuf::from("/l2/vmlinuz")),
        initrd: job.initrd.as_ref().map(|_| PathBuf::from("/l2/initrd")),
        // Without probes too: it names where the vCPUs were if the run hits its time limit.
        system_map: job
            .system_map
            .as_ref()
            .map(|_| PathBuf::from(L1_SYSTEM_MAP)),
        btf: job
            .btf
            .as_ref()
            .filter(|_| probing)
            .map(|_| PathBuf::from(L1_BTF)),
        output: job
            .output
            .as_ref()
            .map(|_| PathBuf::from(platform(job.guest_arch()).runner.output_port)),
        summary_json: job
            .summary_json
            .as_ref()
            .map(|_| PathBuf::from(crate::summary::ON_STDERR)),
        // Probe files were read into `probes` on the host.
        probe_files: Vec::new(),
        // Stack files are written here, from the stacks in the inner run's summary.
        stacks: None,
        flamegraph: None,
        // The user's socket is on the host; L1's own is reached through the API port.
        api_socket: job
            .api_socket
            .as_ref()
            .map(|_| PathBuf::from(L1_API_SOCKET)),
        api_port: job
            .api_socket
            .as_ref()
            .map(|_| PathBuf::from(platform(job.guest_arch()).runner.l1.api_port)),
        // The images are L1's virtio-blk disks; shares have become disks on the host.
        disk: job
            .disk
            .iter()
            .enumerate()
            .map(|(i, d)| match crate::devices::virtio::DiskSpec::parse(d) {
                Ok(spec) => crate::devices::virtio::DiskSpec {
                    path: PathBuf::from(format!("{L1_DISK_PREFIX}{i}")),
                    ..spec
                }
                .to_arg(),
                Err(_) => d.clone(),
            })
            .collect(),
        share: Vec::new(),
        ..job.clone()
    }
}

/// The inner run's API socket inside L1.
pub const L1_API_SOCKET: &str = "/tmp/hvprobe-api.sock";

/// Where the guest kernel's BTF (the raw section, not the whole vmlinux) goes inside L1.
pub const L1_BTF: &str = "/l2/btf";

/// Where the guest kernel's unwind tables (taken from its vmlinux) go inside L1.
pub const L1_UNWIND: &str = "/l2/unwind";

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
    // `--disk`: checked and locked here, for the whole run, before anything boots (QEMU's own
    // image locks are fcntl locks, which another hvprobe's flock would not see).
    let specs = args
        .disk
        .iter()
        .map(|d| crate::devices::virtio::DiskSpec::parse(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RunnerError::Prepare(e.to_string()))?;
    let _disk_locks = crate::devices::virtio::open_disks(&specs)
        .map_err(|e| RunnerError::Prepare(e.to_string()))?;
    let disks: Vec<(String, bool)> = specs
        .iter()
        .map(|s| (s.path.display().to_string().replace(',', ",,"), s.read_only))
        .collect();
    let arch = args.guest_arch();
    let runner = platform(arch).runner;
    let qemu = (runner.emulator)()?;
    let l1 = hvprobe_guest::default_guest_for(arch)
        .map_err(|e| RunnerError::Prepare(format!("the L1 kernel: {e}")))?
        .kernel;
    let l2_kernel = args
        .kernel
        .as_deref()
        .ok_or_else(|| RunnerError::Prepare("no guest kernel".into()))?;
    let L1Init { exe, libs } = (runner.l1_init)()?;
    let image = L1Image {
        exe,
        libs,
        kernel: &l1,
        arch,
    };

    // Only the BTF section travels into L1: a vmlinux with debug info is hundreds of MiB.
    let probing = args.looks_into_the_guest();
    let btf = match (&args.btf, probing) {
        (Some(path), true) => {
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
    // The user's API socket is served here, on the host; first, so that a path that cannot
    // be served fails before anything boots.
    let api_listener = match &args.api_socket {
        Some(path) => {
            Some(crate::api::http::bind(path).map_err(|e| RunnerError::Prepare(e.to_string()))?)
        }
        None => None,
    };
    // Stacks: the unwind tables travel, and the inner run's summary comes back with the
    // stacks for the files named here.
    let unwind = match carried_unwind_tables(args) {
        Ok(t) => t,
        Err(e) => return Err(RunnerError::Prepare(e.to_string())),
    };
    let stack_files = args.stacks.is_some() || args.flamegraph.is_some();
    let work = std::env::temp_dir().join(format!("hvprobe-runner-{}", std::process::id()));
    fs::create_dir_all(&work).map_err(prep_err("creating a work directory"))?;
    let mut inner = inner_job(args);
    if unwind.is_some() {
        inner.unwind_tables = Some(L1_UNWIND.into());
    }
    if stack_files {
        inner.summary_json = Some(crate::summary::ON_STDERR.into());
    }
    if args.api_socket.is_some()
        && let Some(path) = &args.system_map
        && let Ok(text) = fs::read_to_string(path)
        && let Ok(map) = probe_core::symbols::SymbolMap::parse(&text)
    {
        // Listings in L1 name the functions the guest's kprobes refuse; vmlinux stays here.
        inner.kprobe_blacklist = args.kprobe_blacklist(&map).function_addresses();
    }
    let initrd = work.join("l1.cpio");
    let console = work.join("l1-console.log");
    let status_file = work.join("status");
    let api_channel = work.join("api.sock");
    build_l1_initrd(
        &initrd,
        &image,
        l2_kernel,
        args.initrd.as_deref(),
        &L2KernelInfo {
            system_map: args.system_map.as_deref(),
            btf: btf.as_deref(),
            unwind: unwind.as_deref(),
        },
        &inner,
    )?;

    let l1_mem = (args.memory + 512).max(1024);
    let mut cmd = Command::new(&qemu);
    (runner.machine)(
        &mut cmd,
        &MachineFiles {
            console: &console,
            trace: trace_file.as_deref(),
            status: &status_file,
            api: api_listener.as_ref().map(|_| api_channel.as_path()),
            disks: &disks,
        },
    );
    let cpu = args.runner_cpu.as_deref().unwrap_or(runner.default_cpu);
    cmd.args(["-cpu", cpu]);
    cmd.args(["-smp", &L1_CPUS.to_string(), "-m", &l1_mem.to_string()])
        .arg("-kernel")
        .arg(l1.vmlinuz())
        .arg("-initrd")
        .arg(&initrd)
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    // The emulator dies with this hvprobe, even by SIGKILL: an orphaned L1 would go on
    // running the guest (and writing its disks).
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a property of the child between fork and
    // exec; it allocates nothing and touches no lock.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| RunnerError::NoEmulator {
        qemu: qemu.clone(),
        detail: e.to_string(),
    })?;
    if let Some(listener) = api_listener {
        carry_api(listener, api_channel.clone());
    }
    let stderr_copy = child.stderr.take().map(|pipe| {
        let summary = args.summary_json.clone();
        let files = (args.stacks.clone(), args.flamegraph.clone());
        std::thread::spawn(move || relay_stderr(pipe, summary, files))
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
            let reported = (runner.status)(status, &status_file);
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
    if let Some(path) = &args.api_socket {
        let _ = fs::remove_file(path);
    }
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

/// Carries the clients of the user's API socket (`listener`) to the inner hvprobe, over the
/// channel QEMU serves at `channel` (a virtio-serial port in L1), once QEMU has created it.
fn carry_api(listener: std::os::unix::net::UnixListener, channel: PathBuf) {
    std::thread::spawn(move || {
        for _ in 0..600 {
            if let Ok(stream) = std::os::unix::net::UnixStream::connect(&channel)
                && let Ok(reader) = stream.try_clone()
            {
                crate::api::mux::serve_host(listener, reader, stream);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "hvprobe: the emulator never opened the API channel {}",
            channel.display()
        );
    });
}

/// CPUs of the emulated L1 machine: one, whatever the guest's vCPU count (the L2 vCPU threads
/// share it). With two emulated x86 L1 CPUs, QEMU's TCG nested SVM corrupts state now and then
/// under a stream of exits (L2 triple faults, L1 panics with a zeroed register file in
/// `error_entry`, or L1 resets silently; 10 of 23 two-vCPU probe runs), none of it in 10 runs
/// with one L1 CPU. docs/probing.md, "The runner's QEMU", has the figures.
const L1_CPUS: u32 = 1;

/// Copies the emulator's stderr (its own messages and the inner run's stderr) to ours, and
/// returns the last part of it for error reports.
fn relay_stderr(
    pipe: std::process::ChildStderr,
    summary: Option<PathBuf>,
    (stacks, flamegraph): (Option<PathBuf>, Option<PathBuf>),
) -> String {
    use std::io::BufRead;
    let mut kept = Vec::new();
    let mut reader = io::BufReader::new(pipe);
    let mut line = Vec::new();
    let mut out = io::stderr();
    while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
        let text = String::from_utf8_lossy(&line);
        // The inner run's summary: to the file named on the host, not to the user.
        if let Some(json) = text.trim_end().strip_prefix(crate::summary::STDERR_PREFIX) {
            if (stacks.is_some() || flamegraph.is_some())
                && let Err(e) = write_stack_files(json, stacks.as_deref(), flamegraph.as_deref())
            {
                let _ = writeln!(out, "hvprobe: {e}");
            }
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

/// The unwind tables the inner run needs when the probes ask for stacks, from the vmlinux
/// `--btf` names (a live session's later definitions may ask: taken when they can be).
fn carried_unwind_tables(args: &Job) -> Result<Option<Vec<u8>>, crate::stacks::StackError> {
    if !args.wants_stacks() {
        return Ok(None);
    }
    let map = args
        .system_map
        .as_ref()
        .and_then(|p| fs::read_to_string(p).ok())
        .and_then(|t| probe_core::symbols::SymbolMap::parse(&t).ok());
    let Some(map) = map else {
        return Ok(None);
    };
    match crate::stacks::read_tables(None, args.btf.as_deref(), &map) {
        Ok(t) => Ok(Some(t.to_bytes())),
        Err(_) if !args.asks_for_stacks() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `--stacks` and `--flamegraph` from the stacks in the inner run's summary.
fn write_stack_files(
    summary_json: &str,
    stacks: Option<&Path>,
    flamegraph: Option<&Path>,
) -> Result<(), crate::stacks::StackError> {
    let summary: crate::summary::RunSummary = serde_json::from_str(summary_json)
        .map_err(|e| crate::stacks::StackError::Tables(format!("the inner run's summary: {e}")))?;
    crate::stacks::write_files(&summary.stacks, stacks, flamegraph)
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
            "--disk",
            "/images/a.img,ro",
            "--disk",
            "/images/b.img,at=/data",
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
            output: Some(platform(outer.guest_arch()).runner.output_port.into()),
            summary_json: Some(crate::summary::ON_STDERR.into()),
            runner: RunnerChoice::Host,
            disk: vec![
                format!("{L1_DISK_PREFIX}0,ro"),
                format!("{L1_DISK_PREFIX}1,at=/data"),
            ],
            ..outer.clone()
        };
        assert_eq!(inner, expected);
        assert_eq!(
            outer.guest_mounts().as_deref(),
            Some("0 ro /mnt\n1 rw /data\n")
        );
        assert_eq!(
            disk_args("virtio-blk-pci", 1, "/images/a,,b.img", true),
            [
                "-drive",
                "file=/images/a,,b.img,if=none,id=hvdisk1,format=raw,readonly=on",
                "-device",
                "virtio-blk-pci,drive=hvdisk1,serial=hvl1-1"
            ]
        );
        // In L1, a disk is the block device with its serial number.
        let sys = std::env::temp_dir().join(format!("hvprobe-sysblock-{}", std::process::id()));
        for (dev, serial) in [("vda", "hvl1-1\n"), ("vdb", "hvl1-0\n")] {
            fs::create_dir_all(sys.join(dev)).unwrap();
            fs::write(sys.join(dev).join("serial"), serial).unwrap();
        }
        assert_eq!(
            l1_disk_node(&format!("{L1_DISK_PREFIX}0"), &sys),
            Some(PathBuf::from("/dev/vdb"))
        );
        assert_eq!(l1_disk_node(&format!("{L1_DISK_PREFIX}2"), &sys), None);
        fs::remove_dir_all(&sys).unwrap();
        assert_eq!(inner.effective_cmdline(), outer.effective_cmdline());
        // Without probes, neither System.map nor BTF travels.
        let plain = Wrap::parse_from(["x", "--kernel", "/k", "--btf", "/b"]).job;
        let inner = inner_job(&plain);
        assert_eq!(
            (inner.system_map, inner.btf, inner.initrd),
            (None, None, None)
        );
    }
}
