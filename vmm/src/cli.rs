//! The `hvprobe` command line. Kept in the library so that the emulated runner's L1 `/init`
//! (which is hvprobe itself) can run the same code in-process.

use crate::arch::VmmArch;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use probe_core::definition::{ProbeDefinition, ProbeKind};
use probe_core::engine::PlantTarget;
use probe_core::guest_kprobes::KprobeTableLayout;
use probe_core::jump::{GuestAnchors, TaskOffsets};
use probe_core::probe::{ProbeContext, TrapKind};
use probe_core::protect::{ProtectError, ProtectRequest, ProtectSpec};
use probe_core::task::TaskLayout;
use probe_core::xol::XolArea;

use crate::api::events::EventHub;
use crate::handlers::{HandlerWiring, LiveProbes};
use crate::hostcheck;
use crate::job::PlanChoice;
pub use crate::job::{
    DEFAULT_EXEC_TIMEOUT_SECS, Job, ResolvedProbe, ResolvedProbes, RunnerChoice, TrapChoice,
    read_btf,
};
use crate::machine::ApiSetup;
use crate::machine::{
    self, IntegrityRegions, JumpSetup, Outcome, ProbeReport, ProbeSetup, RunOptions, RunReport,
};
use crate::output::TraceOutput;
use crate::refusal::{RefusedProbe, refusal_list};
use crate::report::RetvalHistogram;
use crate::runner;
use crate::selftest::{self, TrapSupport};
use crate::stacks::{self, StackWiring};
use crate::summary::StackCount;
use crate::summary::{self, RunSummary};
use crate::vm::VmConfig;
use probe_core::symbols::SymbolMap;
use probe_core::unwind::folded::FoldedStacks;

/// Exit status when the host cannot run the job (no usable KVM and no emulated runner).
pub const EXIT_HOST_UNUSABLE: i32 = 2;
pub use crate::machine::EXIT_GUEST_FAILED;

/// `hvprobe --version`: the package version and the fingerprint of the sources it was built
/// from (`vmm/build.rs`), by which the arm64 runner knows its aarch64 build is current.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (sources ",
    env!("HVPROBE_SOURCE_HASH"),
    ")"
);

/// hvprobe: out-of-guest kernel probes on a KVM VMM.
#[derive(Debug, Parser)]
#[command(name = "hvprobe", version = VERSION, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest kernel and run it to the end.
    Run(Box<Job>),
    /// Run a job given as JSON (how the emulated runner starts the hvprobe inside L1).
    #[command(hide = true)]
    RunJob {
        /// The job file.
        file: PathBuf,
    },
    /// Boot a job's guest under QEMU instead (`--l2-qemu`: the emulated runner's L1 does).
    #[command(hide = true)]
    L2Qemu {
        /// The job file.
        file: PathBuf,
    },
    /// Say whether this host's KVM can run and debug a stock guest, in one line; with
    /// `--arch` of another architecture, the KVM inside its emulated runner.
    CheckHost {
        /// The guest architecture to check for [default: the host's].
        #[arg(long, value_enum)]
        arch: Option<hvprobe_guest::GuestArch>,
    },
    /// Fetch and build the default guest (Debian cloud kernel + initramfs); print its files.
    Guest {
        /// The guest's architecture [default: the host's].
        #[arg(long, value_enum)]
        arch: Option<hvprobe_guest::GuestArch>,
        #[command(subcommand)]
        what: Option<GuestPart>,
    },
    /// List the guest kernel's functions matching PATTERN (a glob: `vfs_*`), each with what a
    /// probe on it meets: those the guest's own kprobes refuse (which hvprobe probes) and
    /// those hvprobe refuses, with the reason. From the guest's System.map and vmlinux, or a
    /// running VM's (`--api-socket`).
    List {
        /// The glob [default: every function].
        #[arg(default_value = "*")]
        pattern: String,
        /// The guest's architecture [default: the host's].
        #[arg(long, value_enum)]
        arch: Option<hvprobe_guest::GuestArch>,
        /// System.map of the guest kernel [default: the default guest's].
        #[arg(long, value_name = "PATH")]
        system_map: Option<PathBuf>,
        /// The guest kernel's vmlinux, for its kprobe blacklist [default: the default guest's].
        #[arg(long, value_name = "PATH")]
        vmlinux: Option<PathBuf>,
        /// Ask a running hvprobe instead.
        #[arg(long, value_name = "PATH")]
        api_socket: Option<PathBuf>,
        /// One JSON object per function.
        #[arg(long)]
        json: bool,
    },
    /// Add, list or remove probes of a running VM (`hvprobe run --api-socket PATH`).
    Probe {
        #[command(subcommand)]
        action: crate::clients::ProbeAction,
    },
    /// Stream the running VM's events from now on, as `hvprobe run` prints them.
    Trace {
        /// The running hvprobe's API socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// One JSON object per event.
        #[arg(long)]
        json: bool,
        /// Only these events (`group/event`, or a bare probe's location) [default: all].
        events: Vec<String>,
    },
    /// The running VM's exit counts, per vCPU, and the vCPU pauses of its changes.
    Stats {
        /// The running hvprobe's API socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// The reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare the running VM's kernel text, read-only data, syscall table and protection
    /// settings with their state when its `/init` started (hvprobe's own probes left out);
    /// exit status 0 when nothing changed, 1 otherwise.
    Integrity {
        /// The running hvprobe's API socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
        /// The reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove every probe of the running VM and check its kernel text is as before the first
    /// probe; the VM keeps running.
    Detach {
        /// The running hvprobe's API socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
    },
    /// Stop the running VM (its probes removed first, as at the end of any run).
    Stop {
        /// The running hvprobe's API socket.
        #[arg(long, value_name = "PATH")]
        api_socket: PathBuf,
    },
}

/// What of a guest `hvprobe guest` builds besides the default guest.
#[derive(Debug, Subcommand)]
enum GuestPart {
    /// Build (or find cached) the Debian 12 root file system that `hvprobe run --rootfs`
    /// boots: debootstrap's first stage on the host, its second stage in a guest; print the
    /// image's path. Needs root the first time.
    Rootfs {
        /// The guest's architecture [default: the host's].
        #[arg(long, value_enum)]
        arch: Option<hvprobe_guest::GuestArch>,
    },
}

/// Runs hvprobe with `args` (without the program name) and returns the process exit status.
pub fn main_with_args<I, S>(args: I) -> i32
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(
        std::iter::once("hvprobe".into()).chain(args.into_iter().map(Into::into)),
    ) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hvprobe: {e:#}");
            1
        }
    }
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::CheckHost { arch } => {
            let arch = arch.unwrap_or_else(hvprobe_guest::GuestArch::host);
            if arch == hvprobe_guest::GuestArch::host() {
                return Ok(check_host_here());
            }
            // Another architecture: its emulated runner, which runs this check inside.
            let job = Job {
                arch: Some(arch),
                check_host: true,
                ..Job::empty()
            };
            let job = job.resolve_guest()?;
            Ok(runner::run_emulated(&job)?)
        }
        Command::Guest {
            what: Some(GuestPart::Rootfs { arch }),
            ..
        } => {
            let arch = arch.unwrap_or_else(hvprobe_guest::GuestArch::host);
            let image = crate::rootfs::cached_image(arch, run_for_rootfs)?;
            println!("rootfs {}", image.display());
            Ok(0)
        }
        Command::Guest { arch, what: None } => {
            let arch = arch.unwrap_or_else(hvprobe_guest::GuestArch::host);
            let g = hvprobe_guest::default_guest_for(arch)?;
            println!("kernel-package {} {}", g.kernel.package, g.kernel.version);
            println!("vmlinuz {}", g.kernel.vmlinuz().display());
            println!("system-map {}", g.kernel.system_map().display());
            println!("vmlinux {}", g.kernel.vmlinux().display());
            println!("initrd {}", g.initrd.display());
            Ok(0)
        }
        Command::Run(args) => run(&args),
        Command::Probe { action } => crate::clients::probe(action),
        Command::List {
            pattern,
            arch,
            system_map,
            vmlinux,
            api_socket,
            json,
        } => {
            let functions = match api_socket {
                Some(socket) => crate::clients::functions(&socket, &pattern)?,
                None => {
                    let job = Job {
                        arch,
                        system_map: system_map.clone(),
                        btf: vmlinux,
                        kernel: system_map.map(|_| PathBuf::new()),
                        ..Job::empty()
                    };
                    let job = job.resolve_guest()?;
                    let path = job.system_map.clone().context("--system-map")?;
                    let map = probe_core::symbols::SymbolMap::parse(
                        &std::fs::read_to_string(&path)
                            .with_context(|| format!("reading {}", path.display()))?,
                    )
                    .with_context(|| format!("parsing {}", path.display()))?;
                    let blacklist = job.kprobe_blacklist(&map);
                    probe_core::catalog::functions(&map, &pattern, &blacklist).collect()
                }
            };
            Ok(crate::clients::print_functions(&functions, &pattern, json))
        }
        Command::Trace {
            api_socket,
            json,
            events,
        } => crate::clients::trace(&api_socket, json, &events),
        Command::Stats { api_socket, json } => crate::clients::stats(&api_socket, json),
        Command::Integrity { api_socket, json } => crate::clients::integrity(&api_socket, json),
        Command::Detach { api_socket } => crate::clients::detach(&api_socket),
        Command::Stop { api_socket } => crate::clients::stop(&api_socket),
        Command::RunJob { file } => run(&l1_job(&file)?),
        Command::L2Qemu { file } => {
            let job = l1_job(&file)?;
            let kernel = job.kernel.clone().context("the job has no kernel")?;
            Ok(runner::qemu_l2::run(&job, &kernel, job.initrd.as_deref())?)
        }
    }
}

/// The inner job of the emulated runner, as L1 reads it: its ports and disks named as L1's
/// kernel found them.
fn l1_job(file: &Path) -> Result<Job> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the job {}", file.display()))?;
    let mut job: Job = serde_json::from_str(&text)
        .with_context(|| format!("parsing the job {}", file.display()))?;
    // The runner names L1's ports as if the console were the first virtio device.
    for port in [&mut job.output, &mut job.api_port].into_iter().flatten() {
        *port = crate::l1init::port_node(&port.to_string_lossy(), Path::new("/dev"));
    }
    // And its disks by serial number, once the driver has found them.
    for d in &mut job.disk {
        let Ok(spec) = crate::devices::virtio::DiskSpec::parse(d) else {
            continue;
        };
        let name = spec.path.to_string_lossy().into_owned();
        if !name.starts_with(runner::L1_DISK_PREFIX) {
            continue;
        }
        let node = (0..100)
            .find_map(|_| {
                let n = runner::l1_disk_node(&name, Path::new("/sys/block"));
                if n.is_none() {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                n
            })
            .with_context(|| format!("L1 has no disk with serial number {name}"))?;
        *d = crate::devices::virtio::DiskSpec { path: node, ..spec }.to_arg();
    }
    Ok(job)
}

/// Checks this host's KVM and prints the one-line verdict; the exit status says whether it is
/// usable.
fn check_host_here() -> i32 {
    let arch = hvprobe_guest::GuestArch::host();
    match hostcheck::check_host() {
        Ok(facts) => {
            let traps = kvm_ioctls::Kvm::new()
                .map_err(|e| e.to_string())
                .and_then(|kvm| selftest::probe_traps(&kvm))
                .map(|t| t.summary())
                .unwrap_or_else(|e| format!("trap self-test failed: {e}"));
            println!(
                "hvprobe: host KVM is usable for {arch} guests (guest-debug flags {:#x}, sync regs {}; {traps})",
                facts.guest_debug_flags, facts.sync_regs
            );
            0
        }
        Err(e) => {
            println!("hvprobe: host KVM cannot run hvprobe guests: {e}");
            EXIT_HOST_UNUSABLE
        }
    }
}

fn run(args: &Job) -> Result<i32> {
    if args.check_host && args.native() {
        return Ok(check_host_here());
    }
    let mut args = args.clone();
    args.read_probe_files()?;
    let args = &args;
    args.validate()?;
    let on_host = match args.runner {
        RunnerChoice::Host if !args.native() => bail!(
            "--runner host cannot run an {} guest on this {} host; use --runner auto or emulated",
            args.guest_arch(),
            hvprobe_guest::GuestArch::host()
        ),
        RunnerChoice::Auto if !args.native() => false,
        RunnerChoice::Host => match hostcheck::check_host() {
            Ok(_) => true,
            Err(e) => {
                eprintln!("hvprobe: host KVM cannot run hvprobe guests: {e}");
                return Ok(EXIT_HOST_UNUSABLE);
            }
        },
        RunnerChoice::Emulated => false,
        RunnerChoice::Auto => match hostcheck::check_host() {
            Ok(_) => true,
            Err(e) => {
                eprintln!(
                    "hvprobe: host KVM cannot run hvprobe guests ({e}); using the emulated KVM runner"
                );
                false
            }
        },
    };
    if on_host && args.l2_qemu {
        bail!("--l2-qemu runs QEMU inside the emulated runner: add --runner emulated");
    }
    let args = args.resolve_guest()?;
    // `--rootfs` becomes the first disk (a copy of the cached image, removed at the end).
    let (args, _root_copy) = crate::rootfs::attach(&args, |arch| {
        crate::rootfs::cached_image(arch, run_for_rootfs)
    })?;
    // `--share`s become read-only disks, packed now and removed when the run ends.
    let (args, _shares) = crate::share::pack_shares(&args)?;
    // Unknown symbols and bad syntax end the run here, before any VM starts; so does a
    // region `--protect` cannot take (whatever `--skip-refused` says: a region left out
    // would leave memory unwatched that the user thinks is protected).
    if let Some(resolved) = args.resolve_probes()? {
        let protect = protect_refusals(&args, &resolved.map);
        if !protect.is_empty() || (!resolved.refused.is_empty() && !args.skip_refused) {
            let mut refused = resolved.refused;
            refused.extend(protect);
            return refused_before_run(&args, refused);
        }
    }
    if !on_host {
        return runner::run_emulated(&args).map_err(Into::into);
    }
    run_on_host(&args)
}

/// Runs the job that builds the root file system's second stage, as `hvprobe run` would.
fn run_for_rootfs(job: &Job) -> std::result::Result<i32, String> {
    run(job).map_err(|e| format!("{e:#}"))
}

/// Ends a run whose probes were refused at resolution: names each on stderr, writes the
/// summary (outcome `probe-refused`, the refusals) when one is asked for, and returns the
/// refusal's exit status. No VM was started.
fn refused_before_run(args: &Job, refused: Vec<RefusedProbe>) -> Result<i32> {
    let list = refusal_list(&refused);
    eprintln!("hvprobe: {list}");
    eprintln!("hvprobe: no VM was started");
    let report = RunReport {
        outcome: Outcome::ProbeRefused(list),
        boot_to_init: None,
        boot_to_autorun: None,
        run_time: std::time::Duration::ZERO,
        console_tail: Vec::new(),
        faults_with_probes: Vec::new(),
        probes: Some(ProbeReport {
            refused,
            ..ProbeReport::default()
        }),
    };
    let code = report.outcome.exit_code();
    if let Some(path) = &args.summary_json {
        write_summary(path, &RunSummary::new(&report, code))?;
    }
    Ok(code)
}

/// XOL code pages reserved for a run with probes (128 slots a page; a jump plan's trampoline
/// takes about 1.3 KiB); the jump plan's rings may take the rest of the 512 pages the area's
/// page table maps ([`crate::job::RING_PAGES`]).
const XOL_PAGES: usize = 512 - crate::job::RING_PAGES as usize;

/// What hardware-breakpoint probes cost the guest, said once at start: KVM loads either the
/// host's debug registers or the guest's, never both.
const HW_TRAPS_SHADOW_GUEST_DEBUG: &str = "hvprobe: hardware-breakpoint probes: the guest's own hardware breakpoints and watchpoints are silent while they are in (KVM loads the host's debug registers in place of the guest's)";

/// Picks the trap kind from the user's choice and what the self-test found.
fn choose_trap(choice: TrapChoice, support: &TrapSupport, probes: usize) -> Result<TrapKind> {
    let summary = support.summary();
    let int3 = support.software.is_ok() && support.single_step.is_ok();
    match choice {
        TrapChoice::Int3 if int3 => Ok(TrapKind::Software),
        TrapChoice::Int3 => {
            bail!("--trap int3: this KVM does not deliver what int3 probes need: {summary}")
        }
        TrapChoice::Hw if support.hardware.is_ok() => {
            eprintln!("{HW_TRAPS_SHADOW_GUEST_DEBUG}");
            Ok(TrapKind::Hardware)
        }
        TrapChoice::Hw => {
            bail!("--trap hw: this KVM does not deliver hardware breakpoints: {summary}")
        }
        TrapChoice::Auto if int3 => Ok(TrapKind::Software),
        TrapChoice::Auto
            if support.hardware.is_ok()
                && probes <= <crate::arch::Guest as probe_core::arch::Arch>::MAX_HW_BREAKPOINTS =>
        {
            eprintln!("{HW_TRAPS_SHADOW_GUEST_DEBUG}");
            Ok(TrapKind::Hardware)
        }
        TrapChoice::Auto => bail!("this KVM cannot run {probes} probe(s): {summary}"),
    }
}

/// The guest kernel's BTF, parsed, when `--btf` (or the default guest) gives it.
fn guest_btf(args: &Job) -> Option<Result<probe_core::btf::Btf>> {
    let path = args.btf.as_ref()?;
    Some(read_btf(path).and_then(|data| {
        probe_core::btf::Btf::parse(&data)
            .with_context(|| format!("parsing BTF from {}", path.display()))
    }))
}

/// The stack unwinder of a run whose probes ask for stacks (an error if they cannot have
/// them); for a live session, where definitions may ask later, only if the kernel allows.
fn stack_wiring(
    args: &Job,
    btf: Option<&Result<probe_core::btf::Btf>>,
    map: &Arc<SymbolMap>,
) -> Result<Option<Arc<StackWiring>>> {
    if !args.wants_stacks() {
        return Ok(None);
    }
    let asked = args.asks_for_stacks();
    let made = (|| -> Result<StackWiring> {
        let btf = btf
            .context("stack traces need the guest kernel's BTF (--btf)")?
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let tables = stacks::read_tables(args.unwind_tables.as_deref(), args.btf.as_deref(), map)?;
        Ok(StackWiring {
            unwinder: stacks::unwinder(&tables, btf, map)?,
            all: args.stack,
            folded: Arc::new(FoldedStacks::new()),
            map: map.clone(),
        })
    })();
    match made {
        Ok(w) => Ok(Some(Arc::new(w))),
        Err(e) if asked => Err(e),
        Err(e) => {
            eprintln!(
                "hvprobe: no kernel stack traces (live-session definitions and protected writes go without): {e:#}"
            );
            Ok(None)
        }
    }
}

/// Builds the probes of a run: resolution, trap choice, handlers.
fn probe_setup(
    args: &Job,
    kvm: &kvm_ioctls::Kvm,
    output: &Arc<TraceOutput>,
    hub: Option<&Arc<EventHub>>,
    hists: &mut Vec<Arc<RetvalHistogram>>,
    folded: &mut Option<Arc<FoldedStacks>>,
) -> Result<Option<ProbeSetup>> {
    let Some(ResolvedProbes {
        map,
        targets,
        refused,
    }) = args.resolve_probes()?
    else {
        return Ok(None);
    };
    if !refused.is_empty() && !args.skip_refused {
        bail!("{}", refusal_list(&refused));
    }
    for r in &refused {
        eprintln!("hvprobe: skipped refused probe: {r}");
    }
    let support = selftest::probe_traps(kvm).map_err(|e| anyhow::anyhow!("trap self-test: {e}"))?;
    let trap = choose_trap(args.trap, &support, targets.len())?;
    let returns = targets.iter().any(|t| {
        t.definition
            .as_ref()
            .is_some_and(|d| matches!(d.kind, ProbeKind::Return { .. }))
    });
    if returns && support.software.is_err() {
        bail!(
            "return probes need int3 exits (their trampoline is an int3), which this KVM does not deliver: {}",
            support.summary()
        );
    }
    eprintln!(
        "hvprobe: trap self-test: {}; probes use {}",
        support.summary(),
        match trap {
            TrapKind::Software => crate::arch::Host::BREAKPOINT_NAME,
            TrapKind::Hardware => "hardware breakpoints",
        }
    );
    let btf = guest_btf(args);
    let protected = protect_targets(&args.protect, &map)?;
    let task = if targets.iter().any(|t| t.definition.is_some()) || !protected.is_empty() {
        let btf = btf
            .as_ref()
            .context("task awareness needs the guest kernel's BTF (--btf)")?
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let layout = TaskLayout::from_kernel::<crate::arch::Guest>(btf, &map)
            .context("finding the current task in the guest kernel")?;
        Some(Arc::new(layout))
    } else if args.api_socket.is_some() {
        // Definitions may come later, through the API: task awareness where BTF allows.
        btf.as_ref()
            .and_then(|b| b.as_ref().ok())
            .and_then(|btf| TaskLayout::from_kernel::<crate::arch::Guest>(btf, &map).ok())
            .map(Arc::new)
    } else {
        None
    };
    // The guest's own kprobes, so that the boundary walk can read through them; without BTF
    // an int3 that may cover an instruction stops the walk instead.
    let guest_kprobes = match btf.as_ref().map(|b| {
        b.as_ref()
            .map_err(|e| format!("{e:#}"))
            .and_then(|b| KprobeTableLayout::from_kernel(b, &map).map_err(|e| e.to_string()))
    }) {
        Some(Ok(layout)) => Some(layout),
        Some(Err(e)) => {
            eprintln!(
                "hvprobe: the guest's kprobes cannot be located ({e}); probes past an int3 that may be one are refused"
            );
            None
        }
        None => None,
    };
    let map = Arc::new(map);
    let stacks = stack_wiring(args, btf.as_ref(), &map)?;
    *folded = stacks.as_ref().map(|s| s.folded.clone());
    let slide = Arc::new(AtomicU64::new(0));
    let jump = match args.plan {
        PlanChoice::Exit => None,
        PlanChoice::Auto => {
            let records = args.ring_records().map_err(|e| anyhow::anyhow!(e))?;
            let b = btf.as_ref().and_then(|b| b.as_ref().ok());
            Some(JumpSetup {
                records,
                anchors: guest_anchors(&map, b, task.as_deref()),
                excluded: jump_excluded(&map),
            })
        }
    };
    let wiring = HandlerWiring {
        trap,
        jump: jump.is_some(),
        print: !args.quiet,
        json: args.json,
        hist: args.hist,
        map: map.clone(),
        task,
        slide: slide.clone(),
        output: output.clone(),
        hub: hub.cloned(),
        stacks,
    };
    let mut requests: Vec<machine::ProbeRequest> = targets
        .into_iter()
        .map(|resolved| wiring.request(resolved, hists))
        .collect();
    for (mut resolved, spec) in protected {
        // A protected write carries its writer's stack, which names a text patcher.
        if let Some(def) = &mut resolved.definition {
            def.stacktrace = wiring.stacks.is_some();
        }
        let mut req = wiring.request(resolved, hists);
        req.probe.protect = Some(spec);
        req.probe.in_guest = false;
        req.probe.record_filter = None;
        requests.push(req);
    }
    let text = match (map.lookup("_stext"), map.lookup("_etext")) {
        (Ok(s), Ok(e)) => Some((s.addr, e.addr)),
        _ => None,
    };
    // With the API, a baseline for checks on demand; reported at the end with --integrity.
    let integrity = (args.integrity || args.api_socket.is_some()).then(|| IntegrityRegions {
        at_end: args.integrity,
        rodata: match (map.lookup("__start_rodata"), map.lookup("__end_rodata")) {
            (Ok(s), Ok(e)) => Some((s.addr, e.addr)),
            _ => None,
        },
        syscall_table: map
            .lookup("sys_call_table")
            .ok()
            .and_then(|s| Some((s.addr, map.size_of(s)? as usize / 8))),
        symbols: map.clone(),
    });
    let protect_exemption =
        protect_exemption(&args.protect_allow, &map, wiring.stacks.as_ref(), &slide)?;
    Ok(Some(ProbeSetup {
        protect_exemption,
        requests,
        integrity,
        text,
        xol_pages: XOL_PAGES,
        code_window: match (map.lookup("__init_begin"), map.lookup("__init_end")) {
            (Ok(b), Ok(e)) => Some((b.addr, e.addr)),
            _ => None,
        },
        kaslr_anchors: crate::arch::Host::KASLR_ANCHOR
            .linked_addresses(|sym| map.lookup(sym).ok().map(|s| s.addr)),
        exception_table: match (
            map.lookup("__start___ex_table"),
            map.lookup("__stop___ex_table"),
        ) {
            (Ok(s), Ok(e)) => Some((s.addr, e.addr)),
            _ => None,
        },
        patched_text: [
            (
                "__start___jump_table",
                "__stop___jump_table",
                probe_core::patched_text::JUMP_ENTRY_SIZE,
                "a jump label (static key) site",
            ),
            (
                "__start_static_call_sites",
                "__stop_static_call_sites",
                probe_core::patched_text::STATIC_CALL_SITE_SIZE,
                "a static call site",
            ),
        ]
        .into_iter()
        .filter_map(|(s, e, size, what)| {
            Some((
                map.lookup(s).ok()?.addr,
                map.lookup(e).ok()?.addr,
                size,
                what,
            ))
        })
        .collect(),
        user_return: crate::arch::Host::USER_RETURN_SYMBOL
            .and_then(|sym| map.lookup(sym).ok())
            .map(|s| s.addr),
        kernel_root: crate::arch::Host::KERNEL_ROOT_SYMBOL
            .and_then(|sym| map.lookup(sym).ok())
            .map(|s| s.addr),
        slide,
        skip_refused: args.skip_refused,
        refused,
        traps: (support, trap),
        source: args.api_socket.as_ref().map(|_| {
            Box::new(LiveProbes {
                wiring: wiring.clone(),
                arch: args.guest_arch(),
                max_probes: args.max_probes,
                blacklist: Arc::new(args.kprobe_blacklist(&map)),
            }) as Box<dyn machine::ProbeSource>
        }),
        max_rate: args.max_rate,
        guest_kprobes,
        jump,
    }))
}

/// What `--protect` and `--protect-allow` name that cannot be had, as refusals at resolution.
fn protect_refusals(args: &Job, map: &SymbolMap) -> Vec<RefusedProbe> {
    let mut out = Vec::new();
    if let Err(e) = protect_targets(&args.protect, map) {
        let spec = match e.downcast_ref::<ProtectError>() {
            Some(ProtectError::Overlap { second, .. }) => format!("--protect {second}"),
            Some(
                ProtectError::Syntax { spec, .. }
                | ProtectError::UnknownSymbol { spec, .. }
                | ProtectError::Empty { spec }
                | ProtectError::Refused { spec, .. },
            ) => format!("--protect {spec}"),
            None => "--protect".to_string(),
        };
        let full = format!("{e:#}");
        let reason = full
            .strip_prefix(&format!("{spec}: "))
            .unwrap_or(&full)
            .to_string();
        out.push(RefusedProbe::at_resolution(spec, reason));
    }
    for f in &args.protect_allow {
        if !map.lookup(f).is_ok_and(|s| s.is_text()) {
            out.push(RefusedProbe::at_resolution(
                format!("--protect-allow {f}"),
                format!("no function `{f}` in System.map"),
            ));
        }
    }
    out
}

/// The `--protect-allow` functions as the engine's exemption: a write whose writer has one
/// of them on its kernel stack. Each must be a function System.map lists, and stacks must be
/// available.
fn protect_exemption(
    allowed: &[String],
    map: &SymbolMap,
    stacks: Option<&Arc<StackWiring>>,
    slide: &Arc<AtomicU64>,
) -> Result<Option<machine::ProtectExemption>> {
    if allowed.is_empty() {
        return Ok(None);
    }
    for f in allowed {
        if !map.lookup(f).is_ok_and(|s| s.is_text()) {
            bail!("--protect-allow {f}: no function `{f}` in System.map");
        }
    }
    let stacks = stacks
        .context("--protect-allow needs the writer's kernel stack (the guest's vmlinux, --btf)")?
        .clone();
    let allowed: Vec<String> = allowed.to_vec();
    let map = Arc::new(map.clone());
    let slide = slide.clone();
    Ok(Some(Arc::new(move |ctx: &ProbeContext<'_>| {
        let slide = slide.load(std::sync::atomic::Ordering::Relaxed);
        let trace = stacks.unwinder.unwind(ctx, slide);
        trace.symbolized(&map, slide).iter().any(|f| {
            allowed
                .iter()
                .any(|a| probe_core::protect::frame_function(f) == a)
        })
    })))
}

/// The `--protect` regions resolved against System.map, each as a probe target with its spec
/// (event `hv/protect`). Refused before any VM starts: a region that does not parse, an
/// unknown symbol, an empty region, one whose pages hold page tables or kvmclock pages, two
/// regions sharing bytes.
fn protect_targets(specs: &[String], map: &SymbolMap) -> Result<Vec<(ResolvedProbe, ProtectSpec)>> {
    let mut out = Vec::new();
    let mut ranges = Vec::new();
    for text in specs {
        let req = ProtectRequest::parse(text)?;
        let (start, len) = req.resolve(map)?;
        if let Some((symbol, why)) = probe_core::protect::refused_overlap(map, start, len) {
            return Err(ProtectError::Refused {
                spec: req.spec.clone(),
                symbol: symbol.to_string(),
                why,
            }
            .into());
        }
        ranges.push((req.spec.clone(), start, len));
        if let Some((first, second)) = probe_core::protect::overlap(&ranges) {
            return Err(ProtectError::Overlap {
                first: first.to_string(),
                second: second.to_string(),
            }
            .into());
        }
        let place = map.describe(start);
        let definition = ProbeDefinition::parse(&format!("p:hv/protect {place}"))
            .map_err(|e| anyhow::anyhow!("--protect {text}: {e}"))?;
        out.push((
            ResolvedProbe {
                spec: format!("--protect {}", req.spec),
                location: req.spec.clone(),
                target: PlantTarget {
                    va: start,
                    function_start: None,
                },
                definition: Some(definition),
            },
            ProtectSpec {
                len,
                action: req.action,
            },
        ));
    }
    Ok(out)
}

/// Kernel text no jump goes into: entry code (it runs before `swapgs` loads the kernel's
/// per-CPU base, and on the user's page tables under PTI, where hvprobe's pages are not
/// mapped), noinstr and cpuidle text (no instrumentation allowed there, as the guest's own
/// kprobes refuse it). Probes there take exits.
fn jump_excluded(map: &SymbolMap) -> Vec<(u64, u64, &'static str)> {
    [
        (
            "__entry_text_start",
            "__entry_text_end",
            "entry code runs before the kernel's per-CPU base is loaded",
        ),
        (
            "__noinstr_text_start",
            "__noinstr_text_end",
            "noinstr text allows no instrumentation",
        ),
        (
            "__cpuidle_text_start",
            "__cpuidle_text_end",
            "cpuidle text allows no instrumentation",
        ),
        (
            "__idmap_text_start",
            "__idmap_text_end",
            "identity-mapped text runs with the MMU off or on other page tables",
        ),
        (
            "__hyp_idmap_text_start",
            "__hyp_idmap_text_end",
            "hypervisor text runs at EL2",
        ),
        (
            "__hyp_text_start",
            "__hyp_text_end",
            "hypervisor text runs at EL2",
        ),
        (
            "__hibernate_exit_text_start",
            "__hibernate_exit_text_end",
            "hibernation's exit text runs on other page tables",
        ),
    ]
    .into_iter()
    .filter_map(|(s, e, why)| Some((map.lookup(s).ok()?.addr, map.lookup(e).ok()?.addr, why)))
    .collect()
}

/// Where the guest keeps what the jump plan's trampolines read: the per-CPU CPU number,
/// current task and per-CPU base (System.map; `pcpu_hot` from 6.2 on, through BTF), and the
/// `task_struct` offsets of pid, tgid, comm and the stack (BTF). What is missing is simply not
/// recorded (a kernel without `cpu_number` gets no jump sites).
fn guest_anchors(
    map: &SymbolMap,
    btf: Option<&probe_core::btf::Btf>,
    task: Option<&TaskLayout>,
) -> GuestAnchors {
    let hot = |member: &str| {
        let base = map.lookup("pcpu_hot").ok()?.addr;
        Some(base + btf?.member_offset("pcpu_hot", member).ok()?)
    };
    let per_cpu = |sym: &str| map.lookup(sym).ok().map(|s| s.addr).or_else(|| hot(sym));
    let offsets = btf.and_then(|b| {
        let m = |f: &str| b.member_offset("task_struct", f).ok();
        Some(TaskOffsets {
            pid: m("pid")?,
            tgid: m("tgid")?,
            comm: m("comm")?,
            stack: m("stack")?,
        })
    });
    GuestAnchors {
        cpu_number: per_cpu("cpu_number"),
        current_task: task.and_then(|t| t.current_task),
        this_cpu_off: per_cpu("this_cpu_off"),
        task: offsets,
        thread_size: <crate::arch::Guest as probe_core::arch::Arch>::KERNEL_STACK_SIZE,
    }
}

fn run_on_host(args: &Job) -> Result<i32> {
    let kvm = kvm_ioctls::Kvm::new().context("opening /dev/kvm")?;
    let output = match &args.output {
        Some(path) => TraceOutput::file(path)
            .with_context(|| format!("creating the output file {}", path.display()))?,
        None => TraceOutput::stdout(),
    };
    // The API socket first: a path that cannot be served fails before anything boots.
    let api = match &args.api_socket {
        Some(path) => Some(ApiSetup {
            listener: crate::api::http::bind(path)?,
            path: path.clone(),
            hub: Arc::new(EventHub::default()),
            mux_port: args.api_port.clone(),
        }),
        None => None,
    };
    let mut hists = Vec::new();
    let mut folded = None;
    let probes = probe_setup(
        args,
        &kvm,
        &output,
        api.as_ref().map(|a| &a.hub),
        &mut hists,
        &mut folded,
    )?;
    let mut cmdline = args.effective_cmdline();
    if probes.is_some() {
        cmdline.push(' ');
        cmdline.push_str(hvprobe_guest::WAIT_PARAM);
    }
    let opts = RunOptions {
        vm: VmConfig {
            kernel: args.kernel.clone().context("no kernel")?,
            initrd: args.initrd.clone(),
            cmdline,
            vcpus: args.vcpus,
            memory_mib: args.memory,
            xol_bytes: match &probes {
                Some(setup) => XolArea::new(
                    <crate::arch::Guest as probe_core::arch::Arch>::XOL,
                    0,
                    XOL_PAGES,
                )
                .and_then(|x| {
                    x.with_data_pages(setup.jump.as_ref().map_or(0, |j| j.pages(args.vcpus)))
                })
                .map(|x| x.size())
                .context("the XOL area")?,
                None => 0,
            },
            xol_data_bytes: probes
                .as_ref()
                .and_then(|s| s.jump.as_ref())
                .map_or(0, |j| j.pages(args.vcpus) * 4096),
            disks: args
                .disk
                .iter()
                .map(|d| crate::devices::virtio::DiskSpec::parse(d))
                .collect::<Result<_, _>>()?,
        },
        timeout: args.effective_timeout(),
        forward_stdin: true,
        system_map: args.system_map.clone(),
    };
    let report = machine::run(kvm, &opts, probes, api, output.clone())?;
    let code = report_outcome(args, &report);
    // One model of the run: the summary lines and `--summary-json` are both made from it.
    let mut summary = RunSummary::new(&report, code);
    if let Some(f) = &folded {
        summary.stacks = f.sorted().into_iter().map(StackCount::from).collect();
        stacks::write_files(
            &summary.stacks,
            args.stacks.as_deref(),
            args.flamegraph.as_deref(),
        )?;
    }
    if report.probes.is_some() {
        for line in summary.text_lines() {
            output.line(&format!("{line}\n"));
        }
    }
    for h in &hists {
        output.line(&h.render());
    }
    output.flush();
    if args.timings {
        match (report.boot_to_init, report.boot_to_autorun) {
            (Some(t), Some(a)) => eprintln!(
                "hvprobe: timings: boot to /init {:.3} s, /init to the autorun unit (systemd) {:.3} s, run {:.3} s",
                t.as_secs_f64(),
                a.saturating_sub(t).as_secs_f64(),
                report.run_time.as_secs_f64()
            ),
            (Some(t), None) => eprintln!(
                "hvprobe: timings: boot to /init {:.3} s, run {:.3} s",
                t.as_secs_f64(),
                report.run_time.as_secs_f64()
            ),
            (None, _) => eprintln!(
                "hvprobe: timings: /init marker not seen, run {:.3} s",
                report.run_time.as_secs_f64()
            ),
        }
    }
    if let Some(path) = &args.summary_json {
        write_summary(path, &summary)?;
    }
    Ok(code)
}

/// Says on stderr how the run ended when that is worth saying, and returns the exit status.
fn report_outcome(args: &Job, report: &RunReport) -> i32 {
    let problem = match &report.outcome {
        Outcome::Panicked(line) => Some(format!("guest kernel panicked: {line}")),
        Outcome::KernelFault(line) => Some(format!(
            "the guest kernel reported a fault while probes were in: {line}"
        )),
        Outcome::TimedOut(t) => Some(format!("guest did not finish within {} s", t.as_secs())),
        Outcome::VcpuError(e) => Some(e.clone()),
        Outcome::ShutDown if args.exec.is_some() => {
            Some("guest shut down without reporting the command's exit status".to_string())
        }
        Outcome::Interrupted => {
            eprintln!("hvprobe: interrupted");
            None
        }
        Outcome::ProbeRefused(e) => {
            eprintln!("hvprobe: {e}");
            eprintln!("hvprobe: no probe was left in the guest");
            return report.outcome.exit_code();
        }
        Outcome::Stopped => {
            eprintln!("hvprobe: stopped through the API");
            None
        }
        Outcome::CommandExited(_) | Outcome::ShutDown => None,
    };
    let Some(problem) = problem else {
        return report.outcome.exit_code();
    };
    eprintln!("hvprobe: {problem}");
    if !report.faults_with_probes.is_empty() {
        eprintln!(
            "hvprobe: guest kernel fault reports while probes were in ({}):",
            report.faults_with_probes.len()
        );
        for f in &report.faults_with_probes {
            eprintln!("  ! {f}");
        }
        if let Some(p) = &report.probes {
            eprintln!("hvprobe: probes in at the time:");
            for s in &p.stats {
                eprintln!(
                    "  {} at {:#x} ({}; plan {}): hits={}",
                    s.location, s.address, s.instruction, s.plan, s.hits
                );
            }
        }
    }
    eprintln!("hvprobe: last console lines:");
    for l in &report.console_tail {
        eprintln!("  | {l}");
    }
    match report.outcome {
        Outcome::ShutDown => EXIT_GUEST_FAILED,
        ref other => other.exit_code(),
    }
}

/// Writes the run's summary as JSON to `path`, or, inside the emulated runner's L1, as one
/// stderr line that the runner on the host turns back into the file.
fn write_summary(path: &std::path::Path, summary: &RunSummary) -> Result<()> {
    let json = serde_json::to_string(summary).context("encoding the run summary")?;
    if path == std::path::Path::new(summary::ON_STDERR) {
        eprintln!("{}{json}", summary::STDERR_PREFIX);
        return Ok(());
    }
    std::fs::write(path, json + "\n")
        .with_context(|| format!("writing the run summary {}", path.display()))
}
