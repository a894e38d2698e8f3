//! Running a VM to its end: the vCPU threads, an event-manager loop on the main thread for
//! console input, stop requests and signals (`events.rs`), probing (`session.rs`), and the
//! report of how the guest ended.

mod events;
mod session;

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::Kvm;

use crate::output::{ConsoleSink, TraceOutput};
use crate::vcpu::{self, StopReason, StopSignal, VcpuContext, VcpuHandle};
use crate::vm::{Vm, VmConfig, VmError};
use events::{INTERRUPT_FD, StdinRelay, StopWatcher, interrupt_handler};
use session::ProbeSession;
pub use session::{PlantingError, ProbeReport, ProbeRequest, ProbeSetup, TextHashes};

/// Errors that keep a VM from running at all (as opposed to a guest that ends badly, which is
/// an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Building the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// An eventfd, a signal handler, a thread or the event loop could not be set up.
    #[error("{what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The event loop could not be set up.
    #[error("event manager: {0}")]
    EventManager(#[from] event_manager::Error),
    /// The XOL area could not be laid out or its tables written.
    #[error("XOL area: {0}")]
    XolArea(#[from] probe_core::xol::XolError),
}

/// A set-up step's error, as a [`MachineError`] naming the step.
fn setup_err<E: Into<SetupSource>>(what: &'static str) -> impl FnOnce(E) -> MachineError {
    move |e| MachineError::Setup {
        what,
        source: e.into().0,
    }
}

/// An I/O error or an errno, for [`setup_err`].
struct SetupSource(std::io::Error);

impl From<std::io::Error> for SetupSource {
    fn from(e: std::io::Error) -> SetupSource {
        SetupSource(e)
    }
}

impl From<vmm_sys_util::errno::Error> for SetupSource {
    fn from(e: vmm_sys_util::errno::Error) -> SetupSource {
        SetupSource(std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// How a guest run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The default guest's command finished with this status and the guest shut down.
    CommandExited(i32),
    /// The guest shut down without reporting a command status.
    ShutDown,
    /// The guest kernel panicked; the panic line.
    Panicked(String),
    /// The guest kernel reported an oops, BUG, WARN or lockup while probes were in, and the
    /// guest went on to shut down; the first report line. Never passed over as a success:
    /// a probe may be what broke the guest.
    KernelFault(String),
    /// The guest did not finish within the time limit.
    TimedOut(Duration),
    /// A vCPU failed in a way KVM cannot continue from.
    VcpuError(String),
    /// The user interrupted the run.
    Interrupted,
    /// A probe could not be planted; nothing was left in the guest.
    ProbeRefused(String),
}

/// Exit status when the guest failed (panic, vCPU error, no status from the command).
pub const EXIT_GUEST_FAILED: i32 = 125;
/// Exit status when a probe could not be planted (bad location, refused instruction).
pub const EXIT_PROBE_REFUSED: i32 = 2;

impl Outcome {
    /// The process exit status that reports this outcome: the guest command's own status,
    /// 0 for a plain shutdown, 124 for a timeout (like `timeout(1)`), 125 for a guest
    /// failure, 130 for an interrupt.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::CommandExited(s) => *s,
            Outcome::ShutDown => 0,
            Outcome::TimedOut(_) => 124,
            Outcome::Panicked(_) | Outcome::KernelFault(_) | Outcome::VcpuError(_) => {
                EXIT_GUEST_FAILED
            }
            Outcome::Interrupted => 130,
            Outcome::ProbeRefused(_) => EXIT_PROBE_REFUSED,
        }
    }
}

/// How a run ended, with what is worth telling the user.
#[derive(Debug)]
pub struct RunReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Time from VM start to the default guest's `/init` marker.
    pub boot_to_init: Option<Duration>,
    /// Total time the VM ran.
    pub run_time: Duration,
    /// The last console lines, for error reports.
    pub console_tail: Vec<String>,
    /// The first line of each guest kernel fault report (oops, BUG, WARN, lockup, panic)
    /// printed while probes were in.
    pub faults_with_probes: Vec<String>,
    /// What the probes saw, when the run had any.
    pub probes: Option<ProbeReport>,
}

/// What to run and for how long.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The VM to build.
    pub vm: VmConfig,
    /// Give up after this long.
    pub timeout: Option<Duration>,
    /// Relay this process's stdin to the guest console.
    pub forward_stdin: bool,
}

/// Boots the VM described by `opts` on `kvm`, relays its console to stdout (sharing it with
/// `output` when trace lines go there too), and returns once the guest has ended.
pub fn run(
    kvm: Kvm,
    opts: &RunOptions,
    probes: Option<ProbeSetup>,
    output: Arc<TraceOutput>,
) -> Result<RunReport, MachineError> {
    let mut vm = Vm::new(kvm, &opts.vm, Box::new(ConsoleSink(output.clone())))?;
    let mut session = probes
        .map(|setup| ProbeSession::new(setup, &vm))
        .transpose()?;
    let probing = session.as_ref().map(ProbeSession::probing);
    let sync_regs = vm
        .kvm
        .check_extension_raw(kvm_bindings::KVM_CAP_SYNC_REGS.into())
        > 0;
    let stop = Arc::new(StopSignal::new().map_err(setup_err("eventfd"))?);
    vcpu::install_kick_handler().map_err(setup_err("kick signal handler"))?;

    // SIGINT/SIGTERM end the run cleanly, through the same stop path as the guest.
    let interrupted = StopSignal::new().map_err(setup_err("eventfd"))?;
    INTERRUPT_FD.store(interrupted.evt.as_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, interrupt_handler)
            .map_err(setup_err("signal handler"))?;
    }

    let mut em: EventManager<Box<dyn MutEventSubscriber>> = EventManager::new()?;
    em.add_subscriber(Box::new(StopWatcher {
        stop: stop.clone(),
        reset_evt: vm.reset_evt.try_clone().map_err(setup_err("eventfd"))?,
    }));
    let stdin_relay = opts.forward_stdin.then(|| {
        let relay = Arc::new(Mutex::new(StdinRelay {
            serial: vm.serial.clone(),
            pending: Vec::new(),
        }));
        em.add_subscriber(Box::new(relay.clone()));
        relay
    });

    let started = Instant::now();
    let mut probe_refused: Option<String> = None;
    let mut handles: Vec<VcpuHandle> = Vec::new();
    for (id, fd) in vm.vcpus.drain(..).enumerate() {
        let ctx = VcpuContext {
            pio: vm.pio.clone(),
            mmio: vm.mmio.clone(),
            stop: stop.clone(),
            probing: probing.clone(),
            sync_regs,
        };
        let handle = vcpu::spawn(id as u32, fd, ctx).map_err(setup_err("vCPU thread"))?;
        handles.push(handle);
    }

    let deadline = opts.timeout.map(|t| started + t);
    loop {
        if let Err(e) = em.run_with_timeout(100) {
            stop.stop(StopReason::VcpuError(format!("event loop: {e}")));
        }
        if interrupted.evt.read().is_ok() {
            stop.stop(StopReason::Interrupted);
        }
        if stop.reason().is_some() {
            break;
        }
        if let Some(relay) = &stdin_relay {
            relay
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .flush_pending();
        }
        output.tick();
        if let Some(s) = &mut session
            && s.planted
        {
            s.tick(&handles);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stop.stop(StopReason::Timeout);
        }
        if let Some(s) = &mut session
            && !s.planted
            && vm
                .console
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .init_ready_at
                .is_some()
        {
            match s.plant(&handles, started, &vm.console) {
                // The default guest's /init waits for a line on its console before it runs
                // the command, so that no probed call happens before the probes are in.
                Ok(()) => {
                    vm.serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(b"\n");
                }
                // The command never runs.
                Err(e) => {
                    let e = e.to_string();
                    s.report.error = Some(e.clone());
                    probe_refused = Some(e);
                    stop.stop(StopReason::Interrupted);
                }
            }
        }
    }
    let probe_report = session.map(|s| s.finish(&handles, &vm.console));
    INTERRUPT_FD.store(-1, Ordering::SeqCst);
    let run_time = started.elapsed();
    for h in handles {
        h.stop_and_join();
    }
    output.flush();
    let _ = io::stdout().flush();

    let console = vm.console.lock().unwrap_or_else(|e| e.into_inner());
    let reason = stop.reason().unwrap_or(StopReason::GuestReset);
    let outcome = match reason {
        _ if probe_refused.is_some() => Outcome::ProbeRefused(probe_refused.unwrap_or_default()),
        StopReason::Timeout => Outcome::TimedOut(opts.timeout.unwrap_or_default()),
        StopReason::Interrupted => Outcome::Interrupted,
        StopReason::VcpuError(e) => Outcome::VcpuError(e),
        StopReason::GuestReset | StopReason::GuestPoweroff => {
            match (
                &console.panic,
                console.faults_with_probes.first(),
                console.exit_status,
            ) {
                (Some(p), _, _) => Outcome::Panicked(p.clone()),
                (None, Some(f), _) => Outcome::KernelFault(f.clone()),
                (None, None, Some(s)) => Outcome::CommandExited(s),
                (None, None, None) => Outcome::ShutDown,
            }
        }
    };
    Ok(RunReport {
        outcome,
        boot_to_init: console
            .init_ready_at
            .map(|t| t.saturating_duration_since(started)),
        run_time,
        console_tail: console.tail.iter().cloned().collect(),
        faults_with_probes: console.faults_with_probes.clone(),
        probes: probe_report,
    })
}
