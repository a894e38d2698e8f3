//! A run of hvprobe as plain data ([`Job`]): the options of `hvprobe run`, checked and
//! resolved against the guest's files before any VM starts. The command line builds one, the
//! emulated runner hands one (as JSON) to the hvprobe inside L1, and both run it the same way.

use crate::platform::platform;
use crate::refusal::RefusedProbe;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use probe_core::definition::ProbeDefinition;
use probe_core::engine::PlantTarget;
use probe_core::symbols::SymbolMap;

/// Where the VM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum RunnerChoice {
    /// The host's KVM when it can do the job, else the emulated runner.
    Auto,
    /// The host's KVM, or fail.
    Host,
    /// Inside an emulated machine with hardware virtualization (QEMU TCG, L1 Debian kernel).
    Emulated,
}

/// A run of hvprobe: the arguments of `hvprobe run`, and what the emulated runner hands to the
/// hvprobe inside L1 as JSON (every field, so that no option is lost on the way).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
pub struct Job {
    /// The guest's architecture [default: the host's]. A guest of another architecture than
    /// the host's runs in the emulated runner of its architecture.
    #[arg(long, value_enum)]
    #[serde(default)]
    pub arch: Option<hvprobe_guest::GuestArch>,
    /// Kernel image to boot (a bzImage; an uncompressed Image on arm64) [default: the default
    /// guest's Debian cloud kernel].
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// initrd to load [default: the default guest's initramfs when --kernel is not given].
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: serial console, no KASLR, quiet; on x86_64 reboot through
    /// the i8042].
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
    /// A raw disk image for the guest (virtio-blk, `/dev/vd*`); repeatable, at most 8. The
    /// default guest mounts the first on /mnt, the others on /mnt1, /mnt2, ... (or where
    /// `at=` says) before the command runs. `ro`: the guest's writes fail and the image never
    /// changes. The image is locked (flock: exclusive, shared with `ro`) for the run.
    #[arg(long, value_name = "PATH[,ro][,at=GUESTPATH]")]
    #[serde(default)]
    pub disk: Vec<String>,
    /// A host directory the guest sees read-only at GUESTPATH [default: /mnt/NAME]: a
    /// snapshot packed into an ext4 image (mke2fs -d) when the run starts, attached as a
    /// read-only disk and mounted before the command runs; repeatable.
    #[arg(long, value_name = "DIR[:GUESTPATH]")]
    #[serde(default)]
    pub share: Vec<String>,
    /// Boot a root file system with systemd as init: IMAGE (an ext4 image, used in place,
    /// read-write) or, without IMAGE, a copy of the cached Debian 12 image (`hvprobe guest
    /// rootfs`; built on first use) made for this run and deleted after it. The root is the
    /// first disk (`/dev/vda`), other disks and shares are mounted inside it, and `--exec`
    /// runs from a systemd unit once the system is up (without it, a root shell on the
    /// console).
    #[arg(long, value_name = "IMAGE", num_args = 0..=1, default_missing_value = "")]
    #[serde(default)]
    pub rootfs: Option<String>,
    /// Emulated runner, no probes: run the guest under QEMU (`-accel kvm`, its `microvm` or
    /// `virt` machine and devices) inside L1 instead of hvprobe's VMM, as a yardstick for
    /// hvprobe's devices (`benches/disk.rs`).
    #[arg(long, hide = true)]
    #[serde(default)]
    pub l2_qemu: bool,
    /// Give up after this many seconds [default: 600 with --exec, none without].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Where the VM runs.
    #[arg(long, value_enum, default_value_t = RunnerChoice::Auto)]
    pub runner: RunnerChoice,
    /// The emulated runner's CPU model (QEMU's `-cpu`; default `EPYC` for x86_64 guests, `max`
    /// for arm64), e.g. `neoverse-n1` for an arm64 CPU with the Spectre-BHB mitigations.
    #[arg(long, value_name = "MODEL")]
    #[serde(default)]
    pub runner_cpu: Option<String>,
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
    /// Every probe's hits carry the guest kernel's stack (as a definition's `stacktrace`
    /// does): ` => function+0xoff/0xsize` lines after each hit line, a `stack` array in JSON.
    /// Unwound from the host: ORC on x86_64, frame records on arm64.
    #[arg(long)]
    #[serde(default)]
    pub stack: bool,
    /// Write every stack seen (`--stack`, `stacktrace`) as folded stacks to FILE at exit
    /// (`event;outermost;...;probed COUNT` lines, as FlameGraph, inferno and speedscope read).
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub stacks: Option<PathBuf>,
    /// Render every stack seen as an SVG flame graph to FILE at exit.
    #[arg(long, value_name = "FILE.svg")]
    #[serde(default)]
    pub flamegraph: Option<PathBuf>,
    /// Which trap the probes use [auto: int3 if this KVM delivers int3 exits, else hardware].
    #[arg(long, value_enum, default_value_t = TrapChoice::Auto)]
    pub trap: TrapChoice,
    /// How hits reach the host [auto: a jump into a host-written trampoline that records the
    /// hit in the guest, no exit, where the site and the definition allow; else exits].
    /// `exit` forces a trap per hit: the choice for security use (the guest can write the
    /// rings the jump plan records into).
    #[arg(long, value_enum, default_value_t = PlanChoice::Auto)]
    #[serde(default)]
    pub plan: PlanChoice,
    /// Records in each vCPU's ring of the jump plan (a power of two) [default: as many as
    /// fit, 2048 with one vCPU, 1024 with two]; a hit finding its ring full is dropped and
    /// counted as missed.
    #[arg(long, value_name = "N")]
    #[serde(default)]
    pub ring_records: Option<u64>,
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
    /// Caps each probe site at N hits a second: hits past it count as missed and the site is
    /// paused (its trap taken out) until the second is over. For dense probe sets on hot
    /// paths (the timer tick, the scheduler) that would cost the guest more than its time.
    #[arg(long, value_name = "N")]
    #[serde(default)]
    pub max_rate: Option<u64>,
    /// The most probes a run (or one live-session request) may expand to from globs
    /// (`-p 'vfs_*'`, `p:hv/vfs vfs_*`); above it the whole request is refused, never planted
    /// in part.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PROBES)]
    #[serde(default = "default_max_probes")]
    pub max_probes: usize,
    /// Write a machine-readable summary of the run to FILE (JSON: outcome and exit status,
    /// per-probe counters, exits, kernel text hashes, KASLR slide, skipped probes, guest fault
    /// reports).
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
    /// Serve the live-session API on this Unix socket (HTTP/1.1 + JSON, owner-only): add,
    /// list and remove probes, stream events, stats, detach and stop while the VM runs
    /// (`hvprobe probe|trace|stats|detach|stop --api-socket PATH`, or curl; docs/api.md).
    /// Without `--exec` the default guest gives a shell on the console.
    #[arg(long, value_name = "PATH")]
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Check the kernel's integrity at the end of the run against its state when `/init`
    /// started (before any probe went in): every changed range of kernel text and read-only
    /// data with its symbol, syscall table entries pointing outside kernel text, and moved
    /// protection settings (x86: CR0.WP, CR4.SMEP/SMAP, the IDT base; arm64: VBAR_EL1,
    /// SCTLR_EL1.WXN/SPAN). Reported in the end-of-run summary and in `--summary-json`.
    #[arg(long)]
    #[serde(default)]
    pub integrity: bool,
    /// Make kernel memory read-only to the guest from `/init` on and report every write to it
    /// with its writer, task and bytes: `text`, `rodata`, or `SYMBOL[+OFF][:LEN]` (default
    /// length: to the next symbol), then `:allow` (the default: the write is completed) or
    /// `:deny` (it is dropped and the guest goes on past the store). Repeatable. The pages
    /// holding a region become read-only; writes to their other bytes are completed silently
    /// and counted (`neighbour_writes`). Page tables and kvmclock pages are refused.
    #[arg(long, value_name = "REGION")]
    #[serde(default)]
    pub protect: Vec<String>,
    /// Exempt writes made by FUNC (anywhere on the writer's kernel stack) from `--protect`:
    /// made in full even to `deny` regions, and not reported (counted as exempted). For known
    /// writers such as the kernel's text patchers (`text_poke_bp_batch`,
    /// `aarch64_insn_patch_text_nosync`). Repeatable; needs stack traces (the guest's vmlinux).
    #[arg(long, value_name = "FUNC", requires = "protect")]
    #[serde(default)]
    pub protect_allow: Vec<String>,
    /// Inside the emulated runner's L1: the guest kernel's `NOKPROBE_SYMBOL` addresses, read
    /// from its vmlinux on the host (L1 has only its BTF).
    #[arg(skip)]
    #[serde(default)]
    pub kprobe_blacklist: Vec<u64>,
    /// Inside the emulated runner's L1: the guest kernel's unwind tables, taken from its
    /// vmlinux on the host.
    #[arg(skip)]
    #[serde(default)]
    pub unwind_tables: Option<PathBuf>,
    /// Inside the emulated runner's L1: the port that carries the host's API connections.
    #[arg(skip)]
    #[serde(default)]
    pub api_port: Option<PathBuf>,
    /// Instead of booting a guest, check the host's KVM and print the one-line verdict (how
    /// `hvprobe check-host --arch` checks the KVM inside another architecture's emulated
    /// runner).
    #[arg(skip)]
    #[serde(default)]
    pub check_host: bool,
}

/// The `--probe` locations resolved against the guest's System.map.
pub struct ResolvedProbes {
    /// The symbol table.
    pub map: SymbolMap,
    /// Each probe that resolved, in the order given.
    pub targets: Vec<ResolvedProbe>,
    /// Each probe that did not, with the reason: skipped with `--skip-refused`, otherwise
    /// the run ends before any VM starts.
    pub refused: Vec<RefusedProbe>,
}

/// One resolved `--probe`.
pub struct ResolvedProbe {
    /// The probe as the user gave it.
    pub spec: String,
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

/// Whether a `--probe` is a kprobe_events definition (`p ...`, `p:...`, `r...`, or a `w:...`
/// watchpoint) rather than a bare location.
fn is_definition(p: &str) -> bool {
    let head = p.trim_start();
    let rest = head.strip_prefix(['p', 'w']).or_else(|| {
        head.strip_prefix('r')
            .map(|r| r.trim_start_matches(|c: char| c.is_ascii_digit()))
    });
    rest.is_some_and(|r| r.starts_with([' ', '\t', ':']))
}

impl Job {
    /// What the guest's own kprobes refuse, for listings: the addresses carried in the job,
    /// else the array read from the vmlinux `--btf` names, with the text areas of `map`.
    pub fn kprobe_blacklist(&self, map: &SymbolMap) -> probe_core::catalog::KprobeBlacklist {
        if !self.kprobe_blacklist.is_empty() {
            return probe_core::catalog::KprobeBlacklist::with_functions(
                map,
                &self.kprobe_blacklist,
            );
        }
        let elf = self
            .btf
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .filter(|d| d.starts_with(b"\x7fELF"));
        let read = |va: u64, count: usize| {
            elf.as_ref()
                .and_then(|e| probe_core::elf::relocated_words(e, va, count).ok())
        };
        probe_core::catalog::KprobeBlacklist::from_kernel(map, Some(&read))
    }
}

/// The default of `--max-probes`.
pub const DEFAULT_MAX_PROBES: usize = 4096;

fn default_max_probes() -> usize {
    DEFAULT_MAX_PROBES
}

/// One probe per function that the glob in `spec`'s location matches (`vfs_*`, `p:hv/vfs
/// vfs_*`, `r:hv/x do_sys_*`), each named by its function (a definition's event becomes
/// `GROUP/FUNCTION`; a name several static functions share is probed at each address); `spec`
/// itself when it has no glob. A glob matching nothing is an error.
pub fn expand_globs(map: &SymbolMap, spec: &str) -> Result<Vec<String>, String> {
    let definition = is_definition(spec);
    let tokens: Vec<&str> = spec.split_whitespace().collect();
    let at = usize::from(definition);
    let Some(&location) = tokens.get(at) else {
        return Ok(vec![spec.to_string()]);
    };
    if !probe_core::catalog::is_glob(location) {
        return Ok(vec![spec.to_string()]);
    }
    let blacklist = probe_core::catalog::KprobeBlacklist::default();
    let found: Vec<probe_core::catalog::FunctionInfo> =
        probe_core::catalog::functions(map, location, &blacklist)
            // Compiler-split parts (`.cold`) and hvprobe's own refusals are not functions to probe.
            .filter(|f| !f.name.contains(".cold") && f.hvprobe_refuses.is_none())
            .collect();
    if found.is_empty() {
        return Err(format!("`{location}` matches no function in System.map"));
    }
    let header = tokens[0].to_string();
    Ok(found
        .iter()
        .map(|f| {
            let unique = map.lookup(&f.name).is_ok();
            let place = if unique {
                f.name.clone()
            } else {
                format!("{:#x}", f.address)
            };
            if !definition {
                return place;
            }
            let event: String = f
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let event = if unique {
                event
            } else {
                format!("{event}_{:x}", f.address & 0xffff_ffff)
            };
            // `p:GROUP/EVENT` or `p:EVENT` (and `r`, `rN`): the event becomes the function.
            let head = match header.split_once(':') {
                Some((kind, name)) => match name.split_once('/') {
                    Some((group, _)) => format!("{kind}:{group}/{event}"),
                    None => format!("{kind}:{event}"),
                },
                None => format!("{header}:{event}"),
            };
            let mut all: Vec<&str> = tokens.clone();
            all[0] = &head;
            all[at] = &place;
            all.join(" ")
        })
        .collect())
}

/// Resolves one `--probe` against `map`, for guests of `arch` (whose register names the
/// definition's fetch args use; the emulated runner of another architecture resolves them on
/// this host first).
pub fn resolve_probe(
    map: &SymbolMap,
    p: &str,
    arch: hvprobe_guest::GuestArch,
) -> Result<ResolvedProbe> {
    let definition = if is_definition(p) {
        let d = ProbeDefinition::parse(p).map_err(|e| anyhow::anyhow!("{e}"))?;
        let unknown = (platform(arch).unknown_register)(&d);
        if let Some(r) = unknown {
            bail!("unknown register %{r} for {arch} guests");
        }
        Some(d)
    } else {
        None
    };
    let location = definition
        .as_ref()
        .map_or_else(|| p.to_string(), |d| d.location_text());
    let (va, sym) = map.resolve(&location)?;
    if let Some(r) = map.relocated_text(va) {
        bail!(
            "refusing {location} at {va:#x}, in {}: {}",
            r.section,
            r.why
        );
    }
    let function_start = match sym {
        Some(s) => Some(s.addr),
        None => map.containing(va).map(|(s, _)| s.addr),
    };
    Ok(ResolvedProbe {
        spec: p.to_string(),
        location,
        target: PlantTarget { va, function_start },
        definition,
    })
}

/// Fails with every problem in `problems`, one per line, when there is any.
fn refusals(problems: Vec<String>, what: &str) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    bail!("{}", problem_list(&problems, what))
}

/// One problem as it is, or several as `N WHAT:` and one per indented line.
pub fn problem_list(problems: &[String], what: &str) -> String {
    match problems {
        [one] => one.clone(),
        many => format!("{} {what}:\n  {}", many.len(), many.join("\n  ")),
    }
}

/// How hits reach the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum PlanChoice {
    /// The jump plan where the site and the definition allow, else exits.
    #[default]
    Auto,
    /// An exit per hit (a trap), always.
    Exit,
}

/// XOL pages the jump plan's rings may take (the code pages take the rest of the 512 that
/// the XOL area's page table maps).
pub const RING_PAGES: u64 = 320;

/// Most records per ring unless `--ring-records` says (1 MiB with 512-byte records).
const MOST_RING_RECORDS: u64 = 2048;

impl Job {
    /// Records per vCPU ring: `--ring-records`, or the most that fit [`RING_PAGES`] for the
    /// run's vCPUs; an error naming the limit when the rings do not fit.
    pub fn ring_records(&self) -> Result<u64, String> {
        let fits =
            |n: u64| probe_core::jump::RingLayout::bytes_for(self.vcpus, n) <= RING_PAGES * 4096;
        match self.ring_records {
            Some(n) => {
                probe_core::jump::RingLayout::new(0, 0, self.vcpus, n)
                    .map_err(|e| format!("--ring-records: {e}"))?;
                if !fits(n) {
                    return Err(format!(
                        "--ring-records {n}: rings of {n} records for {} vCPU(s) take more than the {} KiB the XOL area keeps for them; give a smaller power of two",
                        self.vcpus,
                        RING_PAGES * 4
                    ));
                }
                Ok(n)
            }
            None => {
                let mut n = MOST_RING_RECORDS;
                while n > 2 && !fits(n) {
                    n /= 2;
                }
                Ok(n)
            }
        }
    }
}

/// Which trap probes use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
pub enum TrapChoice {
    /// int3 when this KVM delivers it (self-test), else hardware breakpoints.
    Auto,
    /// int3 written over the instruction: unlimited probes.
    Int3,
    /// Hardware execute breakpoints: at most 4 probes, guest text untouched.
    Hw,
}

/// The default kernel command line for guests of `arch`.
pub fn default_cmdline(arch: hvprobe_guest::GuestArch) -> &'static str {
    platform(arch).default_cmdline
}

/// Default time limit with `--exec`.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 600;

impl Job {
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
            .unwrap_or_else(|| default_cmdline(self.guest_arch()).to_string());
        if let Some(exec) = &self.exec {
            let encoded = base64::engine::general_purpose::STANDARD.encode(exec.as_bytes());
            cmdline.push_str(&format!(" {}={encoded}", hvprobe_guest::EXEC_PARAM));
        }
        if let Some(mounts) = self.guest_mounts() {
            let encoded = base64::engine::general_purpose::STANDARD.encode(mounts.as_bytes());
            cmdline.push_str(&format!(" {}={encoded}", hvprobe_guest::MOUNTS_PARAM));
        }
        cmdline
    }

    /// What the default guest's `/init` mounts: a line `INDEX ro|rw GUESTPATH` per disk
    /// (the index is in the disk's serial number, `hv<INDEX>-...`). `None` without disks; a
    /// disk that does not parse is left out (the run refuses it before booting).
    pub fn guest_mounts(&self) -> Option<String> {
        use crate::devices::virtio::DiskSpec;
        let lines: String = self
            .disk
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let spec = DiskSpec::parse(d).ok()?;
                let mode = if spec.read_only { "ro" } else { "rw" };
                Some(format!("{i} {mode} {}\n", spec.mount_point(i)))
            })
            .collect();
        (!self.disk.is_empty()).then_some(lines)
    }

    /// A job with every option at its default, as `hvprobe run` with no arguments.
    pub fn empty() -> Job {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            job: Job,
        }
        <Wrap as clap::Parser>::parse_from(["hvprobe"]).job
    }

    /// Whether the run asks for stacks: `--stack`, a stacks file, a `stacktrace` definition.
    pub fn asks_for_stacks(&self) -> bool {
        self.stack
            || !self.protect_allow.is_empty()
            || self.stacks.is_some()
            || self.flamegraph.is_some()
            || self
                .probes
                .iter()
                .any(|p| is_definition(p) && ProbeDefinition::parse(p).is_ok_and(|d| d.stacktrace))
    }

    /// Whether the run may need stacks: it asks for them, or a live session might.
    pub fn wants_stacks(&self) -> bool {
        self.asks_for_stacks() || self.api_socket.is_some() || !self.protect.is_empty()
    }

    /// The guest's architecture: `--arch`, else the host's.
    pub fn guest_arch(&self) -> hvprobe_guest::GuestArch {
        self.arch.unwrap_or_else(hvprobe_guest::GuestArch::host)
    }

    /// Whether the guest's architecture is the host's (else only the emulated runner of the
    /// guest's architecture can run it).
    pub fn native(&self) -> bool {
        self.guest_arch() == hvprobe_guest::GuestArch::host()
    }

    /// Fills in the default guest's kernel, initrd and System.map where none were given.
    pub fn resolve_guest(&self) -> Result<Job> {
        let mut resolved = self.clone();
        if self.kernel.is_none() {
            let arch = self.guest_arch();
            let guest = hvprobe_guest::default_guest_for(arch)
                .with_context(|| format!("preparing the default {arch} guest"))?;
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

    /// Resolves every `--probe` against the System.map, before anything runs. Each probe that
    /// does not resolve (bad syntax, unknown symbol, offset past the symbol) is listed in
    /// [`ResolvedProbes::refused`], all of them in one pass.
    pub fn resolve_probes(&self) -> Result<Option<ResolvedProbes>> {
        if !self.looks_into_the_guest() {
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
        let mut specs = Vec::new();
        for p in &self.probes {
            match expand_globs(&map, p) {
                Ok(expanded) => specs.extend(expanded),
                Err(e) => refused.push(RefusedProbe::at_resolution(p.as_str(), e)),
            }
        }
        if specs.len() > self.max_probes {
            bail!(
                "the probes expand to {} probes, more than --max-probes {}; nothing was planted",
                specs.len(),
                self.max_probes
            );
        }
        for p in &specs {
            match resolve_probe(&map, p, self.guest_arch()) {
                Ok(t) => targets.push(t),
                Err(e) => refused.push(RefusedProbe::at_resolution(p.as_str(), format!("{e:#}"))),
            }
        }
        // The guest's architecture's breakpoints, not the host's: an arm64 guest in the
        // runner on an x86_64 host has up to 16.
        let max_hw = platform(self.guest_arch()).max_hw_breakpoints;
        if self.trap == TrapChoice::Hw && targets.len() > max_hw {
            bail!(
                "--trap hw allows at most {max_hw} probes on {} guests ({} given)",
                self.guest_arch(),
                targets.len()
            );
        }
        Ok(Some(ResolvedProbes {
            map,
            targets,
            refused,
        }))
    }

    /// Whether the run looks into the guest kernel (probes, the live-session API that may add
    /// them, `--integrity`): it then needs the guest's System.map and a probe session.
    pub fn looks_into_the_guest(&self) -> bool {
        !self.probes.is_empty()
            || self.api_socket.is_some()
            || self.integrity
            || !self.protect.is_empty()
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
            crate::arch::image::check_kernel_image(self.guest_arch(), kernel)?;
        }
        if !self.probes.is_empty() && self.kernel.is_some() && self.system_map.is_none() {
            bail!("--probe with --kernel needs that kernel's System.map (--system-map)");
        }
        if self.plan == PlanChoice::Auto {
            self.ring_records().map_err(|e| anyhow::anyhow!(e))?;
        }
        if self.l2_qemu
            && (self.runner == RunnerChoice::Host
                || !self.probes.is_empty()
                || self.api_socket.is_some())
        {
            bail!(
                "--l2-qemu runs the guest under QEMU inside the emulated runner, without probes or an API socket"
            );
        }
        if self.rootfs.is_some() && self.kernel.is_some() && self.initrd.is_none() {
            bail!(
                "--rootfs with --kernel needs --initrd: hvprobe's initramfs mounts the root (`hvprobe guest` prints its path)"
            );
        }
        let roots = self
            .disk
            .iter()
            .filter(|d| d.split(',').skip(1).any(|o| o == "at=/"))
            .count()
            + usize::from(self.rootfs.is_some());
        if roots > 1 {
            bail!("only one root file system: --rootfs and `--disk ...,at=/` name {roots}");
        }
        // Every image opened and locked once, and let go: a bad one is refused now, before
        // the default guest is resolved or anything is built (the VMM opens them again).
        let disks = self
            .disk
            .iter()
            .map(|d| crate::devices::virtio::DiskSpec::parse(d))
            .collect::<Result<Vec<_>, _>>()?;
        // (The errors' messages name their cause already: not chained again.)
        drop(crate::devices::virtio::open_disks(&disks).map_err(|e| anyhow::anyhow!("{e}"))?);
        for s in &self.share {
            crate::share::ShareSpec::parse(s).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(())
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
