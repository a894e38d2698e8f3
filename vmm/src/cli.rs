//! The `hvprobe` command line. Kept in the library so that the emulated runner's L1 `/init`
//! (which is hvprobe itself) can run the same code in-process.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{Parser, Subcommand, ValueEnum};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use probe_core::definition::{ProbeDefinition, ProbeKind};
use probe_core::engine::{MAX_HW_BREAKPOINTS, PlantTarget};
use probe_core::guest_kprobes::KprobeTableLayout;
use probe_core::probe::{Probe, ProbeContext, TrapKind};
use probe_core::symbols::SymbolMap;
use probe_core::task::TaskLayout;
use probe_core::xol::XolArea;

use crate::hostcheck;
use crate::machine::{self, Outcome, ProbeRequest, ProbeSetup, RunOptions};
use crate::output::TraceOutput;
use crate::report::{self, RetvalHistogram};
use crate::runner;
use crate::selftest::{self, TrapSupport};
use crate::vm::VmConfig;

/// Exit status when the host cannot run the job (no usable KVM and no emulated runner).
pub const EXIT_HOST_UNUSABLE: i32 = 2;
pub use crate::machine::EXIT_GUEST_FAILED;

/// hvprobe: out-of-guest kernel probes on a KVM VMM.
#[derive(Debug, Parser)]
#[command(name = "hvprobe", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest kernel and run it to the end.
    Run(Box<RunArgs>),
    /// Say whether this host's KVM can run and debug a stock guest, in one line.
    CheckHost,
    /// Fetch and build the default guest (Debian cloud kernel + initramfs); print its files.
    Guest,
}

/// Where the VM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RunnerChoice {
    /// The host's KVM when it can do the job, else the emulated runner.
    Auto,
    /// The host's KVM, or fail.
    Host,
    /// Inside an emulated machine with hardware virtualization (QEMU TCG, L1 Debian kernel).
    Emulated,
}

/// Arguments of `hvprobe run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// bzImage to boot [default: the default guest's Debian cloud kernel].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// initrd to load [default: the default guest's initramfs when --kernel is not given].
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: serial console, reboot through i8042, no KASLR, quiet].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// Shell command for the default guest's /init to run; hvprobe exits with its status.
    #[arg(long)]
    pub exec: Option<String>,
    /// Give up after this many seconds [default: 600 with --exec, none without].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Where the VM runs.
    #[arg(long, value_enum, default_value_t = RunnerChoice::Auto)]
    pub runner: RunnerChoice,
    /// Print boot and run times on stderr at the end.
    #[arg(long)]
    pub timings: bool,
    /// Probe SYMBOL[+OFFSET] or an address in guest kernel text, or a kprobe_events
    /// definition (`p[:[GRP/]EVENT] SYMBOL[+OFFS] [NAME=FETCHARG[:TYPE] ...]`); repeatable.
    #[arg(
        short = 'p',
        long = "probe",
        value_name = "SYMBOL[+OFF]|ADDR|DEFINITION"
    )]
    pub probes: Vec<String>,
    /// Read probe definitions from FILE, one per line (blank lines and `#` comments skipped);
    /// repeatable, combined with any `-p`.
    #[arg(short = 'f', long = "probe-file", value_name = "FILE")]
    pub probe_files: Vec<PathBuf>,
    /// Print only the per-probe summary, not a line per hit.
    #[arg(long)]
    pub quiet: bool,
    /// Print each hit of a probe definition as one JSON object (time, cpu, comm, pid, tgid,
    /// event, location, return, args).
    #[arg(long)]
    pub json: bool,
    /// Write hit lines and the end-of-run summary to FILE instead of stdout; the guest
    /// console stays on stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// At exit, print a histogram of `$retval` for each return probe definition that fetches
    /// it (power-of-two buckets; `-errno` values exact and named).
    #[arg(long)]
    pub hist: bool,
    /// Which trap the probes use [auto: int3 if this KVM delivers int3 exits, else hardware].
    #[arg(long, value_enum, default_value_t = TrapChoice::Auto)]
    pub trap: TrapChoice,
    /// System.map of the guest kernel [default: the default guest's].
    #[arg(long, value_name = "PATH")]
    pub system_map: Option<PathBuf>,
    /// The guest kernel's BTF, as its vmlinux or a raw .BTF section, for task awareness
    /// ($comm, comm-pid in event lines) [default: the default guest's vmlinux].
    #[arg(long, value_name = "PATH")]
    pub btf: Option<PathBuf>,
    /// Plant the probes that can be planted and list the refused ones (unknown symbol, bad
    /// offset, refused instruction) on stderr, instead of refusing the whole run; the exit
    /// status is the run's own.
    #[arg(long)]
    pub skip_refused: bool,
}

/// The `--probe` locations resolved against the guest's System.map.
pub struct ResolvedProbes {
    /// The symbol table.
    pub map: SymbolMap,
    /// Each probe that resolved, in the order given.
    pub targets: Vec<ResolvedProbe>,
    /// Each probe that did not (only with `--skip-refused`; otherwise resolution fails),
    /// with the reason.
    pub refused: Vec<String>,
}

/// One resolved `--probe`.
pub struct ResolvedProbe {
    /// The location as the summary shows it.
    pub location: String,
    /// Where to plant.
    pub target: PlantTarget,
    /// The kprobe_events definition, when the probe was given as one.
    pub definition: Option<ProbeDefinition>,
}

/// The definitions in a probe file with their 1-based line numbers: blank lines and lines
/// starting with `#` are skipped.
fn probe_file_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// Whether a `--probe` is a kprobe_events definition (`p ...`, `p:...`, `r...`) rather than
/// a bare location.
fn is_definition(p: &str) -> bool {
    let head = p.trim_start();
    let rest = head.strip_prefix('p').or_else(|| {
        head.strip_prefix('r')
            .map(|r| r.trim_start_matches(|c: char| c.is_ascii_digit()))
    });
    rest.is_some_and(|r| r.starts_with([' ', '\t', ':']))
}

/// Resolves one `--probe` against `map`.
fn resolve_probe(map: &SymbolMap, p: &str) -> Result<ResolvedProbe> {
    let definition = if is_definition(p) {
        let d = ProbeDefinition::parse(p).map_err(|e| anyhow::anyhow!("--probe {p}: {e}"))?;
        if let Some(r) = probe_core::fetch::unknown_register(&d) {
            bail!("--probe {p}: unknown register %{r}");
        }
        Some(d)
    } else {
        None
    };
    let location = definition
        .as_ref()
        .map_or_else(|| p.to_string(), |d| d.location_text());
    let (va, sym) = map
        .resolve(&location)
        .with_context(|| format!("--probe {p}"))?;
    let function_start = match sym {
        Some(s) => Some(s.addr),
        None => map.containing(va).map(|(s, _)| s.addr),
    };
    Ok(ResolvedProbe {
        location,
        target: PlantTarget { va, function_start },
        definition,
    })
}

/// Fails with every problem in `problems`, one per line, when there is any.
fn refusals(problems: Vec<String>, what: &str) -> Result<()> {
    match problems.as_slice() {
        [] => Ok(()),
        [one] => bail!("{one}"),
        many => bail!("{} {what}:\n  {}", many.len(), many.join("\n  ")),
    }
}

/// Which trap probes use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TrapChoice {
    /// int3 when this KVM delivers it (self-test), else hardware breakpoints.
    Auto,
    /// int3 written over the instruction: unlimited probes.
    Int3,
    /// Hardware execute breakpoints: at most 4 probes, guest text untouched.
    Hw,
}

/// The command line every default-guest boot starts from: console on COM1, reset through the
/// i8042 on reboot and at once on panic, no KASLR, and only messages of KERN_CRIT and worse
/// (panics, oopses) on the console.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nokaslr i8042.noaux i8042.nomux i8042.dumbkbd quiet loglevel=3";

/// Default time limit with `--exec`.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 600;

impl RunArgs {
    /// The time limit in force.
    pub fn effective_timeout(&self) -> Option<Duration> {
        match (self.timeout, &self.exec) {
            (Some(0), _) => None,
            (Some(s), _) => Some(Duration::from_secs(s)),
            (None, Some(_)) => Some(Duration::from_secs(DEFAULT_EXEC_TIMEOUT_SECS)),
            (None, None) => None,
        }
    }

    /// The kernel command line with the `--exec` command appended for `/init`.
    pub fn effective_cmdline(&self) -> String {
        let mut cmdline = self
            .cmdline
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if let Some(exec) = &self.exec {
            let encoded = base64::engine::general_purpose::STANDARD.encode(exec.as_bytes());
            cmdline.push_str(&format!(" {}={encoded}", hvprobe_guest::EXEC_PARAM));
        }
        cmdline
    }

    /// Fills in the default guest's kernel, initrd and System.map where none were given.
    pub fn resolve_guest(&self) -> Result<RunArgs> {
        let mut resolved = self.clone();
        if self.kernel.is_none() {
            let guest = hvprobe_guest::default_guest().context("preparing the default guest")?;
            resolved.kernel = Some(guest.kernel.vmlinuz());
            if self.initrd.is_none() {
                resolved.initrd = Some(guest.initrd);
            }
            if self.system_map.is_none() {
                resolved.system_map = Some(guest.kernel.system_map());
            }
            if self.btf.is_none() {
                resolved.btf = Some(guest.kernel.vmlinux());
            }
        }
        Ok(resolved)
    }

    /// Moves the probes of every `-f FILE` into `probes` (a line takes any form `-p` takes),
    /// checking each definition on the way so that an error names the file and line; every
    /// bad line is reported, not only the first.
    pub fn read_probe_files(&mut self) -> Result<()> {
        let mut bad = Vec::new();
        for file in std::mem::take(&mut self.probe_files) {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading probe file {}", file.display()))?;
            for (n, line) in probe_file_lines(&text) {
                if is_definition(line)
                    && let Err(e) = ProbeDefinition::parse(line)
                {
                    bad.push(format!("{}:{n}: {e}", file.display()));
                    continue;
                }
                self.probes.push(line.to_string());
            }
        }
        refusals(bad, "probe file line(s)")
    }

    /// Resolves every `--probe` against the System.map, before anything runs. A probe that
    /// does not resolve (bad syntax, unknown symbol, offset past the symbol) fails the run,
    /// with every such probe named, unless `--skip-refused` is given.
    pub fn resolve_probes(&self) -> Result<Option<ResolvedProbes>> {
        if self.probes.is_empty() {
            return Ok(None);
        }
        let path = self
            .system_map
            .as_ref()
            .context("--probe needs the guest kernel's System.map (--system-map)")?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading System.map {}", path.display()))?;
        let map = SymbolMap::parse(&text)
            .with_context(|| format!("parsing System.map {}", path.display()))?;
        let mut targets = Vec::new();
        let mut refused = Vec::new();
        for p in &self.probes {
            match resolve_probe(&map, p) {
                Ok(t) => targets.push(t),
                Err(e) => refused.push(format!("{e:#}")),
            }
        }
        if !self.skip_refused {
            refusals(std::mem::take(&mut refused), "probe(s) refused")?;
        }
        if self.trap == TrapChoice::Hw && targets.len() > MAX_HW_BREAKPOINTS {
            bail!(
                "--trap hw allows at most {MAX_HW_BREAKPOINTS} probes ({} given)",
                targets.len()
            );
        }
        Ok(Some(ResolvedProbes {
            map,
            targets,
            refused,
        }))
    }

    /// Checks what can be checked before any VM or emulator is started.
    pub fn validate(&self) -> Result<()> {
        if self.memory < 64 {
            bail!(
                "--memory {} MiB is too small: at least 64 MiB are needed to boot Linux",
                self.memory
            );
        }
        if self.vcpus == 0 || self.vcpus > 254 {
            bail!("--vcpus {} is out of range: 1 to 254", self.vcpus);
        }
        for (flag, path) in [("--kernel", &self.kernel), ("--initrd", &self.initrd)] {
            if let Some(p) = path
                && !p.is_file()
            {
                bail!("{flag} {}: no such file", p.display());
            }
        }
        if let Some(kernel) = &self.kernel {
            crate::vm::check_bzimage(kernel)?;
        }
        if !self.probes.is_empty() && self.kernel.is_some() && self.system_map.is_none() {
            bail!("--probe with --kernel needs that kernel's System.map (--system-map)");
        }
        Ok(())
    }
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
        Command::CheckHost => Ok(match hostcheck::check_host() {
            Ok(facts) => {
                let traps = kvm_ioctls::Kvm::new()
                    .map_err(|e| e.to_string())
                    .and_then(|kvm| selftest::probe_traps(&kvm))
                    .map(|t| t.summary())
                    .unwrap_or_else(|e| format!("trap self-test failed: {e}"));
                println!(
                    "hvprobe: host KVM is usable (guest-debug flags {:#x}, sync regs {}; {traps})",
                    facts.guest_debug_flags, facts.sync_regs
                );
                0
            }
            Err(e) => {
                println!("hvprobe: host KVM cannot run hvprobe guests: {e}");
                EXIT_HOST_UNUSABLE
            }
        }),
        Command::Guest => {
            let g = hvprobe_guest::default_guest()?;
            println!("kernel-package {} {}", g.kernel.package, g.kernel.version);
            println!("vmlinuz {}", g.kernel.vmlinuz().display());
            println!("system-map {}", g.kernel.system_map().display());
            println!("vmlinux {}", g.kernel.vmlinux().display());
            println!("initrd {}", g.initrd.display());
            Ok(0)
        }
        Command::Run(args) => run(&args),
    }
}

fn run(args: &RunArgs) -> Result<i32> {
    let mut args = args.clone();
    args.read_probe_files()?;
    let args = &args;
    args.validate()?;
    let on_host = match args.runner {
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
    let args = args.resolve_guest()?;
    // Unknown symbols and bad syntax fail here, before any VM starts.
    args.resolve_probes()?;
    if !on_host {
        return runner::run_emulated(&args).map_err(Into::into);
    }
    run_on_host(&args)
}

/// XOL code pages reserved for a run with probes (128 slots a page).
const XOL_PAGES: usize = 64;

/// Picks the trap kind from the user's choice and what the self-test found.
fn choose_trap(choice: TrapChoice, support: &TrapSupport, probes: usize) -> Result<TrapKind> {
    let summary = support.summary();
    let int3 = support.software.is_ok() && support.single_step.is_ok();
    match choice {
        TrapChoice::Int3 if int3 => Ok(TrapKind::Software),
        TrapChoice::Int3 => {
            bail!("--trap int3: this KVM does not deliver what int3 probes need: {summary}")
        }
        TrapChoice::Hw if support.hardware.is_ok() => Ok(TrapKind::Hardware),
        TrapChoice::Hw => {
            bail!("--trap hw: this KVM does not deliver hardware breakpoints: {summary}")
        }
        TrapChoice::Auto if int3 => Ok(TrapKind::Software),
        TrapChoice::Auto if support.hardware.is_ok() && probes <= MAX_HW_BREAKPOINTS => {
            Ok(TrapKind::Hardware)
        }
        TrapChoice::Auto => bail!("this KVM cannot run {probes} probe(s): {summary}"),
    }
}

/// Reads the guest kernel's BTF (a vmlinux, or a raw `.BTF` section).
pub fn read_btf(path: &std::path::Path) -> Result<Vec<u8>> {
    let data =
        std::fs::read(path).with_context(|| format!("reading BTF from {}", path.display()))?;
    if data.starts_with(b"\x7fELF") {
        let section = probe_core::elf::section(&data, ".BTF")
            .with_context(|| format!("{}: the kernel's BTF", path.display()))?;
        return Ok(section.to_vec());
    }
    Ok(data)
}

/// The guest kernel's BTF, parsed, when `--btf` (or the default guest) gives it.
fn guest_btf(args: &RunArgs) -> Option<Result<probe_core::btf::Btf>> {
    let path = args.btf.as_ref()?;
    Some(read_btf(path).and_then(|data| {
        probe_core::btf::Btf::parse(&data)
            .with_context(|| format!("parsing BTF from {}", path.display()))
    }))
}

/// Builds the probes of a run: resolution, trap choice, handlers.
fn probe_setup(
    args: &RunArgs,
    kvm: &kvm_ioctls::Kvm,
    output: &Arc<TraceOutput>,
    hists: &mut Vec<Arc<RetvalHistogram>>,
) -> Result<Option<ProbeSetup>> {
    let Some(ResolvedProbes {
        map,
        targets,
        refused,
    }) = args.resolve_probes()?
    else {
        return Ok(None);
    };
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
            TrapKind::Software => "int3",
            TrapKind::Hardware => "hardware breakpoints",
        }
    );
    let btf = guest_btf(args);
    let task = if targets.iter().any(|t| t.definition.is_some()) {
        let btf = btf
            .as_ref()
            .context("task awareness needs the guest kernel's BTF (--btf)")?
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let layout = TaskLayout::from_kernel(btf, &map)
            .context("finding the current task in the guest kernel")?;
        Some(Arc::new(layout))
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
    let slide = Arc::new(AtomicU64::new(0));
    let requests = targets
        .into_iter()
        .map(|resolved| {
            let hist = match &resolved.definition {
                Some(def) if args.hist => {
                    RetvalHistogram::for_definition(def, resolved.location.clone()).map(Arc::new)
                }
                _ => None,
            };
            hists.extend(hist.clone());
            let mut probe = Probe::new(resolved.location);
            probe.trap = trap;
            // A return definition makes a return probe, printed or not.
            let max_active = resolved.definition.as_ref().and_then(|d| d.max_active());
            if let Some(n) = max_active {
                probe = probe.on_return(|_| Ok(())).max_active(n);
            }
            let print = !args.quiet;
            let map = map.clone();
            let task = task.clone();
            let slide = slide.clone();
            let json = args.json;
            let out = output.clone();
            match resolved.definition {
                Some(def) if print || hist.is_some() => {
                    let handler = move |ctx: &ProbeContext<'_>| {
                        let task = task.as_deref();
                        if let Some(h) = &hist {
                            report::count_return(ctx, &def, task, h);
                        }
                        if print {
                            let slide = slide.load(Ordering::Relaxed);
                            report::print_event(ctx, &def, &map, task, slide, json, &out);
                        }
                        Ok(())
                    };
                    probe = match max_active {
                        Some(_) => probe.on_return(handler),
                        None => probe.on_hit(handler),
                    };
                }
                None if print => {
                    probe = probe.on_hit(move |ctx| {
                        report::print_hit(ctx, &out);
                        Ok(())
                    });
                }
                _ => {}
            }
            ProbeRequest {
                probe,
                target: resolved.target,
            }
        })
        .collect();
    let text = match (map.lookup("_stext"), map.lookup("_etext")) {
        (Ok(s), Ok(e)) => Some((s.addr, e.addr)),
        _ => None,
    };
    Ok(Some(ProbeSetup {
        requests,
        int3_exits: support.software.is_ok(),
        text,
        xol_pages: XOL_PAGES,
        syscall_entry: map.lookup("entry_SYSCALL_64").ok().map(|s| s.addr),
        initial_page_table: map.lookup("init_top_pgt").ok().map(|s| s.addr),
        exception_table: match (
            map.lookup("__start___ex_table"),
            map.lookup("__stop___ex_table"),
        ) {
            (Ok(s), Ok(e)) => Some((s.addr, e.addr)),
            _ => None,
        },
        slide,
        skip_refused: args.skip_refused,
        guest_kprobes,
    }))
}

fn run_on_host(args: &RunArgs) -> Result<i32> {
    let kvm = kvm_ioctls::Kvm::new().context("opening /dev/kvm")?;
    let output = match &args.output {
        Some(path) => TraceOutput::file(path)
            .with_context(|| format!("creating the output file {}", path.display()))?,
        None => TraceOutput::stdout(),
    };
    let mut hists = Vec::new();
    let probes = probe_setup(args, &kvm, &output, &mut hists)?;
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
            xol_bytes: if probes.is_some() {
                XolArea::new(0, XOL_PAGES).map(|x| x.size()).unwrap_or(0)
            } else {
                0
            },
        },
        timeout: args.effective_timeout(),
        forward_stdin: true,
    };
    let report = machine::run(kvm, &opts, probes, output.clone())?;
    if let Some(p) = &report.probes {
        for line in report::summary(p) {
            output.line(&format!("{line}\n"));
        }
    }
    for h in &hists {
        output.line(&h.render());
    }
    output.flush();
    if args.timings {
        match report.boot_to_init {
            Some(t) => eprintln!(
                "hvprobe: timings: boot to /init {:.3} s, run {:.3} s",
                t.as_secs_f64(),
                report.run_time.as_secs_f64()
            ),
            None => eprintln!(
                "hvprobe: timings: /init marker not seen, run {:.3} s",
                report.run_time.as_secs_f64()
            ),
        }
    }
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
            return Ok(report.outcome.exit_code());
        }
        Outcome::CommandExited(_) | Outcome::ShutDown => None,
    };
    let Some(problem) = problem else {
        return Ok(report.outcome.exit_code());
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
    Ok(match report.outcome {
        Outcome::ShutDown => EXIT_GUEST_FAILED,
        ref other => other.exit_code(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_files_skip_blanks_and_comments_and_keep_line_numbers() {
        let text = "# opens\np:a do_sys_openat2 n=+0($arg2):ustring\n\n  r vfs_read\n";
        let lines: Vec<(usize, &str)> = probe_file_lines(text).collect();
        assert_eq!(
            lines,
            vec![
                (2, "p:a do_sys_openat2 n=+0($arg2):ustring"),
                (4, "r vfs_read")
            ]
        );
    }

    #[test]
    fn definitions_are_told_from_bare_locations() {
        for d in ["p do_sys_openat2", "p:grp/ev f", "r f", "r16:x f", "  p f"] {
            assert!(is_definition(d), "{d}");
        }
        for l in [
            "pid_vnr",
            "r",
            "proc_pid_status+0x4",
            "0xffffffff81000000",
            "ptrace",
        ] {
            assert!(!is_definition(l), "{l}");
        }
    }
}
